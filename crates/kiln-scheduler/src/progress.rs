//! Progress through a plan: where to resume from recorded step outcomes, and whether a waiting
//! action is done, still waiting or failed.
//!
//! The orchestrator records one outcome per step (completed, failed, undone) in the event log.
//! After a crash it replays those records through [`position`] and carries on from there, so
//! decisions about progress stay pure and the same records always resume at the same point.

use std::collections::{BTreeMap, BTreeSet};

use kiln_core::InstanceId;
use serde::{Deserialize, Serialize};

use crate::plan::{Action, Plan};

/// The recorded outcome of one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "step")]
pub enum StepRecord {
    /// Every action of the step took effect.
    Completed(String),
    /// The step failed; the rollback starts with its undo.
    Failed(String),
    /// The undo actions of the step took effect.
    Undone(String),
}

/// Where a plan stands, given its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "position")]
pub enum Position {
    /// Step `next` runs next.
    Forward {
        /// Index of the next step.
        next: usize,
    },
    /// Step `failed` failed; the undo of step `next` runs next (counting down to 0).
    RollingBack {
        /// Index of the failed step.
        failed: usize,
        /// Index of the step whose undo runs next.
        next: usize,
    },
    /// Every step completed.
    Succeeded,
    /// A step failed and every undo up to the first step ran.
    RolledBack {
        /// Index of the failed step.
        failed: usize,
    },
}

/// Records that do not match the plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgressError {
    /// A record names a step the plan does not have.
    #[error("recorded step {step:?} is not in the plan")]
    UnknownStep {
        /// The recorded step name.
        step: String,
    },
}

/// Computes where a plan stands from its records, in the order they were recorded.
pub fn position(plan: &Plan, records: &[StepRecord]) -> Result<Position, ProgressError> {
    let index_of = |name: &str| {
        plan.steps
            .iter()
            .position(|step| step.name == name)
            .ok_or_else(|| ProgressError::UnknownStep {
                step: name.to_owned(),
            })
    };

    let mut completed = BTreeSet::new();
    let mut undone = BTreeSet::new();
    let mut failed = None;
    for record in records {
        match record {
            StepRecord::Completed(name) => {
                completed.insert(index_of(name)?);
            }
            StepRecord::Failed(name) => {
                failed.get_or_insert(index_of(name)?);
            }
            StepRecord::Undone(name) => {
                undone.insert(index_of(name)?);
            }
        }
    }

    let Some(failed) = failed else {
        let next = (0..plan.steps.len()).find(|index| !completed.contains(index));
        return Ok(match next {
            Some(next) => Position::Forward { next },
            None => Position::Succeeded,
        });
    };

    let next = (0..=failed).rev().find(|index| !undone.contains(index));
    Ok(match next {
        Some(next) => Position::RollingBack { failed, next },
        None => Position::RolledBack { failed },
    })
}

/// What the orchestrator last observed about an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Observed {
    /// Assigned, not yet reported running.
    Starting,
    /// Running, health not yet known.
    Running,
    /// Passing its health check.
    Healthy,
    /// Failing its health check; it may still recover before the deadline.
    Unhealthy,
    /// Its process exited.
    Exited {
        /// Exit code, when known.
        code: Option<i32>,
    },
    /// The agent could not start it, or its host was lost.
    Failed {
        /// What the agent reported.
        detail: Option<String>,
    },
}

/// Whether an action is finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitStatus {
    /// The action took effect.
    Done,
    /// The action needs more time.
    Waiting,
    /// The action failed; the step fails with this reason.
    Failed(WaitFailure),
}

/// Why a waiting action failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaitFailure {
    /// A new instance exited or failed before it became healthy.
    #[error("instance {instance} stopped before it became healthy ({detail})")]
    InstanceStopped {
        /// The instance.
        instance: InstanceId,
        /// Exit code or agent detail.
        detail: String,
    },
    /// Instances were not healthy by the deadline.
    #[error(
        "instances not healthy within {deadline_secs} s: {}",
        describe_pending(pending)
    )]
    HealthDeadline {
        /// The deadline, in seconds.
        deadline_secs: u64,
        /// Each instance that was not healthy, with its last observed state.
        pending: BTreeMap<InstanceId, String>,
    },
    /// The release command exited with a non-zero code or could not start.
    #[error("release command in instance {instance} failed ({detail})")]
    ReleaseCommandFailed {
        /// The one-off instance.
        instance: InstanceId,
        /// Exit code or agent detail.
        detail: String,
    },
    /// The release command did not exit in time.
    #[error("release command in instance {instance} did not exit within {timeout_secs} s")]
    ReleaseCommandTimedOut {
        /// The one-off instance.
        instance: InstanceId,
        /// The timeout, in seconds.
        timeout_secs: u64,
    },
}

fn describe_pending(pending: &BTreeMap<InstanceId, String>) -> String {
    pending
        .iter()
        .map(|(instance, state)| format!("{instance} is {state}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe(observed: Option<&Observed>) -> String {
    match observed {
        None | Some(Observed::Starting) => "starting".to_owned(),
        Some(Observed::Running) => "running, health unknown".to_owned(),
        Some(Observed::Healthy) => "healthy".to_owned(),
        Some(Observed::Unhealthy) => "unhealthy".to_owned(),
        Some(Observed::Exited { code: Some(code) }) => format!("exited with code {code}"),
        Some(Observed::Exited { code: None }) => "exited".to_owned(),
        Some(Observed::Failed {
            detail: Some(detail),
        }) => format!("failed: {detail}"),
        Some(Observed::Failed { detail: None }) => "failed".to_owned(),
    }
}

/// Evaluates an action that waits on instances, `elapsed_secs` after its step started. Actions
/// that do not wait are done once their effects are recorded, so they evaluate to `Done`.
pub fn evaluate(
    action: &Action,
    observed: &BTreeMap<InstanceId, Observed>,
    elapsed_secs: u64,
) -> WaitStatus {
    match action {
        Action::WaitHealthy {
            instances,
            deadline_secs,
        } => evaluate_health(instances, *deadline_secs, observed, elapsed_secs),
        Action::RunReleaseCommand {
            instance,
            timeout_secs,
        } => match observed.get(&instance.id) {
            Some(Observed::Exited { code: Some(0) }) => WaitStatus::Done,
            stopped @ Some(Observed::Exited { .. } | Observed::Failed { .. }) => {
                WaitStatus::Failed(WaitFailure::ReleaseCommandFailed {
                    instance: instance.id,
                    detail: describe(stopped),
                })
            }
            _ if elapsed_secs >= *timeout_secs => {
                WaitStatus::Failed(WaitFailure::ReleaseCommandTimedOut {
                    instance: instance.id,
                    timeout_secs: *timeout_secs,
                })
            }
            _ => WaitStatus::Waiting,
        },
        _ => WaitStatus::Done,
    }
}

fn evaluate_health(
    instances: &[InstanceId],
    deadline_secs: u64,
    observed: &BTreeMap<InstanceId, Observed>,
    elapsed_secs: u64,
) -> WaitStatus {
    for instance in instances {
        let state = observed.get(instance);
        if let Some(Observed::Exited { .. } | Observed::Failed { .. }) = state {
            return WaitStatus::Failed(WaitFailure::InstanceStopped {
                instance: *instance,
                detail: describe(state),
            });
        }
    }

    let pending: BTreeMap<InstanceId, String> = instances
        .iter()
        .filter(|instance| observed.get(instance) != Some(&Observed::Healthy))
        .map(|instance| (*instance, describe(observed.get(instance))))
        .collect();
    if pending.is_empty() {
        return WaitStatus::Done;
    }
    if elapsed_secs >= deadline_secs {
        return WaitStatus::Failed(WaitFailure::HealthDeadline {
            deadline_secs,
            pending,
        });
    }
    WaitStatus::Waiting
}

#[cfg(test)]
mod tests {
    use kiln_core::{DeployId, EnvId, ReleaseId};

    use super::*;
    use crate::plan::{PlanKind, Step};

    fn plan_with(names: &[&str]) -> Plan {
        Plan {
            deploy: DeployId::new(),
            env: EnvId::new(),
            kind: PlanKind::Deploy,
            base_version: 0,
            from_release: None,
            to_release: ReleaseId::new(),
            steps: names
                .iter()
                .map(|name| Step {
                    name: (*name).to_owned(),
                    actions: Vec::new(),
                    undo: Vec::new(),
                })
                .collect(),
        }
    }

    fn completed(name: &str) -> StepRecord {
        StepRecord::Completed(name.to_owned())
    }

    #[test]
    fn position_starts_at_first_step() {
        let plan = plan_with(&["a", "b"]);
        assert_eq!(position(&plan, &[]), Ok(Position::Forward { next: 0 }));
    }

    #[test]
    fn position_resumes_after_completed() {
        let plan = plan_with(&["a", "b", "c"]);
        let records = [completed("a"), completed("b")];
        assert_eq!(position(&plan, &records), Ok(Position::Forward { next: 2 }));
        let records = [completed("a"), completed("b"), completed("c")];
        assert_eq!(position(&plan, &records), Ok(Position::Succeeded));
    }

    #[test]
    fn position_rolls_back_from_failure() {
        let plan = plan_with(&["a", "b", "c"]);
        let mut records = vec![
            completed("a"),
            completed("b"),
            StepRecord::Failed("c".into()),
        ];
        assert_eq!(
            position(&plan, &records),
            Ok(Position::RollingBack { failed: 2, next: 2 })
        );
        records.push(StepRecord::Undone("c".into()));
        records.push(StepRecord::Undone("b".into()));
        assert_eq!(
            position(&plan, &records),
            Ok(Position::RollingBack { failed: 2, next: 0 })
        );
        records.push(StepRecord::Undone("a".into()));
        assert_eq!(
            position(&plan, &records),
            Ok(Position::RolledBack { failed: 2 })
        );
    }

    #[test]
    fn position_rejects_unknown_step() {
        let plan = plan_with(&["a"]);
        assert_eq!(
            position(&plan, &[completed("z")]),
            Err(ProgressError::UnknownStep { step: "z".into() })
        );
    }

    fn wait(instances: &[InstanceId]) -> Action {
        Action::WaitHealthy {
            instances: instances.to_vec(),
            deadline_secs: 60,
        }
    }

    #[test]
    fn health_wait_done_when_all_healthy() {
        let (a, b) = (InstanceId::new(), InstanceId::new());
        let mut observed = BTreeMap::from([(a, Observed::Healthy), (b, Observed::Running)]);
        assert_eq!(evaluate(&wait(&[a, b]), &observed, 5), WaitStatus::Waiting);
        observed.insert(b, Observed::Healthy);
        assert_eq!(evaluate(&wait(&[a, b]), &observed, 5), WaitStatus::Done);
    }

    #[test]
    fn health_wait_fails_on_exit() {
        let a = InstanceId::new();
        let observed = BTreeMap::from([(a, Observed::Exited { code: Some(3) })]);
        let WaitStatus::Failed(failure) = evaluate(&wait(&[a]), &observed, 1) else {
            panic!("expected a failure");
        };
        assert!(failure.to_string().contains("exited with code 3"));
    }

    #[test]
    fn unhealthy_waits_until_deadline() {
        let a = InstanceId::new();
        let observed = BTreeMap::from([(a, Observed::Unhealthy)]);
        assert_eq!(evaluate(&wait(&[a]), &observed, 59), WaitStatus::Waiting);
        let WaitStatus::Failed(failure) = evaluate(&wait(&[a]), &observed, 60) else {
            panic!("expected a failure");
        };
        assert_eq!(
            failure.to_string(),
            format!("instances not healthy within 60 s: {a} is unhealthy")
        );
    }
}
