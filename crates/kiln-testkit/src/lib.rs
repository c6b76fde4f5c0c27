//! Fixtures shared by Kiln's integration tests: real components started on demand (a private
//! PostgreSQL cluster, a local OCI registry, test images, guests, network namespaces).
