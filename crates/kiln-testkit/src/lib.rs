//! Fixtures shared by Kiln's integration tests: real components started on demand (a private
//! PostgreSQL cluster, a local OCI registry, test images, guests, network namespaces).
//!
//! Each fixture uses a shared service when the test runner provides one through the
//! environment (`KILN_TEST_PG_DIR`, `KILN_TEST_REGISTRY`) and otherwise starts a private one
//! that is stopped and removed when the test process ends.

pub mod guest;
pub mod netns;
pub mod oci;
pub mod postgres;
pub mod registry;

pub mod simagent;
