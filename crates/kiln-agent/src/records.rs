//! On-disk state that lets a restarted agent re-adopt running microVMs: one record per
//! instance (`STATE_DIR/instances/ID/record.json`) and the last assignment set with its cursor
//! (`STATE_DIR/assignments.json`). Files are written to a temporary name and renamed, so a
//! crash never leaves half a record. Secrets are never part of a record.

use std::path::{Path, PathBuf};

use kiln_api::InstanceState;
use kiln_api::types::{Assignment, HostAssignments};
use kiln_core::InstanceId;
use serde::{Deserialize, Serialize};

use crate::runtime::VmHandle;

/// Name of an instance's record file in its run directory.
const RECORD_FILE: &str = "record.json";

/// A failed read or write of agent state.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Reading or writing a file failed.
    #[error("failed to {operation} {path}")]
    Io {
        /// What was attempted, such as `write`.
        operation: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A record is not valid JSON for its type.
    #[error("invalid agent state file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        #[source]
        source: serde_json::Error,
    },
}

/// What the agent remembers about one instance across restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The assignment the instance was started from.
    pub assignment: Assignment,
    /// The VM, once booted.
    pub vm: Option<VmHandle>,
    /// Restarts since it last ran stable.
    pub restarts: u32,
    /// How a run-once instance ended; set when it is cleaned up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<FinishedRun>,
}

/// The result of a run-once instance (a release command), kept after its cleanup so that a
/// restarted agent neither runs it again nor loses its exit code and output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishedRun {
    /// `exited` or `failed`.
    pub state: InstanceState,
    /// Detail of the final report.
    pub detail: Option<String>,
    /// The workload's exit code, when known.
    pub exit_code: Option<i32>,
    /// Its last output lines.
    pub output: Vec<String>,
}

/// The agent's state directory layout.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Uses `root` (created when missing).
    pub fn new(root: &Path) -> Result<Self, RecordError> {
        let state = Self {
            root: root.to_path_buf(),
        };
        create_dir(&state.instances_dir())?;
        create_dir(&state.root.join("logs"))?;
        Ok(state)
    }

    /// Returns the root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn instances_dir(&self) -> PathBuf {
        self.root.join("instances")
    }

    /// Returns the directory of one instance's sockets, pid file and disk.
    pub fn run_dir(&self, instance: InstanceId) -> PathBuf {
        self.instances_dir().join(instance.to_string())
    }

    /// Returns the directory of one instance's logs.
    pub fn log_dir(&self, instance: InstanceId) -> PathBuf {
        self.root.join("logs").join(instance.to_string())
    }

    /// Returns the path of the status snapshot `kiln-agent status` reads.
    pub fn status_file(&self) -> PathBuf {
        self.root.join("status.json")
    }

    /// Saves one instance's record.
    pub fn save_record(&self, record: &InstanceRecord) -> Result<(), RecordError> {
        let dir = self.run_dir(record.assignment.instance_id);
        create_dir(&dir)?;
        write_json(&dir.join(RECORD_FILE), record)
    }

    /// Loads every instance record.
    pub fn load_records(&self) -> Result<Vec<InstanceRecord>, RecordError> {
        let dir = self.instances_dir();
        let entries = std::fs::read_dir(&dir).map_err(|source| RecordError::Io {
            operation: "list",
            path: dir.clone(),
            source,
        })?;
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path().join(RECORD_FILE);
            if path.exists() {
                records.push(read_json(&path)?);
            }
        }
        Ok(records)
    }

    /// Removes an instance's run directory (record, disk, sockets).
    pub fn remove_run_dir(&self, instance: InstanceId) -> Result<(), RecordError> {
        remove_dir(&self.run_dir(instance))
    }

    /// Removes everything in an instance's run directory (disk, sockets, VM state) but its
    /// record.
    pub fn remove_run_files(&self, instance: InstanceId) -> Result<(), RecordError> {
        let dir = self.run_dir(instance);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(RecordError::Io {
                    operation: "list",
                    path: dir,
                    source,
                });
            }
        };
        for entry in entries.flatten() {
            if entry.file_name() == RECORD_FILE {
                continue;
            }
            let path = entry.path();
            let removed = if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match removed {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(RecordError::Io {
                        operation: "remove",
                        path,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Removes an instance's logs.
    pub fn remove_logs(&self, instance: InstanceId) -> Result<(), RecordError> {
        remove_dir(&self.log_dir(instance))
    }

    /// Saves the last assignment set and its cursor.
    pub fn save_assignments(&self, assignments: &HostAssignments) -> Result<(), RecordError> {
        write_json(&self.root.join("assignments.json"), assignments)
    }

    /// Loads the last assignment set, if one was saved.
    pub fn load_assignments(&self) -> Result<Option<HostAssignments>, RecordError> {
        let path = self.root.join("assignments.json");
        if !path.exists() {
            return Ok(None);
        }
        read_json(&path).map(Some)
    }
}

/// Writes `value` as JSON to `path` through a temporary file and a rename.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), RecordError> {
    let temporary = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| RecordError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(&temporary, bytes).map_err(|source| RecordError::Io {
        operation: "write",
        path: temporary.clone(),
        source,
    })?;
    std::fs::rename(&temporary, path).map_err(|source| RecordError::Io {
        operation: "rename into place",
        path: path.to_path_buf(),
        source,
    })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, RecordError> {
    let bytes = std::fs::read(path).map_err(|source| RecordError::Io {
        operation: "read",
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| RecordError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(path: &Path) -> Result<(), RecordError> {
    std::fs::create_dir_all(path).map_err(|source| RecordError::Io {
        operation: "create",
        path: path.to_path_buf(),
        source,
    })
}

fn remove_dir(path: &Path) -> Result<(), RecordError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RecordError::Io {
            operation: "remove",
            path: path.to_path_buf(),
            source,
        }),
    }
}
