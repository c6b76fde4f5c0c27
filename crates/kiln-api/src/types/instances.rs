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

/// Body of `POST /v1/host/instances/states`: state changes of instances on the calling host,
/// recorded in the order given, all in one append.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ReportInstanceStates {
    /// The reports, oldest first; at most [`MAX_STATE_REPORTS`].
    pub reports: Vec<InstanceStateReport>,
}

/// One report of [`ReportInstanceStates`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct InstanceStateReport {
    /// The instance.
    pub instance_id: InstanceId,
    /// The new state.
    pub state: InstanceState,
    /// Detail such as "health check: connection refused on [fd00::1]:8080".
    #[serde(default)]
    pub detail: Option<String>,
    /// Exit code, for `exited` and `failed`.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Last output lines of a run-once instance, for `exited` and `failed`; at most
    /// [`MAX_REPORTED_OUTPUT_LINES`] lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output: Vec<String>,
}

impl InstanceStateReport {
    /// Pairs a single-instance report with its instance.
    pub fn new(instance_id: InstanceId, report: ReportInstanceState) -> Self {
        Self {
            instance_id,
            state: report.state,
            detail: report.detail,
            exit_code: report.exit_code,
            output: report.output,
        }
    }
}

impl InstanceStateReport {
    /// Returns whether the report records how the instance ended (an exit code or output),
    /// which a later report must never replace.
    pub fn records_an_end(&self) -> bool {
        self.state.is_terminal() || self.exit_code.is_some() || !self.output.is_empty()
    }
}

/// Drops every queued report that a later report of the same instance supersedes: a state the
/// instance has already left, with no exit code or output. An agent that queues reports faster
/// than the control plane takes them (many microVMs booting at once, or an outage) then sends
/// each instance's latest state instead of every step it went through. Reports that record an
/// end are kept, so no exit is lost. The order of the kept reports is unchanged.
pub fn coalesce_reports(reports: Vec<InstanceStateReport>) -> Vec<InstanceStateReport> {
    let mut latest = std::collections::BTreeMap::new();
    for (index, report) in reports.iter().enumerate() {
        latest.insert(report.instance_id, index);
    }
    reports
        .into_iter()
        .enumerate()
        .filter(|(index, report)| {
            latest.get(&report.instance_id) == Some(index) || report.records_an_end()
        })
        .map(|(_, report)| report)
        .collect()
}

/// Response of `POST /v1/host/instances/states`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ReportedInstanceStates {
    /// Reports recorded.
    pub recorded: u32,
    /// Instances named in the batch that are not placed on the calling host (removed since
    /// the report was made, for example). Their reports were dropped; sending them again
    /// changes nothing.
    pub unknown: Vec<InstanceId>,
}

/// Most reports one `POST /v1/host/instances/states` may carry.
pub const MAX_STATE_REPORTS: usize = 500;

/// Most output lines a state report may carry.
pub const MAX_REPORTED_OUTPUT_LINES: usize = 50;

/// Maximum length in bytes of a state report's detail.
pub const MAX_REPORT_DETAIL_BYTES: usize = 4096;

impl ReportInstanceState {
    /// Returns the report cut to what the control plane accepts: the detail and each output
    /// line shortened at a character boundary, only the last output lines kept, and NUL (which
    /// the control plane cannot store) replaced by U+FFFD. An agent sends only reports cut so,
    /// because a refused report would be dropped, and with it an exit.
    pub fn within_limits(mut self) -> Self {
        if let Some(detail) = self.detail.take() {
            self.detail = Some(cut_text(&detail, MAX_REPORT_DETAIL_BYTES));
        }
        let extra = self.output.len().saturating_sub(MAX_REPORTED_OUTPUT_LINES);
        self.output.drain(..extra);
        for line in &mut self.output {
            *line = cut_text(line, MAX_REPORTED_OUTPUT_LINE_BYTES);
        }
        self
    }
}

/// Replaces NUL by U+FFFD, then cuts `text` to at most `max` bytes at a character boundary.
fn cut_text(text: &str, max: usize) -> String {
    let mut clean = text.replace('\0', "\u{FFFD}");
    if clean.len() > max {
        let mut end = max;
        while !clean.is_char_boundary(end) {
            end -= 1;
        }
        clean.truncate(end);
    }
    clean
}

/// Maximum length in bytes of one output line in a state report.
pub const MAX_REPORTED_OUTPUT_LINE_BYTES: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn report(instance_id: InstanceId, state: InstanceState) -> InstanceStateReport {
        InstanceStateReport {
            instance_id,
            state,
            detail: None,
            exit_code: None,
            output: Vec::new(),
        }
    }

    #[test]
    fn coalescing_keeps_latest_states_and_every_end() {
        let (a, b, c) = (InstanceId::new(), InstanceId::new(), InstanceId::new());
        let mut first_exit = report(b, InstanceState::Exited);
        first_exit.exit_code = Some(2);
        let mut with_output = report(c, InstanceState::Running);
        with_output.output = vec!["started".to_owned()];
        let queued = vec![
            report(a, InstanceState::Preparing),
            report(b, InstanceState::Running),
            report(a, InstanceState::Booting),
            first_exit.clone(),
            with_output.clone(),
            report(b, InstanceState::Preparing),
            report(a, InstanceState::Healthy),
            report(c, InstanceState::Healthy),
        ];

        let coalesced = coalesce_reports(queued);

        assert_eq!(
            coalesced,
            vec![
                first_exit,
                with_output,
                report(b, InstanceState::Preparing),
                report(a, InstanceState::Healthy),
                report(c, InstanceState::Healthy),
            ]
        );
        assert!(coalesce_reports(Vec::new()).is_empty());
    }

    #[test]
    fn reports_are_cut_to_the_limits() {
        let long_detail = format!("{}é{}", "d".repeat(MAX_REPORT_DETAIL_BYTES - 1), "tail");
        let mut output: Vec<String> = (0..MAX_REPORTED_OUTPUT_LINES + 5)
            .map(|n| format!("line {n}"))
            .collect();
        output.push("nul\0byte".to_owned());
        output.push("x".repeat(MAX_REPORTED_OUTPUT_LINE_BYTES + 10));
        let report = ReportInstanceState {
            state: InstanceState::Exited,
            detail: Some(long_detail),
            exit_code: Some(1),
            output,
        }
        .within_limits();

        let detail = report.detail.unwrap();
        assert_eq!(
            detail,
            "d".repeat(MAX_REPORT_DETAIL_BYTES - 1),
            "cut before the é"
        );
        assert_eq!(report.output.len(), MAX_REPORTED_OUTPUT_LINES);
        assert_eq!(report.output[0], "line 7", "the last lines are kept");
        assert_eq!(
            report.output[MAX_REPORTED_OUTPUT_LINES - 2],
            "nul\u{FFFD}byte"
        );
        assert_eq!(
            report.output[MAX_REPORTED_OUTPUT_LINES - 1].len(),
            MAX_REPORTED_OUTPUT_LINE_BYTES
        );
        assert_eq!(report.exit_code, Some(1));
    }
}
