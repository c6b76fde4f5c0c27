//! Secrets of an environment. The API accepts values but never returns them to users: listings
//! show names, versions and digests. Only a host token whose host runs an instance of the
//! environment receives the values.

use std::collections::BTreeMap;

use kiln_core::InstanceId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Metadata of one secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SecretMeta {
    /// Name, `[A-Za-z_][A-Za-z0-9_]*`; the guest finds it at `/run/kiln/secrets/NAME`.
    pub name: String,
    /// Version of this secret, incremented by every set.
    pub version: u64,
    /// First 16 hex characters of an HMAC-SHA-256 of the value under a per-environment key:
    /// tells versions apart without revealing the value.
    pub digest: String,
    /// When this version was set.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub updated_at: OffsetDateTime,
}

/// Body of `PUT .../envs/{env}/secrets/{name}`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SetSecret {
    /// The secret value, at most 64 KiB of UTF-8.
    pub value: String,
}

impl std::fmt::Debug for SetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetSecret")
            .field("value", &"<redacted>")
            .finish()
    }
}

/// Secret values delivered to a host for one instance placed on it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct InstanceSecrets {
    /// The instance the secrets are for.
    pub instance_id: InstanceId,
    /// Version of the environment's secret set (incremented by every set or unset).
    pub secrets_version: u64,
    /// Values by name.
    pub values: BTreeMap<String, String>,
}

impl std::fmt::Debug for InstanceSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceSecrets")
            .field("instance_id", &self.instance_id)
            .field("secrets_version", &self.secrets_version)
            .field("names", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}
