//! The host's WireGuard key pair: generated on first start, kept in the state directory
//! (mode 0600), and only its public half leaves the host (in the registration).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use x25519_dalek::{PublicKey, StaticSecret};

/// A failed key operation.
#[derive(Debug, thiserror::Error)]
pub enum OverlayKeyError {
    /// Reading or writing the key file failed.
    #[error("failed to {operation} overlay key file {path}")]
    Io {
        /// What was attempted.
        operation: &'static str,
        /// The key file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The key file does not contain a base64 key of 32 bytes.
    #[error(
        "invalid overlay key file {path}: expected the base64 of 32 bytes; remove it to \
         generate a new key (peers then need the new public key)"
    )]
    Invalid {
        /// The key file.
        path: PathBuf,
    },
}

/// Loads the private key at `path`, generating it when missing, and returns the base64
/// public key.
pub fn load_or_generate(path: &Path) -> Result<String, OverlayKeyError> {
    let io = |operation| {
        let path = path.to_path_buf();
        move |source| OverlayKeyError::Io {
            operation,
            path,
            source,
        }
    };
    let secret = match std::fs::read_to_string(path) {
        Ok(text) => {
            let bytes: [u8; 32] = STANDARD
                .decode(text.trim())
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(|| OverlayKeyError::Invalid {
                    path: path.to_path_buf(),
                })?;
            StaticSecret::from(bytes)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io("create"))?;
            file.write_all(STANDARD.encode(secret.to_bytes()).as_bytes())
                .map_err(io("write"))?;
            secret
        }
        Err(error) => return Err(io("read")(error)),
    };
    Ok(STANDARD.encode(PublicKey::from(&secret).as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_generated_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("overlay.key");
        let first = load_or_generate(&path).unwrap();
        let second = load_or_generate(&path).unwrap();
        assert_eq!(first, second);
        assert_eq!(STANDARD.decode(&first).unwrap().len(), 32);
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn corrupt_key_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("overlay.key");
        std::fs::write(&path, "not a key").unwrap();
        let error = load_or_generate(&path).unwrap_err();
        assert!(error.to_string().contains("remove it"), "{error}");
    }
}
