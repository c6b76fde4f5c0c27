//! The content-addressed blob cache (`blobs/sha256/<hex>`), shared by every image in a store.
//!
//! A blob enters the cache only whole and verified: it is written under `tmp/`, hashed and
//! counted as it arrives, checked against the expected digest and size, fsynced, and then
//! renamed into place. A partial or corrupt download therefore never has a cache name.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The blob cache of a store.
#[derive(Debug, Clone)]
pub struct BlobStore {
    blobs: PathBuf,
    tmp: PathBuf,
}

/// A blob that could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The content does not hash to the expected digest.
    #[error("blob {expected} failed verification: its content hashes to {actual}")]
    DigestMismatch {
        /// The digest the descriptor promised.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },
    /// The content is longer or shorter than the descriptor says.
    #[error("blob {digest} has {actual} bytes but its descriptor says {expected}")]
    SizeMismatch {
        /// The blob digest.
        digest: Digest,
        /// The size the descriptor promised.
        expected: u64,
        /// The bytes received (or the point where reading stopped, when too long).
        actual: u64,
    },
    /// Reading the source or writing the cache failed.
    #[error("failed to store blob {digest}")]
    Io {
        /// The blob digest.
        digest: Digest,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// An in-progress blob: a temporary file plus the running hash and byte count.
pub(crate) struct BlobWriter {
    digest: Digest,
    expected_size: Option<u64>,
    temp_path: PathBuf,
    final_path: PathBuf,
    file: io::BufWriter<std::fs::File>,
    hasher: Sha256,
    written: u64,
}

impl BlobStore {
    /// Opens (creating if needed) the blob cache under `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        let blobs = root.join("blobs").join("sha256");
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&blobs)?;
        std::fs::create_dir_all(&tmp)?;
        Ok(Self { blobs, tmp })
    }

    /// The cache path of `digest` (which may not exist).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// Whether `digest` is in the cache with `size` bytes (when given).
    pub fn contains(&self, digest: &Digest, size: Option<u64>) -> bool {
        match std::fs::metadata(self.path(digest)) {
            Ok(metadata) => size.is_none_or(|size| metadata.len() == size),
            Err(_) => false,
        }
    }

    /// The directory for temporary files of this store.
    #[cfg(test)]
    pub(crate) fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Every cached blob with its size.
    pub(crate) fn list(&self) -> io::Result<Vec<(Digest, u64)>> {
        let mut blobs = Vec::new();
        for entry in std::fs::read_dir(&self.blobs)? {
            let entry = entry?;
            if let Some(digest) = entry
                .file_name()
                .to_str()
                .and_then(|name| Digest::from_hex(name).ok())
            {
                blobs.push((digest, entry.metadata()?.len()));
            }
        }
        Ok(blobs)
    }

    /// Removes a blob from the cache; a missing blob is not an error.
    pub(crate) fn remove(&self, digest: &Digest) -> io::Result<()> {
        match std::fs::remove_file(self.path(digest)) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }

    /// Starts writing the blob `digest`.
    pub(crate) fn writer(
        &self,
        digest: &Digest,
        expected_size: Option<u64>,
    ) -> Result<BlobWriter, BlobError> {
        let temp_path = self.tmp.join(format!(
            "{}.{}.{}.partial",
            digest.hex(),
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::File::create(&temp_path).map_err(|source| BlobError::Io {
            digest: digest.clone(),
            source,
        })?;
        Ok(BlobWriter {
            digest: digest.clone(),
            expected_size,
            temp_path,
            final_path: self.path(digest),
            file: io::BufWriter::with_capacity(256 * 1024, file),
            hasher: Sha256::new(),
            written: 0,
        })
    }

    /// Copies a blob from `reader` into the cache, verifying digest and size.
    pub fn import(
        &self,
        digest: &Digest,
        expected_size: Option<u64>,
        mut reader: impl Read,
    ) -> Result<PathBuf, BlobError> {
        let mut writer = self.writer(digest, expected_size)?;
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let read = match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(writer.abort(source)),
            };
            writer.write(&buffer[..read])?;
        }
        writer.finish()
    }

    /// Stores `bytes` as blob `digest`, verifying it.
    pub fn import_bytes(&self, digest: &Digest, bytes: &[u8]) -> Result<PathBuf, BlobError> {
        if self.contains(digest, Some(bytes.len() as u64)) {
            return Ok(self.path(digest));
        }
        self.import(digest, Some(bytes.len() as u64), bytes)
    }
}

impl BlobWriter {
    /// Appends a chunk; fails as soon as the blob is longer than expected.
    pub(crate) fn write(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        self.written += chunk.len() as u64;
        if let Some(expected) = self.expected_size
            && self.written > expected
        {
            let error = BlobError::SizeMismatch {
                digest: self.digest.clone(),
                expected,
                actual: self.written,
            };
            let _ = std::fs::remove_file(&self.temp_path);
            return Err(error);
        }
        self.hasher.update(chunk);
        if let Err(source) = self.file.write_all(chunk) {
            return Err(self.abort(source));
        }
        Ok(())
    }

    /// Discards the partial file and returns the error for `source`.
    pub(crate) fn abort(&self, source: io::Error) -> BlobError {
        let _ = std::fs::remove_file(&self.temp_path);
        BlobError::Io {
            digest: self.digest.clone(),
            source,
        }
    }

    /// Verifies, fsyncs and renames the blob into the cache.
    pub(crate) fn finish(self) -> Result<PathBuf, BlobError> {
        let Self {
            digest,
            expected_size,
            temp_path,
            final_path,
            file,
            hasher,
            written,
        } = self;
        let discard = |error: BlobError| {
            let _ = std::fs::remove_file(&temp_path);
            error
        };

        if let Some(expected) = expected_size
            && written != expected
        {
            return Err(discard(BlobError::SizeMismatch {
                digest,
                expected,
                actual: written,
            }));
        }
        let actual = Digest::from_hasher(hasher);
        if actual != digest {
            return Err(discard(BlobError::DigestMismatch {
                expected: digest,
                actual,
            }));
        }

        let file = file.into_inner().map_err(|error| {
            discard(BlobError::Io {
                digest: digest.clone(),
                source: error.into_error(),
            })
        })?;
        file.sync_all().map_err(|source| {
            discard(BlobError::Io {
                digest: digest.clone(),
                source,
            })
        })?;
        std::fs::rename(&temp_path, &final_path)
            .map_err(|source| discard(BlobError::Io { digest, source }))?;
        Ok(final_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_verifies_digest_and_size() {
        let temp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(temp.path()).unwrap();
        let digest = Digest::of(b"hello");

        let error = store.import(&digest, Some(5), &b"hellx"[..]).unwrap_err();
        assert!(
            matches!(error, BlobError::DigestMismatch { .. }),
            "{error:?}"
        );
        let error = store.import(&digest, Some(4), &b"hello"[..]).unwrap_err();
        assert!(matches!(error, BlobError::SizeMismatch { .. }), "{error:?}");
        assert!(!store.contains(&digest, None));
        assert_eq!(
            std::fs::read_dir(store.tmp_dir()).unwrap().count(),
            0,
            "no partial file left"
        );

        let path = store.import(&digest, Some(5), &b"hello"[..]).unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"hello");
    }
}
