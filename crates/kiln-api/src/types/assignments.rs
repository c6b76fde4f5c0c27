//! Assignments: what a host must run. An agent watches its host's complete desired set and
//! reconciles against it, so a lost update cannot leave a microVM running that should not.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use kiln_core::{AppId, AppName, EnvId, EnvName, HostId, InstanceId, OrgId, OrgName};
use kiln_core::{ProcessName, ReleaseId};
use serde::{Deserialize, Serialize};

use super::instances::DesiredState;
use super::releases::{HealthCheck, ImageRef, ServiceProtocol, StartupScript, VolumeSpec};

/// A port a process listens on, with its health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ServicePort {
    /// Service name.
    pub service: String,
    /// Port inside the microVM.
    pub port: u16,
    /// Transport.
    pub protocol: ServiceProtocol,
    /// Health check; `null` means a TCP connect check with default timings.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
}

/// Network identity of an instance, decided by the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct InstanceNetwork {
    /// The instance's /128 inside the host's /64.
    pub ipv6: Ipv6Addr,
    /// The host's /64.
    pub ipv6_prefix: String,
    /// The instance's private IPv4 from 100.64.0.0/10.
    pub ipv4: Ipv4Addr,
}

/// One instance a host must run (or stop), with everything the agent needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Assignment {
    /// The instance.
    pub instance_id: InstanceId,
    /// Org id.
    pub org_id: OrgId,
    /// Org name.
    pub org: OrgName,
    /// App id.
    pub app_id: AppId,
    /// App name.
    pub app: AppName,
    /// Environment id.
    pub env_id: EnvId,
    /// Environment name.
    pub env: EnvName,
    /// Release id.
    pub release_id: ReleaseId,
    /// Release version within the environment.
    pub release_version: u64,
    /// Process type.
    pub process: ProcessName,
    /// Image pinned by digest.
    pub image: ImageRef,
    /// Argv; empty runs the image's entrypoint and cmd.
    pub command: Vec<String>,
    /// Environment variables: the manifest's, overridden by the config vars.
    pub env_vars: BTreeMap<String, String>,
    /// Version of the environment's secret set that the instance's release was made with
    /// (0: no secrets). The instance gets those secrets, so an agent may cache them by it.
    pub secrets_version: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Addresses.
    pub network: InstanceNetwork,
    /// Service ports of this process type.
    pub ports: Vec<ServicePort>,
    /// Volumes.
    pub volumes: Vec<VolumeSpec>,
    /// Signal sent to stop the workload.
    pub kill_signal: String,
    /// Seconds between the kill signal and a forced stop.
    pub kill_timeout_secs: u32,
    /// The environment's platform hostname, which HTTPS health checks send as SNI; absent
    /// from control planes that predate it.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Scripts run inside the microVM before the workload: the release's scripts that apply
    /// to this instance's process type, in order.
    pub startup_scripts: Vec<StartupScript>,
    /// Whether to run or stop it.
    pub desired: DesiredState,
    /// Runs once, as a release command: not health-checked and not restarted. Its exit code
    /// and last output lines are reported when it exits, and then it is cleaned up.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub run_once: bool,
}

/// Result of `GET /v1/host/assignments`: the host's complete desired set at a cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HostAssignments {
    /// The host.
    pub host_id: HostId,
    /// Pass as `after` to wait for the next change.
    pub cursor: u64,
    /// Every instance placed on the host that is not yet removed.
    pub assignments: Vec<Assignment>,
}
