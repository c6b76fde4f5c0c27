//! Logs: agents ship batches; the control plane keeps a bounded recent window per environment
//! for `kiln logs`.

use kiln_core::{InstanceId, ProcessName};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    /// The workload's standard output.
    Stdout,
    /// The workload's standard error.
    Stderr,
    /// The guest's serial console (kernel and kiln-init).
    Console,
    /// The agent, about this instance (boot, health, stop).
    Agent,
}

/// One log line as shipped by an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct LogLine {
    /// The instance.
    pub instance_id: InstanceId,
    /// Source.
    pub stream: LogStream,
    /// When the agent read it.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub time: OffsetDateTime,
    /// The text, without the trailing newline; at most 16 KiB.
    pub line: String,
}

/// Body of `POST /v1/host/logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct LogBatch {
    /// Lines, oldest first; every instance must be placed on the calling host.
    pub lines: Vec<LogLine>,
}

/// A log line as `kiln logs` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LogEntry {
    /// Position in the environment's window; pass as `after` for the next page.
    pub id: u64,
    /// The instance.
    pub instance_id: InstanceId,
    /// Its process type.
    pub process: ProcessName,
    /// Source.
    pub stream: LogStream,
    /// When the agent read it.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub time: OffsetDateTime,
    /// The text.
    pub line: String,
}

/// Query of `GET .../envs/{env}/logs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// Only this process type.
    #[serde(default)]
    pub process: Option<ProcessName>,
    /// Only this instance.
    #[serde(default)]
    pub instance: Option<InstanceId>,
    /// Only lines at or after this time (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::schema::optional_timestamp")
    )]
    pub since: Option<OffsetDateTime>,
    /// Only lines after this entry id (for following).
    #[serde(default)]
    pub after: Option<u64>,
    /// At most this many lines (default 500, max 5000).
    #[serde(default)]
    pub limit: Option<u32>,
    /// Seconds to wait for new lines when there are none.
    #[serde(default)]
    pub wait: Option<u64>,
}

/// Result of `GET .../envs/{env}/logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LogPage {
    /// Lines, oldest first.
    pub entries: Vec<LogEntry>,
    /// Pass as `after` to continue.
    pub cursor: u64,
}
