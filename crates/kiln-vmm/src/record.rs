//! The state file of a running VM: what a restarted agent needs to adopt it. It holds process
//! ids and socket paths only; the instance config and its secrets are never written here.

use std::path::{Path, PathBuf};

use kiln_core::InstanceId;
use serde::{Deserialize, Serialize};

use crate::accel::Accelerator;
use crate::{DriverKind, VmmError};

/// File name of the state file inside the VM's state directory.
pub const RECORD_FILE: &str = "vm.json";

/// A running VM as written to its state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    /// The instance the VM runs.
    pub instance: InstanceId,
    /// Driver that started the VM.
    pub driver: DriverKind,
    /// Accelerator the VM runs with.
    pub accelerator: Accelerator,
    /// Process id of the VMM.
    pub pid: u32,
    /// The VM's state directory.
    pub state_dir: PathBuf,
    /// Control socket: QMP for QEMU, the API socket for Firecracker.
    pub control_socket: PathBuf,
    /// Host end of the host-guest channel (a listening socket for Firecracker's vsock, the
    /// chardev socket for QEMU).
    pub channel_socket: PathBuf,
    /// Console socket of the VMM, when it has one (QEMU).
    pub console_socket: Option<PathBuf>,
    /// Captured console log.
    pub console_log: PathBuf,
    /// Maximum console log size in bytes before rotation.
    pub console_limit_bytes: u64,
    /// Signal number a graceful stop sends to the workload.
    pub kill_signal: i32,
}

impl VmRecord {
    /// Writes the record atomically (temporary file, then rename) to its state directory.
    pub fn save(&self) -> Result<(), VmmError> {
        let path = self.state_dir.join(RECORD_FILE);
        let temporary = self.state_dir.join(format!("{RECORD_FILE}.tmp"));
        let json = serde_json::to_vec_pretty(self).unwrap_or_default();
        std::fs::write(&temporary, json).map_err(|source| VmmError::File {
            operation: "write state file",
            path: temporary.clone(),
            source,
        })?;
        std::fs::rename(&temporary, &path).map_err(|source| VmmError::File {
            operation: "rename state file to",
            path,
            source,
        })
    }

    /// Reads the record in `state_dir`.
    pub fn load(state_dir: &Path) -> Result<VmRecord, VmmError> {
        let path = state_dir.join(RECORD_FILE);
        let bytes = std::fs::read(&path).map_err(|source| VmmError::File {
            operation: "read state file",
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|error| VmmError::Adopt {
            path,
            reason: format!("invalid state file: {error}"),
        })
    }

    /// Checks that the recorded process is alive and is the expected VMM program, so a reused
    /// pid is never adopted (or killed).
    pub fn check_alive(&self, program_name: &str) -> Result<(), VmmError> {
        let path = self.state_dir.join(RECORD_FILE);
        let cmdline =
            std::fs::read(format!("/proc/{}/cmdline", self.pid)).map_err(|_| VmmError::Adopt {
                path: path.clone(),
                reason: format!("process {} is not running", self.pid),
            })?;
        let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
        let name = Path::new(std::str::from_utf8(argv0).unwrap_or_default())
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default();
        if !name.starts_with(program_name) {
            return Err(VmmError::Adopt {
                path,
                reason: format!(
                    "process {} is {name:?}, not {program_name}; the pid was reused",
                    self.pid
                ),
            });
        }
        Ok(())
    }
}
