//! [`Images`] over kiln-image's store: pull by the digest the control plane pinned, build the
//! read-only ext4 root filesystem once per digest, and create each instance's writable disk.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_api::types::ImageRef;
use kiln_image::reference::ImageRef as SourceRef;
use kiln_image::{Digest, ImageStore, effective_argv};

use crate::runtime::{Images, PreparedImage, RuntimeError};

/// Images from a kiln-image store.
#[derive(Clone)]
pub struct StoreImages {
    store: ImageStore,
}

impl StoreImages {
    /// Uses `store`.
    pub fn new(store: ImageStore) -> Self {
        Self { store }
    }
}

/// The pulled image is not the one the control plane pinned.
#[derive(Debug, thiserror::Error)]
#[error("image {reference} resolved to {actual}, but the release pins {expected}")]
pub struct DigestMismatch {
    /// The reference pulled.
    pub reference: String,
    /// The pinned digest.
    pub expected: String,
    /// The digest found.
    pub actual: String,
}

impl Images for StoreImages {
    async fn prepare(&self, image: &ImageRef) -> Result<PreparedImage, RuntimeError> {
        let digest: Digest = image.digest.parse()?;

        // A cached root filesystem needs no registry, so restarts work during an outage.
        let rootfs = match self.store.cached_rootfs(&digest)? {
            Some(rootfs) => rootfs,
            None => {
                let mut source: SourceRef = image.reference.parse()?;
                if let SourceRef::Registry(registry) = &mut source {
                    registry.digest = Some(digest.clone());
                }
                self.store.pull_rootfs(&source).await?
            }
        };
        if rootfs.digest != digest {
            return Err(Box::new(DigestMismatch {
                reference: image.reference.clone(),
                expected: digest.to_string(),
                actual: rootfs.digest.to_string(),
            }));
        }

        let config = &rootfs.image_config;
        let env: BTreeMap<String, String> = config
            .env
            .iter()
            .filter_map(|pair| pair.split_once('='))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect();
        Ok(PreparedImage {
            digest: digest.to_string(),
            rootfs: rootfs.path.clone(),
            default_command: effective_argv(config, None, None).unwrap_or_default(),
            working_dir: Some(config.working_dir.clone()).filter(|dir| !dir.is_empty()),
            user: Some(config.user.spec.clone()).filter(|user| !user.is_empty()),
            uid: config.user.uid,
            gid: config.user.gid,
            env,
        })
    }

    async fn create_disk(&self, path: &Path, size_mib: u64) -> Result<(), RuntimeError> {
        if path.exists() {
            return Ok(());
        }
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || -> Result<(), RuntimeError> {
            // Build under a temporary name so a crash never leaves a half-made disk behind.
            let temporary = path.with_extension("tmp");
            let file = std::fs::File::create(&temporary)?;
            file.set_len(size_mib * 1024 * 1024)?;
            drop(file);
            let mkfs = kiln_image::command::system_binary("mkfs.ext4");
            kiln_image::command::run(&mkfs, ["-q".as_ref(), "-F".as_ref(), temporary.as_os_str()])?;
            std::fs::rename(&temporary, &path)?;
            Ok(())
        })
        .await?
    }
}
