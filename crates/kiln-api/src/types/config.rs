//! Config vars of an environment: plain, non-secret environment variables, versioned.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The config vars of an environment at one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ConfigVars {
    /// Version, incremented by every change; 0 before the first.
    pub version: u64,
    /// Variables by name.
    pub vars: BTreeMap<String, String>,
}

/// Body of `PATCH .../envs/{env}/config`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct UpdateConfig {
    /// Variables to set. Names are `[A-Za-z_][A-Za-z0-9_]*`, at most 255 bytes.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Variables to remove.
    #[serde(default)]
    pub unset: Vec<String>,
}
