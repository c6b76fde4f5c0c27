//! The status snapshot the agent writes after every reconcile pass and `kiln-agent status`
//! prints.

use std::net::{Ipv4Addr, Ipv6Addr};

use kiln_api::InstanceState;
use kiln_core::{HostId, InstanceId};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The agent and its instances at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    /// When the snapshot was taken.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// The agent's process id.
    pub pid: u32,
    /// The host id, once registered.
    pub host_id: Option<HostId>,
    /// Whether the last call to the control plane succeeded.
    pub control_plane_reachable: bool,
    /// The assignment cursor.
    pub cursor: u64,
    /// The instances.
    pub instances: Vec<InstanceStatus>,
}

/// One instance in the status snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// The instance.
    pub id: InstanceId,
    /// `org/app/env`.
    pub env: String,
    /// Process type.
    pub process: String,
    /// Release version.
    pub release_version: u64,
    /// State, in the control plane's vocabulary.
    pub state: InstanceState,
    /// True when the instance keeps exiting and waits for a delayed restart.
    pub crash_loop: bool,
    /// Why it is in this state (exit code, health-check failure, start failure).
    pub detail: Option<String>,
    /// IPv6 address.
    pub ipv6: Ipv6Addr,
    /// IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Seconds since the current VM booted.
    pub uptime_secs: Option<u64>,
    /// Restarts since it last ran stable.
    pub restarts: u32,
    /// Log lines dropped because they could not be shipped fast enough.
    pub dropped_log_lines: u64,
}
