//! Secret encryption at rest.
//!
//! Values are sealed with XChaCha20-Poly1305 (random 24-byte nonces, so nonce reuse across
//! processes is not a concern) under a master key that lives in a file outside the database.
//! The associated data binds each ciphertext to its environment, name and version, so a
//! ciphertext copied to another row fails to open. Every ciphertext stores the id of its key,
//! which makes rotation possible: the key file lists several keys, the first one encrypts,
//! all of them decrypt, and `secrets rotate-key` re-encrypts every value under a new first
//! key.
//!
//! Key file format: one key per line, `<key id> <base64 of 32 bytes>`; `#` starts a comment.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use kiln_core::EnvId;
use rand::RngCore;
use sha2::Sha256;

/// Errors of the keyring.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The key file could not be read.
    #[error("failed to read master key file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file could not be written.
    #[error("failed to write master key file {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A line of the key file is malformed.
    #[error(
        "invalid master key file {path}, line {line}: {reason}; expected `<key id> <base64 of \
         32 bytes>` (create one with `kiln-control secrets generate-key`)"
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The key file holds no key.
    #[error(
        "master key file {path} contains no key; create one with `kiln-control secrets generate-key`"
    )]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A ciphertext names a key that is not in the key file.
    #[error("no master key with id {key_id} in the key file; restore the old key line")]
    UnknownKey {
        /// The missing key id.
        key_id: String,
    },
    /// Sealing failed.
    #[error("failed to encrypt secret {name}")]
    Seal {
        /// Secret name.
        name: String,
    },
    /// Opening failed: wrong key, tampered ciphertext or a row moved to another secret.
    #[error("failed to decrypt secret {name}: wrong key or tampered ciphertext")]
    Open {
        /// Secret name.
        name: String,
    },
}

/// One master key.
struct MasterKey {
    id: String,
    cipher: XChaCha20Poly1305,
}

/// The master keys, loaded from the key file.
pub struct Keyring {
    keys: Vec<MasterKey>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|key| key.id.as_str()).collect();
        f.debug_struct("Keyring").field("key_ids", &ids).finish()
    }
}

/// A sealed secret value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Id of the key that sealed it.
    pub key_id: String,
    /// The 24-byte nonce.
    pub nonce: Vec<u8>,
    /// Ciphertext with its 16-byte tag.
    pub ciphertext: Vec<u8>,
}

impl Keyring {
    /// Loads the key file.
    pub fn load(path: &Path) -> Result<Self, SecretsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, SecretsError> {
        let malformed = |line, reason| SecretsError::Malformed {
            path: path.to_owned(),
            line,
            reason,
        };
        let mut keys = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(id), Some(encoded), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(malformed(index + 1, "expected two fields"));
            };
            let bytes = STANDARD
                .decode(encoded)
                .map_err(|_| malformed(index + 1, "the key is not valid base64"))?;
            if bytes.len() != 32 {
                return Err(malformed(index + 1, "the key is not 32 bytes long"));
            }
            if keys.iter().any(|key: &MasterKey| key.id == id) {
                return Err(malformed(index + 1, "the key id appears twice"));
            }
            keys.push(MasterKey {
                id: id.to_owned(),
                cipher: XChaCha20Poly1305::new_from_slice(&bytes)
                    .map_err(|_| malformed(index + 1, "the key is not 32 bytes long"))?,
            });
        }
        if keys.is_empty() {
            return Err(SecretsError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Self { keys })
    }

    /// Creates a new random key and writes it as the first line of `path` (creating the file
    /// with mode 0600 if needed), keeping older keys for decryption. Returns the new key id.
    pub fn generate_key(path: &Path) -> Result<String, SecretsError> {
        let existing = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(SecretsError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        let mut id_bytes = [0u8; 6];
        rand::rngs::OsRng.fill_bytes(&mut id_bytes);
        let id = format!("k{}", hex::encode(id_bytes));
        let text = format!("{id} {}\n{existing}", STANDARD.encode(key));

        write_private(path, &text).map_err(|source| SecretsError::Write {
            path: path.to_owned(),
            source,
        })?;
        Ok(id)
    }

    /// Returns the id of the key that encrypts.
    pub fn active_key_id(&self) -> &str {
        &self.keys[0].id
    }

    /// Seals `value` for secret `name` at `version` of environment `env_id`.
    pub fn seal(
        &self,
        env_id: EnvId,
        name: &str,
        version: u64,
        value: &[u8],
    ) -> Result<Sealed, SecretsError> {
        let key = &self.keys[0];
        let mut nonce = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = associated_data(env_id, name, version);
        let ciphertext = key
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: value,
                    aad: &aad,
                },
            )
            .map_err(|_| SecretsError::Seal {
                name: name.to_owned(),
            })?;
        Ok(Sealed {
            key_id: key.id.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// Opens a sealed value.
    pub fn open(
        &self,
        env_id: EnvId,
        name: &str,
        version: u64,
        sealed: &Sealed,
    ) -> Result<Vec<u8>, SecretsError> {
        let key = self
            .keys
            .iter()
            .find(|key| key.id == sealed.key_id)
            .ok_or_else(|| SecretsError::UnknownKey {
                key_id: sealed.key_id.clone(),
            })?;
        if sealed.nonce.len() != 24 {
            return Err(SecretsError::Open {
                name: name.to_owned(),
            });
        }
        let aad = associated_data(env_id, name, version);
        key.cipher
            .decrypt(
                XNonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| SecretsError::Open {
                name: name.to_owned(),
            })
    }
}

/// Returns the digest shown for a secret value: the first 16 hex characters of
/// HMAC-SHA-256 under the environment's random digest key. Without that key (which never
/// leaves the database) the digest cannot be used to test guesses of the value.
pub fn digest(digest_key: &[u8], value: &[u8]) -> String {
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(digest_key) else {
        return String::new();
    };
    mac.update(value);
    let bytes = mac.finalize().into_bytes();
    hex::encode(&bytes[..8])
}

fn associated_data(env_id: EnvId, name: &str, version: u64) -> Vec<u8> {
    format!("kiln-secret\0{env_id}\0{name}\0{version}").into_bytes()
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring(dir: &Path) -> Keyring {
        let path = dir.join("master.key");
        Keyring::generate_key(&path).unwrap();
        Keyring::load(&path).unwrap()
    }

    #[test]
    fn sealed_value_opens_only_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keyring(dir.path());
        let env = EnvId::new();
        let sealed = keys.seal(env, "DB_PASSWORD", 1, b"hunter2").unwrap();

        assert_eq!(
            keys.open(env, "DB_PASSWORD", 1, &sealed).unwrap(),
            b"hunter2"
        );
        assert!(keys.open(env, "OTHER", 1, &sealed).is_err());
        assert!(keys.open(env, "DB_PASSWORD", 2, &sealed).is_err());
        assert!(keys.open(EnvId::new(), "DB_PASSWORD", 1, &sealed).is_err());
    }

    #[test]
    fn rotated_keyring_opens_old_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let old_id = Keyring::generate_key(&path).unwrap();
        let old = Keyring::load(&path).unwrap();
        let env = EnvId::new();
        let sealed = old.seal(env, "A", 1, b"value").unwrap();

        let new_id = Keyring::generate_key(&path).unwrap();
        let rotated = Keyring::load(&path).unwrap();
        assert_eq!(rotated.active_key_id(), new_id);
        assert_eq!(sealed.key_id, old_id);
        assert_eq!(rotated.open(env, "A", 1, &sealed).unwrap(), b"value");
    }

    #[test]
    fn malformed_key_files_are_rejected() {
        let path = Path::new("/etc/kiln/master.key");
        let cases = [
            ("", "contains no key"),
            ("k1\n", "line 1"),
            ("k1 not-base64!\n", "not valid base64"),
            ("k1 AAAA\n", "not 32 bytes"),
        ];
        for (text, expected) in cases {
            let error = Keyring::parse(path, text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }
}
