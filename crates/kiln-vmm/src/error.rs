//! Errors of the VMM drivers: one variant per failing step, carrying the values involved.

use std::path::PathBuf;
use std::time::Duration;

use kiln_core::InstanceId;

/// Error of a VMM driver operation.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The driver name is not one of the known drivers.
    #[error("unknown VMM driver {0:?}: expected \"qemu\" or \"firecracker\"")]
    UnknownDriver(String),

    /// The spec is invalid.
    #[error("invalid VM spec for instance {instance}: {reason}")]
    InvalidSpec {
        /// Instance the spec is for.
        instance: InstanceId,
        /// What is wrong and how to fix it.
        reason: String,
    },

    /// A file the VM needs is missing.
    #[error("{what} {path} does not exist; {hint}")]
    MissingFile {
        /// Which file (kernel, initramfs, image disk, ...).
        what: &'static str,
        /// The path looked at.
        path: PathBuf,
        /// How to produce it.
        hint: &'static str,
    },

    /// Neither hardware virtualization nor permitted software virtualization is available.
    #[error(
        "hardware virtualization is not usable on this host ({reason}) and software \
         virtualization is not permitted; set allow_software_virtualization = true in the \
         agent config to use QEMU with TCG (slow; for development and tests only)"
    )]
    NoAccelerator {
        /// Why hardware virtualization is not usable.
        reason: String,
    },

    /// The driver needs hardware virtualization, which this host lacks.
    #[error(
        "the {driver} driver needs hardware virtualization, which is not usable here: {reason}"
    )]
    NeedsHardwareVirtualization {
        /// Driver name.
        driver: &'static str,
        /// Why hardware virtualization is not usable.
        reason: String,
    },

    /// A filesystem operation on the VM's state directory failed.
    #[error("{operation} {path} failed")]
    File {
        /// What was attempted.
        operation: &'static str,
        /// Path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// Starting the VMM process failed.
    #[error("starting {program} failed")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The VMM process exited before the guest was up.
    #[error("{program} exited during boot of instance {instance} ({status}); stderr: {stderr}")]
    VmmExited {
        /// Instance being booted.
        instance: InstanceId,
        /// The program.
        program: String,
        /// Its exit status.
        status: String,
        /// The tail of its standard error.
        stderr: String,
    },

    /// A socket of the VMM did not appear or accept a connection in time.
    #[error("connecting to {path} timed out after {timeout:?}")]
    ConnectTimeout {
        /// Socket path.
        path: PathBuf,
        /// How long was waited.
        timeout: Duration,
    },

    /// kiln-init did not say hello in time.
    #[error(
        "instance {instance} did not reach kiln-init within {timeout:?}; see the console log {console}"
    )]
    BootTimeout {
        /// Instance being booted.
        instance: InstanceId,
        /// How long was waited.
        timeout: Duration,
        /// Console log path.
        console: PathBuf,
    },

    /// The guest spoke a different protocol version.
    #[error(
        "guest protocol version {guest} differs from the host's {host}; rebuild the initramfs with scripts/guest-kernel"
    )]
    ProtocolVersion {
        /// Version the guest sent.
        guest: u32,
        /// Version of this host.
        host: u32,
    },

    /// Reading or writing the host-guest channel failed.
    #[error("host-guest channel of instance {instance}: {operation} failed")]
    Channel {
        /// Instance whose channel failed.
        instance: InstanceId,
        /// What was attempted.
        operation: &'static str,
        /// The cause.
        #[source]
        source: kiln_guest_proto::FrameError,
    },

    /// The guest closed the channel or the VMM exited while a message was expected.
    #[error("host-guest channel of instance {instance} closed while waiting for {expected}")]
    ChannelClosed {
        /// Instance whose channel closed.
        instance: InstanceId,
        /// What the host waited for.
        expected: &'static str,
    },

    /// A QMP command failed.
    #[error("QMP command {command} on {socket} failed: {message}")]
    Qmp {
        /// The command.
        command: String,
        /// The QMP socket.
        socket: PathBuf,
        /// QEMU's error description or the I/O error.
        message: String,
    },

    /// A Firecracker API request failed.
    #[error("Firecracker API {method} {path} failed: {message}")]
    FirecrackerApi {
        /// HTTP method.
        method: &'static str,
        /// Request path.
        path: String,
        /// Status line and body, or the I/O error.
        message: String,
    },

    /// The state file of a VM cannot be read or does not describe a live VMM.
    #[error("cannot adopt the VM of state file {path}: {reason}")]
    Adopt {
        /// State file path.
        path: PathBuf,
        /// Why adoption failed.
        reason: String,
    },

    /// The operation needs a running VM.
    #[error("instance {instance} is not running")]
    NotRunning {
        /// The instance.
        instance: InstanceId,
    },
}
