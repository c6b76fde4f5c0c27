//! VMM drivers behind one trait: `firecracker` (production) and `qemu` (KVM or, where allowed,
//! TCG), plus the host side of the host-guest channel and the guest assets.
//!
//! A driver turns a [`VmSpec`] into a running microVM whose PID 1 is kiln-init. The instance
//! config, secrets included, travels to the guest over the host-guest channel straight from
//! memory: no driver writes it to disk. Every running VM has a small state file (process id
//! and socket paths, never secrets) so a restarted agent can adopt it.

pub mod accel;
pub mod channel;
pub mod console;
mod error;
pub mod firecracker;
pub mod process;
pub mod qemu;
mod qmp;
pub mod record;
mod spec;

use std::path::Path;
use std::time::Duration;

pub use error::VmmError;
pub use kiln_guest_proto as proto;
pub use spec::{GuestAssets, VmSpec};

use channel::GuestEvents;
use record::VmRecord;

/// Which VMM runs a microVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverKind {
    /// Firecracker, the production driver (needs hardware virtualization).
    Firecracker,
    /// QEMU from the distribution: KVM with `-M microvm`, or TCG where permitted.
    Qemu,
}

impl std::str::FromStr for DriverKind {
    type Err = VmmError;

    fn from_str(value: &str) -> Result<DriverKind, VmmError> {
        match value {
            "firecracker" => Ok(DriverKind::Firecracker),
            "qemu" => Ok(DriverKind::Qemu),
            other => Err(VmmError::UnknownDriver(other.to_owned())),
        }
    }
}

/// Lifecycle state of a microVM as the driver observes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Created: files prepared, VMM process not started.
    Created,
    /// The VMM process is running.
    Running,
    /// The VMM process has exited.
    Stopped,
}

/// A VMM driver. One value serves many microVMs; each VM is a [`Driver::Vm`] handle.
///
/// Lifecycle: [`create`](Driver::create) prepares the VM's directory and command line,
/// [`start`](Driver::start) launches the VMM and delivers the instance config when kiln-init
/// says hello, [`stop`](Driver::stop) asks the workload to end and kills the VMM after the
/// timeout, [`kill`](Driver::kill) ends it at once. [`adopt`](Driver::adopt) re-attaches to a
/// VM started by an earlier agent process.
pub trait Driver: Send + Sync {
    /// Handle of one microVM of this driver.
    type Vm: Send;

    /// Validates the spec and prepares the VM's state directory. Starts nothing.
    fn create(&self, spec: VmSpec) -> impl Future<Output = Result<Self::Vm, VmmError>> + Send;

    /// Starts the VMM, waits for kiln-init's hello within the spec's boot timeout and sends
    /// it `config`. Returns the stream of messages from the guest.
    fn start(
        &self,
        vm: &mut Self::Vm,
        config: proto::InstanceConfig,
    ) -> impl Future<Output = Result<GuestEvents, VmmError>> + Send;

    /// Sends the workload its stop signal and waits up to `timeout` for the VM to power off;
    /// kills the VMM after that. Returns the state reached.
    fn stop(
        &self,
        vm: &mut Self::Vm,
        timeout: Duration,
    ) -> impl Future<Output = Result<VmState, VmmError>> + Send;

    /// Kills the VMM process at once and waits for it to exit.
    fn kill(&self, vm: &mut Self::Vm) -> impl Future<Output = Result<(), VmmError>> + Send;

    /// Returns the VM's current state.
    fn state(&self, vm: &mut Self::Vm) -> VmState;

    /// Returns the path of the VM's captured serial console.
    fn console_path<'a>(&self, vm: &'a Self::Vm) -> &'a Path;

    /// Re-attaches to a running VM from its state file after an agent restart. Returns the
    /// handle and a fresh stream of guest messages.
    fn adopt(
        &self,
        record: VmRecord,
    ) -> impl Future<Output = Result<(Self::Vm, GuestEvents), VmmError>> + Send;
}
