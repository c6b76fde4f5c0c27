//! What the agent needs from the image pipeline, the VMM drivers and host networking, as small
//! traits. The reconcile logic depends only on these, so it is tested without real images or
//! microVMs; the binary wires in the real implementations.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use kiln_api::types::{ImageRef, InstanceSecrets};
use kiln_core::InstanceId;
use serde::{Deserialize, Serialize};

use crate::logs::LogSink;

/// A boxed error from an implementation, printed with its chain at the edge.
pub type RuntimeError = Box<dyn std::error::Error + Send + Sync>;

/// An image ready to boot: its read-only root filesystem, built once per digest.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// Manifest digest.
    pub digest: String,
    /// The read-only ext4 root filesystem.
    pub rootfs: PathBuf,
    /// The image's entrypoint plus cmd, used when the assignment has no command.
    pub default_command: Vec<String>,
    /// The image's working directory.
    pub working_dir: Option<String>,
    /// The image's user as written in its config (for messages).
    pub user: Option<String>,
    /// The user id the workload runs as, resolved from the image's `/etc/passwd`.
    pub uid: u32,
    /// The group id the workload runs as.
    pub gid: u32,
    /// Environment variables from the image config, overridden by the assignment's.
    pub env: BTreeMap<String, String>,
}

/// The image pipeline.
#[allow(async_fn_in_trait)]
pub trait Images {
    /// Pulls (or finds in the cache) and builds the root filesystem of `image`.
    async fn prepare(&self, image: &ImageRef) -> Result<PreparedImage, RuntimeError>;

    /// Creates the instance's writable disk of `size_mib` at `path` unless it exists.
    async fn create_disk(&self, path: &std::path::Path, size_mib: u64) -> Result<(), RuntimeError>;
}

/// The guest's network identity as kiln-init configures it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    /// The TAP device the VMM attaches to.
    pub tap: String,
    /// The guest's MAC.
    pub mac: String,
    /// The guest's /128.
    pub ipv6: Ipv6Addr,
    /// The IPv6 gateway (link-local, on the TAP's host side).
    pub ipv6_gateway: Ipv6Addr,
    /// The guest's private IPv4 /32.
    pub ipv4: Ipv4Addr,
    /// The IPv4 gateway, reached on link.
    pub ipv4_gateway: Ipv4Addr,
}

/// Everything a driver needs to boot one instance.
pub struct VmSpec {
    /// The instance.
    pub instance: InstanceId,
    /// Directory for this instance's sockets, pid file and disk; the driver finds a running
    /// VM again from it after an agent restart.
    pub run_dir: PathBuf,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// The image.
    pub image: PreparedImage,
    /// The writable disk.
    pub disk: PathBuf,
    /// Network identity.
    pub network: GuestNetwork,
    /// Argv of the workload.
    pub command: Vec<String>,
    /// Environment variables of the workload.
    pub env: BTreeMap<String, String>,
    /// Secret values, delivered to the guest only (never written to the host's disk).
    pub secrets: Option<InstanceSecrets>,
    /// Scripts run in the guest before the workload.
    pub startup_scripts: Vec<kiln_vmm::proto::StartupScript>,
    /// Signal sent to the workload to stop it, such as `SIGTERM`.
    pub kill_signal: String,
    /// Where the driver sends the console and the workload's stdout and stderr.
    pub logs: LogSink,
}

/// A driver's reference to a running VM, stored in the instance record so a restarted agent
/// can act on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHandle {
    /// The VMM process id.
    pub pid: u32,
    /// Driver-specific data (socket paths and such).
    #[serde(default)]
    pub data: serde_json::Value,
}

/// What a driver observed about a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmStatus {
    /// The VM runs.
    Running,
    /// The VM is gone; the workload's exit code when kiln-init reported one.
    Exited {
        /// Exit code of the workload.
        code: Option<i32>,
    },
}

/// A socket the guest listens on, as kiln-init reports it.
pub type ListeningSocket = SocketAddr;

/// A VMM driver.
#[allow(async_fn_in_trait)]
pub trait Vms {
    /// Boots a VM and returns once the VMM runs (not once the workload is ready).
    async fn boot(&self, spec: VmSpec) -> Result<VmHandle, RuntimeError>;

    /// Finds the VM booted for `instance` in `run_dir`, if it still runs, reattaching its
    /// log output to `logs`.
    async fn adopt(
        &self,
        instance: InstanceId,
        run_dir: &std::path::Path,
        logs: LogSink,
    ) -> Result<Option<VmHandle>, RuntimeError>;

    /// Observes the VM.
    async fn status(&self, handle: &VmHandle) -> Result<VmStatus, RuntimeError>;

    /// Asks the guest to stop (the assignment's kill signal goes to the workload through
    /// kiln-init) and returns at once; the driver stops the VM hard when `timeout` passes.
    async fn stop(
        &self,
        handle: &VmHandle,
        timeout: std::time::Duration,
    ) -> Result<(), RuntimeError>;

    /// Stops the VM at once.
    async fn kill(&self, handle: &VmHandle) -> Result<(), RuntimeError>;

    /// Asks kiln-init which sockets the guest listens on.
    async fn listening_sockets(
        &self,
        handle: &VmHandle,
    ) -> Result<Vec<ListeningSocket>, RuntimeError>;
}

/// One instance's network as the agent asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRequest {
    /// The instance.
    pub instance: InstanceId,
    /// Its org.
    pub org: kiln_core::OrgId,
    /// Its IPv6 /128.
    pub ipv6: Ipv6Addr,
    /// Its private IPv4.
    pub ipv4: Ipv4Addr,
}

/// Host networking.
#[allow(async_fn_in_trait)]
pub trait HostNetwork {
    /// Makes the host's networking match `instances`, the complete set; returns the guest
    /// side of each instance's network.
    async fn apply(
        &mut self,
        instances: &[NetworkRequest],
    ) -> Result<BTreeMap<InstanceId, GuestNetwork>, RuntimeError>;
}
