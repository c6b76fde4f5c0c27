//! OCI images into read-only ext4 root filesystems for microVMs.
//!
//! Pulls from registries and local `oci-layout`/`oci-archive` sources, verifies every blob by
//! digest, unpacks layers without ever writing outside the root, and caches one ext4 image per
//! image digest. [`ImageStore`] is the entry point: `pull`, `rootfs`, `pin`/`unpin`, `gc`.

pub mod blobs;
pub mod command;
pub mod config;
pub mod digest;
mod dirfd;
pub mod ext4;
pub mod image_config;
pub mod layout;
pub mod manifest;
pub mod reference;
pub mod registry;
pub mod store;
pub mod unpack;

pub use config::{RegistrySettings, StoreConfig};
pub use digest::Digest;
pub use image_config::{ExposedPort, ImageConfig, ResolvedUser, effective_argv};
pub use reference::{ImageRef, RegistryRef};
pub use store::{GcReport, ImageRecord, ImageStore, PulledImage, Rootfs, StoreError};
