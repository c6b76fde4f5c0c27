//! OCI images into read-only ext4 root filesystems for microVMs.
//!
//! Pulls from registries and local `oci-layout`/`oci-archive` sources, verifies every blob by
//! digest, unpacks layers without ever writing outside the root, and caches one ext4 image per
//! image digest.
