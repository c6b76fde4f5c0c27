//! Instances: one running replica of one process type of one release, in exactly one microVM.

use std::net::{Ipv4Addr, Ipv6Addr};

use kiln_core::{EnvId, HostId, InstanceId, ProcessName, ReleaseId};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub use crate::events::InstanceState;

/// What the control plane wants an instance to be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    /// Run it (and restart it with backoff when it exits).
    Running,
    /// Stop it gracefully: kill signal, then a forced stop after the kill timeout.
    Stopped,
}

/// An instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Instance {
    /// Id of the instance.
    pub id: InstanceId,
    /// The environment.
    pub env_id: EnvId,
    /// The release it runs.
    pub release_id: ReleaseId,
    /// Process type.
    pub process: ProcessName,
    /// Host it is placed on.
    pub host_id: HostId,
    /// Its overlay address, a /128 inside the host's /64.
    pub ipv6: Ipv6Addr,
    /// Its private IPv4 address from 100.64.0.0/10.
    pub ipv4: Ipv4Addr,
    /// What the control plane wants.
    pub desired: DesiredState,
    /// Last state the agent reported.
    pub state: InstanceState,
    /// Detail of the last report, such as an exit code or health-check failure.
    #[serde(default)]
    pub detail: Option<String>,
    /// When the instance was placed.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub created_at: OffsetDateTime,
    /// When the state last changed.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub updated_at: OffsetDateTime,
}

/// Body of `POST /v1/host/instances/{instance}/state`: an agent's state report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ReportInstanceState {
    /// The new state.
    pub state: InstanceState,
    /// Detail such as "health check: connection refused on [fd00::1]:8080".
    #[serde(default)]
    pub detail: Option<String>,
    /// Exit code, for `exited` and `failed`.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Last output lines of a run-once instance (a release command), for `exited` and
    /// `failed`; at most [`MAX_REPORTED_OUTPUT_LINES`] lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output: Vec<String>,
}

/// Most output lines a state report may carry.
pub const MAX_REPORTED_OUTPUT_LINES: usize = 50;

/// Maximum length in bytes of one output line in a state report.
pub const MAX_REPORTED_OUTPUT_LINE_BYTES: usize = 1024;
