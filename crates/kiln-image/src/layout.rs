//! Local image sources for air-gapped hosts and tests: `oci-layout` directories and
//! `oci-archive` tarballs (an `oci-layout` directory packed as a tar).
//!
//! Blobs are copied into the store's blob cache and verified there exactly like downloads,
//! so a layout with a corrupt or truncated blob is rejected.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::blobs::{BlobError, BlobStore};
use crate::digest::Digest;
use crate::manifest::{Descriptor, Index, MAX_MANIFEST_BYTES, ManifestDocument, ManifestError};

/// The annotation that names a tag in an `oci-layout` index.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// A local source that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A file of the layout could not be read.
    #[error("failed to read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `index.json` is not a valid index.
    #[error("invalid index.json in {path}")]
    Index {
        /// The layout or archive.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: ManifestError,
    },
    /// The archive has no `index.json`.
    #[error("{path} has no index.json: it is not an oci-archive (an OCI image layout as a tar)")]
    NoIndex {
        /// The archive.
        path: PathBuf,
    },
    /// No manifest carries the requested tag.
    #[error("{path} has no image tagged {tag:?} (tags: {available})")]
    TagNotFound {
        /// The layout or archive.
        path: PathBuf,
        /// The requested tag.
        tag: String,
        /// The tags present.
        available: String,
    },
    /// Several manifests and no tag to choose.
    #[error("{path} holds {count} images: add :TAG to the reference (tags: {available})")]
    Ambiguous {
        /// The layout or archive.
        path: PathBuf,
        /// How many manifests the index lists.
        count: usize,
        /// The tags present.
        available: String,
    },
    /// A blob is missing from the layout.
    #[error("{path} lacks blob {digest}")]
    MissingBlob {
        /// The layout or archive.
        path: PathBuf,
        /// The missing blob.
        digest: Digest,
    },
    /// A blob failed verification.
    #[error("blob in {path} is invalid")]
    Blob {
        /// The layout or archive.
        path: PathBuf,
        /// The verification error.
        #[source]
        source: BlobError,
    },
}

/// Reads and parses the `index.json` of the layout directory `dir`.
pub(crate) fn read_layout_index(dir: &Path) -> Result<Index, LayoutError> {
    let path = dir.join("index.json");
    let file = File::open(&path).map_err(|source| LayoutError::Read {
        path: path.clone(),
        source,
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|source| LayoutError::Read {
            path: path.clone(),
            source,
        })?;
    parse_index(dir, &bytes)
}

fn parse_index(path: &Path, bytes: &[u8]) -> Result<Index, LayoutError> {
    let index_error = |source| LayoutError::Index {
        path: path.to_owned(),
        source,
    };
    match ManifestDocument::parse(bytes, None).map_err(index_error)? {
        ManifestDocument::Index(index) => Ok(index),
        ManifestDocument::Manifest(_) => Err(index_error(ManifestError::MediaType {
            media_type: "an image manifest where index.json must be an index".to_owned(),
        })),
    }
}

/// Picks the index entry tagged `tag`, or the only entry when no tag is given.
pub(crate) fn select_tagged(
    path: &Path,
    index: &Index,
    tag: Option<&str>,
) -> Result<Descriptor, LayoutError> {
    let tags = || {
        let names: Vec<&str> = index
            .manifests
            .iter()
            .filter_map(|descriptor| {
                descriptor
                    .annotations
                    .get(REF_NAME_ANNOTATION)
                    .map(String::as_str)
            })
            .collect();
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    };
    match tag {
        Some(tag) => index
            .manifests
            .iter()
            .find(|descriptor| {
                descriptor
                    .annotations
                    .get(REF_NAME_ANNOTATION)
                    .is_some_and(|name| name == tag)
            })
            .cloned()
            .ok_or_else(|| LayoutError::TagNotFound {
                path: path.to_owned(),
                tag: tag.to_owned(),
                available: tags(),
            }),
        None if index.manifests.len() == 1 => Ok(index.manifests[0].clone()),
        None => Err(LayoutError::Ambiguous {
            path: path.to_owned(),
            count: index.manifests.len(),
            available: tags(),
        }),
    }
}

/// Copies blob `digest` from the layout `dir` into `blobs`, verifying it.
pub(crate) fn import_layout_blob(
    dir: &Path,
    blobs: &BlobStore,
    digest: &Digest,
    size: u64,
) -> Result<PathBuf, LayoutError> {
    if blobs.contains(digest, Some(size)) {
        return Ok(blobs.path(digest));
    }
    let path = dir.join("blobs").join("sha256").join(digest.hex());
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(LayoutError::MissingBlob {
                path: dir.to_owned(),
                digest: digest.clone(),
            });
        }
        Err(source) => return Err(LayoutError::Read { path, source }),
    };
    blobs
        .import(digest, Some(size), file)
        .map_err(|source| LayoutError::Blob {
            path: dir.to_owned(),
            source,
        })
}

/// Imports every `blobs/sha256/<hex>` entry of the archive `file` into `blobs` (each verified
/// against its name) and returns the archive's index.
pub(crate) fn import_archive(file: &Path, blobs: &BlobStore) -> Result<Index, LayoutError> {
    let read_error = |source| LayoutError::Read {
        path: file.to_owned(),
        source,
    };
    let opened = File::open(file).map_err(read_error)?;
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(256 * 1024, opened));
    let mut index = None;

    for entry in archive.entries().map_err(read_error)? {
        let mut entry = entry.map_err(read_error)?;
        let path = entry.path_bytes().into_owned();
        let path = path.strip_prefix(b"./").unwrap_or(&path);

        if path == b"index.json" {
            let mut bytes = Vec::new();
            (&mut entry)
                .take(MAX_MANIFEST_BYTES)
                .read_to_end(&mut bytes)
                .map_err(read_error)?;
            index = Some(parse_index(file, &bytes)?);
            continue;
        }
        let Some(hex) = path.strip_prefix(b"blobs/sha256/") else {
            continue;
        };
        let Some(digest) = std::str::from_utf8(hex)
            .ok()
            .and_then(|hex| Digest::from_hex(hex).ok())
        else {
            continue;
        };
        if !entry.header().entry_type().is_file() || blobs.contains(&digest, Some(entry.size())) {
            continue;
        }
        let size = entry.size();
        blobs
            .import(&digest, Some(size), entry)
            .map_err(|source| LayoutError::Blob {
                path: file.to_owned(),
                source,
            })?;
    }

    index.ok_or_else(|| LayoutError::NoIndex {
        path: file.to_owned(),
    })
}

/// Checks that an archive import left blob `digest` of `size` bytes in `blobs`.
pub(crate) fn archive_blob(
    file: &Path,
    blobs: &BlobStore,
    digest: &Digest,
    size: u64,
) -> Result<PathBuf, LayoutError> {
    if blobs.contains(digest, Some(size)) {
        Ok(blobs.path(digest))
    } else {
        Err(LayoutError::MissingBlob {
            path: file.to_owned(),
            digest: digest.clone(),
        })
    }
}
