//! The read-only cluster snapshot the scheduler decides over: hosts with their capacity and
//! state, and the instances that hold resources on them.
//!
//! The control plane builds a snapshot from its projections; nothing here reads a clock, a
//! database or a random source, so the same snapshot always yields the same decisions.

use kiln_core::{EnvId, HostId, InstanceId, ProcessName};
use serde::{Deserialize, Serialize};

/// Whether a host accepts new instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Heartbeating and accepting new instances.
    Ready,
    /// Excluded from placement by an operator; its instances keep running.
    Cordoned,
    /// Excluded from placement while its instances move elsewhere.
    Draining,
    /// Its lease expired; its instances are lost and must be rescheduled.
    Dead,
}

impl HostState {
    /// Returns whether the scheduler may place new instances on a host in this state.
    pub fn accepts_instances(self) -> bool {
        self == Self::Ready
    }
}

/// One host as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// Id of the host.
    pub id: HostId,
    /// Operator-facing name, used in explanations ("the largest free is 1536 MiB on host h3").
    pub name: String,
    /// Physical memory in MiB, as the agent reports it.
    pub memory_mib: u64,
    /// Physical CPU threads, as the agent reports them.
    pub cpus: u32,
    /// Whether the host accepts new instances.
    pub state: HostState,
}

/// Resources one instance asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// Guest memory in MiB, not counting the per-VM overhead.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
}

/// An instance that holds resources on a host: running, starting or still draining.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedInstance {
    /// Id of the instance.
    pub id: InstanceId,
    /// Environment the instance serves.
    pub env: EnvId,
    /// Process type the instance runs.
    pub process: ProcessName,
    /// Host the instance is placed on.
    pub host: HostId,
    /// Resources the instance holds.
    pub resources: Resources,
}

/// Hosts and the instances on them, as read from the control plane's projections.
///
/// Order does not matter: the scheduler sorts by id before deciding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSnapshot {
    /// Every known host, whatever its state.
    pub hosts: Vec<Host>,
    /// Every instance that holds resources on a host.
    pub instances: Vec<PlacedInstance>,
}
