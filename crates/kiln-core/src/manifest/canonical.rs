//! The canonical JSON form of a manifest, stored in releases and hashed into a digest.
//!
//! The same manifest always gives the same bytes: every map is a `BTreeMap` (sorted keys),
//! struct fields serialize in declaration order, durations are integer milliseconds, sizes
//! integer MiB, and the output is compact with no trailing newline. Two `kiln.toml` files
//! that differ only in formatting, comments, key order or units (`"1GiB"` or `1024`) give the
//! same canonical form and digest.

use sha2::{Digest, Sha256};

use super::schema::{Manifest, ResolvedManifest};

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serialization cannot fail, because every map key serializes as a string and no
    // manifest type has a `Serialize` impl that returns an error.
    serde_json::to_vec(value).expect("manifest types always serialize to JSON")
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl Manifest {
    /// Returns the canonical JSON bytes of the whole manifest, overrides included.
    pub fn to_canonical_json(&self) -> Vec<u8> {
        to_json(self)
    }

    /// Returns `sha256:` and the hex SHA-256 of [`Self::to_canonical_json`].
    pub fn digest(&self) -> String {
        sha256_digest(&self.to_canonical_json())
    }

    /// Reads a manifest back from its canonical JSON.
    pub fn from_canonical_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

impl ResolvedManifest {
    /// Returns the canonical JSON bytes of this environment's manifest.
    pub fn to_canonical_json(&self) -> Vec<u8> {
        to_json(self)
    }

    /// Returns `sha256:` and the hex SHA-256 of [`Self::to_canonical_json`].
    pub fn digest(&self) -> String {
        sha256_digest(&self.to_canonical_json())
    }

    /// Reads an environment's manifest back from its canonical JSON.
    pub fn from_canonical_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
