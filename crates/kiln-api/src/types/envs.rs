//! Environments: deployable instances of an app, each with its own config, secrets, releases,
//! routes and addresses.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;

use kiln_core::{AppId, EnvId, EnvName, Hostname, OrgId, ProcessName, ReleaseId};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// An environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Env {
    /// Id of the environment.
    pub id: EnvId,
    /// The owning org.
    pub org_id: OrgId,
    /// The app it belongs to.
    pub app_id: AppId,
    /// Name, unique within the app.
    pub name: EnvName,
    /// The platform hostname, `ENV.APP.ORG.<apps domain>`.
    pub hostname: Hostname,
    /// Dedicated IPv6 address for raw TCP services, taken from the cluster prefix.
    pub ipv6_address: Ipv6Addr,
    /// The release the environment runs or is rolling to; `null` before the first deploy.
    #[serde(default)]
    pub current_release_id: Option<ReleaseId>,
    /// Instance counts per process type set by `scale`, overriding the release's counts.
    #[serde(default)]
    pub scale: BTreeMap<ProcessName, u32>,
    /// When the environment was created.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub created_at: OffsetDateTime,
}

/// Body of `POST /v1/orgs/{org}/apps/{app}/envs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateEnv {
    /// Name of the new environment.
    pub name: EnvName,
}

/// Body of `PUT .../envs/{env}/scale`: instance counts per process type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ScaleEnv {
    /// New instance count for each named process type; unnamed ones keep their count.
    pub counts: BTreeMap<ProcessName, u32>,
}
