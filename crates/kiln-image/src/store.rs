//! The image store: pulls images into the blob cache, builds one read-only ext4 root
//! filesystem per image digest, pins images that running instances use, and collects
//! garbage within a disk budget.
//!
//! Layout under the store directory:
//!
//! ```text
//! blobs/sha256/<hex>        verified blobs (manifests, configs, layers)
//! images/<hex>.json         one record per pulled image (its mtime is the last use)
//! rootfs/<hex>/rootfs.ext4  the built root filesystem of image <hex>
//! rootfs/<hex>/image.json   the guest's image config
//! rootfs/<hex>.lock         flock(2) that serializes builds and GC of one image
//! pins/<hex>/<instance id>  an instance that uses image <hex>; GC keeps pinned images
//! tmp/                      partial downloads and unpacked trees being built
//! ```
//!
//! A rootfs is built under `tmp/`, fsynced and renamed into `rootfs/<hex>`, so a crash
//! mid-build leaves only garbage under `tmp/`, never a half-built cache entry.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures::{StreamExt as _, TryStreamExt as _};
use kiln_core::InstanceId;
use serde::{Deserialize, Serialize};

use crate::blobs::{BlobError, BlobStore};
use crate::config::StoreConfig;
use crate::digest::Digest;
use crate::dirfd::Dir;
use crate::ext4::{self, Ext4Error};
use crate::image_config::{Accounts, ImageConfig, ImageConfigError};
use crate::layout::{self, LayoutError};
use crate::manifest::{
    Compression, Descriptor, ImageConfigBlob, MAX_CONFIG_BYTES, Manifest, ManifestDocument,
    ManifestError,
};
use crate::reference::{ImageRef, RegistryRef};
use crate::registry::{RegistryClient, RegistryError};
use crate::unpack::{self, Layer, UnpackError, UnpackStats};

/// Leftovers in `tmp/` older than this are removed by GC (a build or download in progress
/// touches its files far more often).
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

static BUILD_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A failure of a store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A store directory could not be created or read.
    #[error("failed to access image store path {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The HTTP client could not be built.
    #[error("failed to create the registry client")]
    Client(#[source] reqwest::Error),
    /// A registry request failed.
    #[error("failed to pull {reference}")]
    Registry {
        /// The image reference.
        reference: String,
        /// The registry error.
        #[source]
        source: RegistryError,
    },
    /// A local source could not be read.
    #[error("failed to read {reference}")]
    Layout {
        /// The image reference.
        reference: String,
        /// The layout error.
        #[source]
        source: LayoutError,
    },
    /// A manifest, index or config is malformed.
    #[error("image {reference} has an invalid {document}")]
    Manifest {
        /// The image reference.
        reference: String,
        /// The document kind (`manifest`, `index`, `config`).
        document: &'static str,
        /// The parse error.
        #[source]
        source: ManifestError,
    },
    /// The image config JSON is malformed.
    #[error("image {reference} has an invalid config blob {digest}")]
    ConfigJson {
        /// The image reference.
        reference: String,
        /// The config digest.
        digest: Digest,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A nested descriptor does not match the content it points at.
    #[error(
        "image {reference}: {what} {digest} has {actual} bytes but its descriptor says {expected}"
    )]
    DescriptorSize {
        /// The image reference.
        reference: String,
        /// The kind of content the descriptor points at.
        what: &'static str,
        /// Its digest.
        digest: Digest,
        /// The size in the descriptor.
        expected: u64,
        /// The size of the content.
        actual: u64,
    },
    /// An index has no manifest for the configured platform.
    #[error("image {reference} has no {platform} variant (it has: {available})")]
    PlatformMissing {
        /// The image reference.
        reference: String,
        /// The configured platform.
        platform: String,
        /// The platforms the index lists.
        available: String,
    },
    /// A single-platform image is built for another platform.
    #[error("image {reference} is built for {actual}, but this host runs {platform}")]
    WrongPlatform {
        /// The image reference.
        reference: String,
        /// The configured platform.
        platform: String,
        /// The image's platform.
        actual: String,
    },
    /// An index points at another index, which Kiln does not follow.
    #[error("image {reference}: index entry {digest} is itself an index")]
    NestedIndex {
        /// The image reference.
        reference: String,
        /// The nested index digest.
        digest: Digest,
    },
    /// A layer has a media type that is not a tar layer.
    #[error(
        "image {reference}: layer {digest} has unsupported media type {media_type:?} (expected an OCI or Docker tar layer, plain, gzip or zstd)"
    )]
    LayerMediaType {
        /// The image reference.
        reference: String,
        /// The layer digest.
        digest: Digest,
        /// The media type.
        media_type: String,
    },
    /// A blob could not be stored or read.
    #[error("blob error")]
    Blob(#[source] BlobError),
    /// Unpacking a layer failed or an entry was unsafe.
    #[error("failed to unpack image {digest}")]
    Unpack {
        /// The image digest.
        digest: Digest,
        /// The unpack error.
        #[source]
        source: UnpackError,
    },
    /// The image config cannot be turned into the guest's config.
    #[error("image {digest} has an unusable config")]
    ImageConfig {
        /// The image digest.
        digest: Digest,
        /// The cause.
        #[source]
        source: ImageConfigError,
    },
    /// Building the ext4 image failed.
    #[error("failed to build the root filesystem of image {digest}")]
    Ext4 {
        /// The image digest.
        digest: Digest,
        /// The cause.
        #[source]
        source: Ext4Error,
    },
    /// An image is not in the store.
    #[error("image {digest} is not in the store: pull it first")]
    NotPulled {
        /// The image digest.
        digest: Digest,
    },
    /// A blocking task panicked or was cancelled.
    #[error("image store task failed")]
    Task(#[source] tokio::task::JoinError),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A pulled image: everything needed to build its root filesystem, all blobs cached.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PulledImage {
    /// The reference it was pulled by.
    pub reference: String,
    /// The digest of the platform manifest: the image's identity in this store.
    pub digest: Digest,
    /// The digest of the index the manifest was selected from, if any.
    pub index_digest: Option<Digest>,
    /// The image config blob's digest.
    pub config_digest: Digest,
    /// The layers, lowest first.
    pub layers: Vec<Descriptor>,
    /// The image's CPU architecture.
    pub architecture: String,
    /// The image's operating system.
    pub os: String,
    /// The runtime defaults from the image config (`User`, `Entrypoint`, `Cmd`, ...).
    #[serde(default)]
    pub runtime: crate::manifest::RuntimeConfig,
}

impl PulledImage {
    /// Returns the compressed size of all layers, in bytes.
    pub fn layers_size(&self) -> u64 {
        self.layers.iter().map(|layer| layer.size).sum()
    }
}

/// A built, cached root filesystem.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rootfs {
    /// The image digest (platform manifest).
    pub digest: Digest,
    /// The read-only ext4 image.
    pub path: PathBuf,
    /// The guest's image config.
    pub image_config: ImageConfig,
    /// The ext4 image's size in bytes.
    pub size_bytes: u64,
}

/// The outcome of a GC run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Images removed, oldest use first.
    pub removed_images: Vec<Digest>,
    /// Images kept over budget because an instance pins them.
    pub pinned_images: Vec<Digest>,
    /// Blobs removed because no remaining image uses them.
    pub removed_blobs: usize,
    /// Disk usage before, in bytes.
    pub bytes_before: u64,
    /// Disk usage after, in bytes.
    pub bytes_after: u64,
}

/// An image in the store, as listed by [`ImageStore::images`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The reference it was last pulled by.
    pub reference: String,
    /// The image digest (platform manifest).
    pub digest: Digest,
    /// The index digest, if pulled through one.
    pub index_digest: Option<Digest>,
    /// The config digest.
    pub config_digest: Digest,
    /// The layer digests.
    pub layers: Vec<Digest>,
    /// Seconds since the epoch of the last pull or rootfs use.
    #[serde(default)]
    pub last_used: u64,
    /// Whether the rootfs is built.
    #[serde(default)]
    pub rootfs_built: bool,
    /// Instances that pin this image.
    #[serde(default)]
    pub pinned_by: Vec<String>,
}

/// Store of pulled images and built root filesystems; cheap to clone.
#[derive(Debug, Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    config: StoreConfig,
    blobs: BlobStore,
    registry: RegistryClient,
}

impl ImageStore {
    /// Opens the store at `root`, creating its directories.
    pub fn open(root: &Path, config: StoreConfig) -> Result<Self, StoreError> {
        for sub in ["images", "rootfs", "pins", "tmp"] {
            let path = root.join(sub);
            fs::create_dir_all(&path).map_err(io_error(&path))?;
        }
        let blobs = BlobStore::open(root).map_err(io_error(root))?;
        let registry = RegistryClient::new(config.clone()).map_err(StoreError::Client)?;
        Ok(Self {
            inner: Arc::new(Inner {
                root: root.to_owned(),
                config,
                blobs,
                registry,
            }),
        })
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The blob cache.
    pub fn blobs(&self) -> &BlobStore {
        &self.inner.blobs
    }

    fn platform(&self) -> String {
        format!(
            "{}/{}",
            self.inner.config.os, self.inner.config.architecture
        )
    }

    /// Pulls `reference` (registry, `oci-layout:` or `oci-archive:`) into the blob cache and
    /// returns the image for this host's platform.
    pub async fn pull(&self, reference: &ImageRef) -> Result<PulledImage, StoreError> {
        let image = match reference {
            ImageRef::Registry(registry_ref) => self.pull_registry(registry_ref).await?,
            ImageRef::OciLayout { dir, tag } => {
                let store = self.clone();
                let (dir, tag, display) = (dir.clone(), tag.clone(), reference.to_string());
                tokio::task::spawn_blocking(move || {
                    store.pull_layout(&display, &dir, tag.as_deref(), false)
                })
                .await
                .map_err(StoreError::Task)??
            }
            ImageRef::OciArchive { file, tag } => {
                let store = self.clone();
                let (file, tag, display) = (file.clone(), tag.clone(), reference.to_string());
                tokio::task::spawn_blocking(move || {
                    store.pull_layout(&display, &file, tag.as_deref(), true)
                })
                .await
                .map_err(StoreError::Task)??
            }
        };
        tracing::info!(reference = %reference, digest = %image.digest, layers = image.layers.len(), "image pulled");
        Ok(image)
    }

    async fn pull_registry(&self, reference: &RegistryRef) -> Result<PulledImage, StoreError> {
        let display = reference.to_string();
        let registry_error = |source| StoreError::Registry {
            reference: display.clone(),
            source,
        };
        let client = &self.inner.registry;

        let top = client
            .manifest(reference, &reference.manifest_reference())
            .await
            .map_err(registry_error)?;
        self.inner
            .blobs
            .import_bytes(&top.digest, &top.bytes)
            .map_err(StoreError::Blob)?;
        let document =
            ManifestDocument::parse(&top.bytes, top.content_type.as_deref()).map_err(|source| {
                StoreError::Manifest {
                    reference: display.clone(),
                    document: "manifest",
                    source,
                }
            })?;

        let (manifest, digest, index_digest) = match document {
            ManifestDocument::Manifest(manifest) => (manifest, top.digest, None),
            ManifestDocument::Index(index) => {
                let descriptor = self.select_platform(&display, &index)?;
                let fetched = client
                    .manifest(reference, &descriptor.digest.to_string())
                    .await
                    .map_err(registry_error)?;
                check_size(
                    &display,
                    "manifest",
                    &descriptor,
                    fetched.bytes.len() as u64,
                )?;
                self.inner
                    .blobs
                    .import_bytes(&fetched.digest, &fetched.bytes)
                    .map_err(StoreError::Blob)?;
                let manifest = self.parse_platform_manifest(
                    &display,
                    &descriptor.digest,
                    &fetched.bytes,
                    fetched.content_type.as_deref(),
                )?;
                (manifest, fetched.digest, Some(top.digest))
            }
        };
        check_layers(&display, &manifest)?;
        self.write_record(&display, &digest, index_digest.as_ref(), &manifest)?;

        // The config and all layers download concurrently, bounded by the configured limit.
        let blobs = &self.inner.blobs;
        let downloads = std::iter::once(&manifest.config)
            .chain(&manifest.layers)
            .map(|descriptor| async move {
                client
                    .blob(reference, &descriptor.digest, descriptor.size, blobs)
                    .await
            });
        futures::stream::iter(downloads)
            .buffer_unordered(self.inner.config.parallel_downloads)
            .try_collect::<Vec<()>>()
            .await
            .map_err(registry_error)?;

        self.finish_pull(display, digest, index_digest, manifest)
    }

    fn pull_layout(
        &self,
        display: &str,
        path: &Path,
        tag: Option<&str>,
        is_archive: bool,
    ) -> Result<PulledImage, StoreError> {
        let layout_error = |source| StoreError::Layout {
            reference: display.to_owned(),
            source,
        };
        let blobs = &self.inner.blobs;
        let fetch = |descriptor: &Descriptor| -> Result<PathBuf, StoreError> {
            let result = if is_archive {
                layout::archive_blob(path, blobs, &descriptor.digest, descriptor.size)
            } else {
                layout::import_layout_blob(path, blobs, &descriptor.digest, descriptor.size)
            };
            result.map_err(layout_error)
        };

        let index = if is_archive {
            layout::import_archive(path, blobs).map_err(layout_error)?
        } else {
            layout::read_layout_index(path).map_err(layout_error)?
        };
        let mut descriptor = layout::select_tagged(path, &index, tag).map_err(layout_error)?;
        let mut bytes = read_small_blob(&fetch(&descriptor)?, crate::manifest::MAX_MANIFEST_BYTES)?;
        let mut index_digest = None;

        if let ManifestDocument::Index(nested) =
            ManifestDocument::parse(&bytes, Some(&descriptor.media_type)).map_err(|source| {
                StoreError::Manifest {
                    reference: display.to_owned(),
                    document: "manifest",
                    source,
                }
            })?
        {
            index_digest = Some(descriptor.digest.clone());
            descriptor = self.select_platform(display, &nested)?;
            bytes = read_small_blob(&fetch(&descriptor)?, crate::manifest::MAX_MANIFEST_BYTES)?;
        }
        let manifest = self.parse_platform_manifest(
            display,
            &descriptor.digest,
            &bytes,
            Some(&descriptor.media_type),
        )?;
        check_layers(display, &manifest)?;
        self.write_record(
            display,
            &descriptor.digest,
            index_digest.as_ref(),
            &manifest,
        )?;

        for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
            fetch(blob)?;
        }
        self.finish_pull(
            display.to_owned(),
            descriptor.digest,
            index_digest,
            manifest,
        )
    }

    fn select_platform(
        &self,
        display: &str,
        index: &crate::manifest::Index,
    ) -> Result<Descriptor, StoreError> {
        let config = &self.inner.config;
        index
            .select(&config.os, &config.architecture)
            .cloned()
            .ok_or_else(|| StoreError::PlatformMissing {
                reference: display.to_owned(),
                platform: self.platform(),
                available: index.platforms().join(", "),
            })
    }

    fn parse_platform_manifest(
        &self,
        display: &str,
        digest: &Digest,
        bytes: &[u8],
        content_type: Option<&str>,
    ) -> Result<Manifest, StoreError> {
        match ManifestDocument::parse(bytes, content_type).map_err(|source| {
            StoreError::Manifest {
                reference: display.to_owned(),
                document: "manifest",
                source,
            }
        })? {
            ManifestDocument::Manifest(manifest) => Ok(manifest),
            ManifestDocument::Index(_) => Err(StoreError::NestedIndex {
                reference: display.to_owned(),
                digest: digest.clone(),
            }),
        }
    }

    /// Reads the (cached) config blob, checks the platform and assembles the image.
    fn finish_pull(
        &self,
        display: String,
        digest: Digest,
        index_digest: Option<Digest>,
        manifest: Manifest,
    ) -> Result<PulledImage, StoreError> {
        let config_path = self.inner.blobs.path(&manifest.config.digest);
        let config_bytes = read_small_blob(&config_path, MAX_CONFIG_BYTES)?;
        let config: ImageConfigBlob =
            serde_json::from_slice(&config_bytes).map_err(|source| StoreError::ConfigJson {
                reference: display.clone(),
                digest: manifest.config.digest.clone(),
                source,
            })?;

        let wanted = &self.inner.config;
        let platform_known = !config.os.is_empty() && !config.architecture.is_empty();
        if index_digest.is_none()
            && platform_known
            && (config.os != wanted.os || config.architecture != wanted.architecture)
        {
            return Err(StoreError::WrongPlatform {
                reference: display,
                platform: self.platform(),
                actual: format!("{}/{}", config.os, config.architecture),
            });
        }

        Ok(PulledImage {
            reference: display,
            digest,
            index_digest,
            config_digest: manifest.config.digest,
            layers: manifest.layers,
            architecture: config.architecture,
            os: config.os,
            runtime: config.config.unwrap_or_default(),
        })
    }

    fn unpack_limits(&self) -> unpack::UnpackLimits {
        unpack::UnpackLimits {
            max_bytes: self.inner.config.max_unpacked_bytes,
            max_entries: self.inner.config.max_unpacked_entries,
        }
    }

    fn layers(&self, image: &PulledImage) -> Vec<Layer> {
        image
            .layers
            .iter()
            .map(|descriptor| Layer {
                digest: descriptor.digest.clone(),
                path: self.inner.blobs.path(&descriptor.digest),
                // Media types were checked when the image was pulled.
                compression: Compression::from_media_type(&descriptor.media_type)
                    .unwrap_or(Compression::Gzip),
            })
            .collect()
    }

    /// Unpacks `image` into `dir` (which must exist and be empty), for inspection.
    pub async fn unpack(&self, image: &PulledImage, dir: &Path) -> Result<UnpackStats, StoreError> {
        let layers = self.layers(image);
        let limits = self.unpack_limits();
        let (dir, digest) = (dir.to_owned(), image.digest.clone());
        tokio::task::spawn_blocking(move || {
            unpack::unpack(&dir, &layers, limits)
                .map_err(|source| StoreError::Unpack { digest, source })
        })
        .await
        .map_err(StoreError::Task)?
    }

    /// Returns the root filesystem of `image`, building it unless it is cached. Concurrent
    /// calls for one digest, in this process or others, build it once.
    pub async fn rootfs(&self, image: &PulledImage) -> Result<Rootfs, StoreError> {
        let store = self.clone();
        let image = image.clone();
        tokio::task::spawn_blocking(move || store.rootfs_blocking(&image))
            .await
            .map_err(StoreError::Task)?
    }

    /// Pulls `reference` and returns its root filesystem.
    pub async fn pull_rootfs(&self, reference: &ImageRef) -> Result<Rootfs, StoreError> {
        let image = self.pull(reference).await?;
        self.rootfs(&image).await
    }

    /// Returns the cached root filesystem of `digest` without any network access, or `None`
    /// when it is not built.
    pub fn cached_rootfs(&self, digest: &Digest) -> Result<Option<Rootfs>, StoreError> {
        let dir = self.rootfs_dir(digest);
        let config_path = dir.join("image.json");
        let bytes = match fs::read(&config_path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    path: config_path,
                    source,
                });
            }
        };
        let image_config: ImageConfig =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Io {
                path: config_path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, source),
            })?;
        let path = dir.join("rootfs.ext4");
        let size_bytes = fs::metadata(&path).map_err(io_error(&path))?.len();
        self.touch_record(digest);
        Ok(Some(Rootfs {
            digest: digest.clone(),
            path,
            image_config,
            size_bytes,
        }))
    }

    fn rootfs_dir(&self, digest: &Digest) -> PathBuf {
        self.inner.root.join("rootfs").join(digest.hex())
    }

    fn rootfs_blocking(&self, image: &PulledImage) -> Result<Rootfs, StoreError> {
        if let Some(rootfs) = self.cached_rootfs(&image.digest)? {
            return Ok(rootfs);
        }
        let _lock = self.lock_image(&image.digest)?;
        if let Some(rootfs) = self.cached_rootfs(&image.digest)? {
            return Ok(rootfs);
        }

        let digest = &image.digest;
        let started = std::time::Instant::now();
        let unique = format!(
            "{}-{}-{}",
            digest.hex(),
            std::process::id(),
            BUILD_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let staging = self.inner.root.join("tmp").join(format!("build-{unique}"));
        let tree = staging.join("tree");
        let output = staging.join("out");
        fs::create_dir_all(&tree).map_err(io_error(&tree))?;
        fs::create_dir_all(&output).map_err(io_error(&output))?;
        let result = self.build_into(image, &tree, &output);
        let cleanup = |path: &Path| {
            if let Err(error) = fs::remove_dir_all(path) {
                tracing::warn!(path = %path.display(), %error, "failed to remove build directory");
            }
        };
        let stats = match result {
            Ok(stats) => stats,
            Err(error) => {
                cleanup(&staging);
                return Err(error);
            }
        };

        let final_dir = self.rootfs_dir(digest);
        fs::rename(&output, &final_dir).map_err(io_error(&final_dir))?;
        sync_dir(&self.inner.root.join("rootfs"))?;
        cleanup(&staging);
        tracing::info!(
            digest = %digest,
            entries = stats.entries,
            bytes = stats.bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "rootfs built"
        );

        self.cached_rootfs(digest)?
            .ok_or_else(|| StoreError::NotPulled {
                digest: digest.clone(),
            })
    }

    /// Unpacks, resolves the config and builds the ext4 image into `output`.
    fn build_into(
        &self,
        image: &PulledImage,
        tree: &Path,
        output: &Path,
    ) -> Result<UnpackStats, StoreError> {
        let digest = &image.digest;
        for layer in &image.layers {
            if !self.inner.blobs.contains(&layer.digest, Some(layer.size)) {
                return Err(StoreError::NotPulled {
                    digest: digest.clone(),
                });
            }
        }
        let stats =
            unpack::unpack(tree, &self.layers(image), self.unpack_limits()).map_err(|source| {
                StoreError::Unpack {
                    digest: digest.clone(),
                    source,
                }
            })?;

        let root = Dir::open(tree).map_err(io_error(tree))?;
        let accounts = Accounts::read(&root).map_err(|source| StoreError::ImageConfig {
            digest: digest.clone(),
            source: source.into(),
        })?;
        let image_config =
            ImageConfig::from_runtime(&image.runtime, &accounts).map_err(|source| {
                StoreError::ImageConfig {
                    digest: digest.clone(),
                    source,
                }
            })?;

        let ext4_path = output.join("rootfs.ext4");
        ext4::build(tree, &ext4_path).map_err(|source| StoreError::Ext4 {
            digest: digest.clone(),
            source,
        })?;
        fs::set_permissions(
            &ext4_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o444),
        )
        .map_err(io_error(&ext4_path))?;

        let config_path = output.join("image.json");
        let json = serde_json::to_vec_pretty(&image_config).map_err(|source| StoreError::Io {
            path: config_path.clone(),
            source: io::Error::other(source),
        })?;
        write_synced(&config_path, &json)?;
        sync_dir(output)?;
        Ok(stats)
    }

    /// Takes the per-image `flock`, blocking until it is free.
    fn lock_image(&self, digest: &Digest) -> Result<File, StoreError> {
        let path = self
            .inner
            .root
            .join("rootfs")
            .join(format!("{}.lock", digest.hex()));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error(&path))?;
        // SAFETY: the fd is open for the lifetime of `file`; flock has no memory effects.
        let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if result != 0 {
            return Err(StoreError::Io {
                path,
                source: io::Error::last_os_error(),
            });
        }
        Ok(file)
    }

    fn record_path(&self, digest: &Digest) -> PathBuf {
        self.inner
            .root
            .join("images")
            .join(format!("{}.json", digest.hex()))
    }

    /// Writes the image's record before its blobs download, so that a concurrent GC counts
    /// them as used (and sees the image as the most recently used).
    fn write_record(
        &self,
        reference: &str,
        digest: &Digest,
        index_digest: Option<&Digest>,
        manifest: &Manifest,
    ) -> Result<(), StoreError> {
        let record = ImageRecord {
            reference: reference.to_owned(),
            digest: digest.clone(),
            index_digest: index_digest.cloned(),
            config_digest: manifest.config.digest.clone(),
            layers: manifest
                .layers
                .iter()
                .map(|layer| layer.digest.clone())
                .collect(),
            last_used: 0,
            rootfs_built: false,
            pinned_by: Vec::new(),
        };
        let path = self.record_path(digest);
        let json = serde_json::to_vec_pretty(&record).map_err(|source| StoreError::Io {
            path: path.clone(),
            source: io::Error::other(source),
        })?;
        let temp = path.with_extension(format!(
            "json.{}.{}.tmp",
            std::process::id(),
            BUILD_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        write_synced(&temp, &json)?;
        fs::rename(&temp, &path).map_err(io_error(&path))
    }

    /// Marks the image as used now, for LRU garbage collection.
    fn touch_record(&self, digest: &Digest) {
        let path = self.record_path(digest);
        if let Ok(file) = File::options().write(true).open(&path)
            && let Err(error) = file.set_modified(SystemTime::now())
        {
            tracing::debug!(path = %path.display(), %error, "failed to update image last use");
        }
    }

    fn pin_path(&self, digest: &Digest) -> PathBuf {
        self.inner.root.join("pins").join(digest.hex())
    }

    /// Records that `instance` uses image `digest`, so GC keeps it until [`Self::unpin`].
    /// Pins are files, so they survive agent restarts and bind `kiln-agent image gc` too.
    pub fn pin(&self, digest: &Digest, instance: InstanceId) -> Result<(), StoreError> {
        let dir = self.pin_path(digest);
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let path = dir.join(instance.to_string());
        write_synced(&path, b"")
    }

    /// Removes the pin of `instance` on image `digest`; a missing pin is not an error.
    pub fn unpin(&self, digest: &Digest, instance: InstanceId) -> Result<(), StoreError> {
        let path = self.pin_path(digest).join(instance.to_string());
        match fs::remove_file(&path) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(StoreError::Io {
                path,
                source: error,
            }),
            _ => Ok(()),
        }
    }

    fn pins(&self, digest: &Digest) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.pin_path(digest)) else {
            return Vec::new();
        };
        entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .collect()
    }

    /// Lists the images in the store, least recently used first.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let dir = self.inner.root.join("images");
        let mut records = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let entry = entry.map_err(io_error(&dir))?;
            let path = entry.path();
            if path.extension().is_none_or(|extension| extension != "json") {
                continue;
            }
            let Ok(bytes) = fs::read(&path) else { continue };
            let Ok(mut record) = serde_json::from_slice::<ImageRecord>(&bytes) else {
                tracing::warn!(path = %path.display(), "skipping unreadable image record");
                continue;
            };
            record.last_used = entry
                .metadata()
                .and_then(|metadata| metadata.modified())
                .ok()
                .and_then(|time| time.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |duration| duration.as_secs());
            record.rootfs_built = self.rootfs_dir(&record.digest).join("image.json").exists();
            record.pinned_by = self.pins(&record.digest);
            records.push(record);
        }
        records.sort_by_key(|record| record.last_used);
        Ok(records)
    }

    /// Bytes used by blobs and built root filesystems.
    pub fn disk_usage(&self) -> Result<u64, StoreError> {
        let blobs: u64 = self
            .inner
            .blobs
            .list()
            .map_err(io_error(&self.inner.root))?
            .iter()
            .map(|(_, size)| size)
            .sum();
        let rootfs_root = self.inner.root.join("rootfs");
        let mut rootfs = 0;
        for entry in fs::read_dir(&rootfs_root).map_err(io_error(&rootfs_root))? {
            let path = entry.map_err(io_error(&rootfs_root))?.path();
            if path.is_dir() {
                rootfs +=
                    fs::metadata(path.join("rootfs.ext4")).map_or(0, |metadata| metadata.len());
            }
        }
        Ok(blobs + rootfs)
    }

    /// Removes least recently used images until the store uses at most `budget_bytes`,
    /// never an image that an instance pins; then removes blobs no remaining image uses and
    /// stale temporary files.
    pub fn gc(&self, budget_bytes: u64) -> Result<GcReport, StoreError> {
        let mut report = GcReport {
            bytes_before: self.disk_usage()?,
            ..GcReport::default()
        };
        let mut usage = report.bytes_before;
        let mut remaining = Vec::new();

        for record in self.images()? {
            if usage <= budget_bytes {
                remaining.push(record);
                continue;
            }
            if !record.pinned_by.is_empty() {
                report.pinned_images.push(record.digest.clone());
                remaining.push(record);
                continue;
            }
            let _lock = self.lock_image(&record.digest)?;
            // An instance may have pinned the image between listing and locking.
            if !self.pins(&record.digest).is_empty() {
                report.pinned_images.push(record.digest.clone());
                remaining.push(record);
                continue;
            }
            let dir = self.rootfs_dir(&record.digest);
            if dir.exists() {
                fs::remove_dir_all(&dir).map_err(io_error(&dir))?;
            }
            let record_path = self.record_path(&record.digest);
            fs::remove_file(&record_path).map_err(io_error(&record_path))?;
            let unused = self.remove_unused_blobs(&record)?;
            report.removed_blobs += unused;
            usage = self.disk_usage()?;
            tracing::info!(digest = %record.digest, reference = %record.reference, "image removed by gc");
            report.removed_images.push(record.digest);
        }

        self.remove_stale_temp()?;
        report.bytes_after = self.disk_usage()?;
        Ok(report)
    }

    /// Removes the blobs of `removed` that no image in the store still uses.
    fn remove_unused_blobs(&self, removed: &ImageRecord) -> Result<usize, StoreError> {
        let mut in_use = HashSet::new();
        for record in self.images()? {
            in_use.insert(record.digest.clone());
            in_use.insert(record.config_digest.clone());
            in_use.extend(record.index_digest.clone());
            in_use.extend(record.layers.iter().cloned());
        }
        let candidates = std::iter::once(&removed.digest)
            .chain(&removed.index_digest)
            .chain(std::iter::once(&removed.config_digest))
            .chain(&removed.layers);
        let mut count = 0;
        for digest in candidates {
            if !in_use.contains(digest) && self.inner.blobs.contains(digest, None) {
                self.inner
                    .blobs
                    .remove(digest)
                    .map_err(io_error(&self.inner.blobs.path(digest)))?;
                count += 1;
            }
        }
        Ok(count)
    }

    fn remove_stale_temp(&self) -> Result<(), StoreError> {
        let tmp = self.inner.root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_error(&tmp))? {
            let Ok(entry) = entry else { continue };
            let stale = entry
                .metadata()
                .and_then(|metadata| metadata.modified())
                .ok()
                .and_then(|modified| modified.elapsed().ok())
                .is_some_and(|age| age > STALE_TEMP_AGE);
            if !stale {
                continue;
            }
            let path = entry.path();
            let result = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            if let Err(error) = result {
                tracing::warn!(path = %path.display(), %error, "failed to remove stale temporary file");
            }
        }
        Ok(())
    }
}

fn check_size(
    display: &str,
    what: &'static str,
    descriptor: &Descriptor,
    actual: u64,
) -> Result<(), StoreError> {
    if descriptor.size == actual {
        return Ok(());
    }
    Err(StoreError::DescriptorSize {
        reference: display.to_owned(),
        what,
        digest: descriptor.digest.clone(),
        expected: descriptor.size,
        actual,
    })
}

fn check_layers(display: &str, manifest: &Manifest) -> Result<(), StoreError> {
    for layer in &manifest.layers {
        if Compression::from_media_type(&layer.media_type).is_none() {
            return Err(StoreError::LayerMediaType {
                reference: display.to_owned(),
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            });
        }
    }
    Ok(())
}

fn read_small_blob(path: &Path, limit: u64) -> Result<Vec<u8>, StoreError> {
    use std::io::Read as _;
    let file = File::open(path).map_err(io_error(path))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error(path))?;
    if bytes.len() as u64 > limit {
        return Err(StoreError::Io {
            path: path.to_owned(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {limit} bytes"),
            ),
        });
    }
    Ok(bytes)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write as _;
    let mut file = File::create(path).map_err(io_error(path))?;
    file.write_all(bytes).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

fn sync_dir(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(io_error(path))
}
