//! The reconcile decision: a pure function from the desired assignments and the actual state
//! of the instances this agent tracks to the actions that move one toward the other. The
//! executor ([`crate::agent`]) carries the actions out.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kiln_api::types::{Assignment, DesiredState};
use kiln_core::InstanceId;

/// Restarts after which an instance that keeps exiting counts as crash-looping.
pub const CRASH_LOOP_RESTARTS: u32 = 3;

/// First restart delay; it doubles with every restart up to [`MAX_RESTART_DELAY`].
pub const FIRST_RESTART_DELAY: Duration = Duration::from_secs(1);

/// Maximum restart delay.
pub const MAX_RESTART_DELAY: Duration = Duration::from_secs(300);

/// Running this long without exiting resets the restart count.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Where an instance is in its life, as the agent tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// The VMM runs; no health check has passed yet.
    Running,
    /// The last health check passed.
    Healthy,
    /// Health checks fail after the grace period.
    Unhealthy,
    /// The kill signal was sent; the VM is stopped hard at `deadline`.
    Stopping {
        /// When the kill timeout ends.
        deadline: Instant,
    },
    /// The VM is gone. Whether it is restarted depends on the desired state.
    Exited {
        /// The workload's exit code, when known.
        code: Option<i32>,
    },
    /// Starting failed (image, network, boot); `reason` names the step.
    Failed {
        /// What failed.
        reason: String,
    },
}

impl Phase {
    /// Reports whether a VM may be running in this phase.
    pub fn has_vm(&self) -> bool {
        matches!(
            self,
            Self::Running | Self::Healthy | Self::Unhealthy | Self::Stopping { .. }
        )
    }
}

/// An instance as the agent tracks it.
#[derive(Debug, Clone)]
pub struct Tracked {
    /// The assignment it was started from.
    pub assignment: Assignment,
    /// Its phase.
    pub phase: Phase,
    /// When the current VM booted.
    pub booted_at: Option<Instant>,
    /// Restarts since it last ran stable.
    pub restarts: u32,
    /// When the next start is allowed (restart backoff).
    pub next_start_at: Option<Instant>,
    /// When the next health check is due.
    pub next_probe_at: Option<Instant>,
    /// Health checks failed in a row since the last one that passed.
    pub probe_failures: u32,
    /// Whether its disk, TAP and run directory still exist.
    pub has_resources: bool,
}

impl Tracked {
    /// Reports whether the instance keeps exiting and waits for a delayed restart.
    pub fn is_crash_looping(&self) -> bool {
        self.restarts >= CRASH_LOOP_RESTARTS
            && matches!(self.phase, Phase::Exited { .. } | Phase::Failed { .. })
    }
}

/// One step for the executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Prepare the image, disk, network and secrets, then boot.
    Start(InstanceId),
    /// Run a health check.
    Probe(InstanceId),
    /// Send the kill signal through the guest.
    Stop(InstanceId),
    /// The kill timeout passed: stop the VM hard.
    Kill(InstanceId),
    /// Remove the disk, TAP and run directory of a VM that is gone.
    Cleanup(InstanceId),
    /// Stop tracking an instance that is gone and no longer assigned.
    Forget(InstanceId),
}

/// Returns the restart delay after `restarts` restarts: 1 s, 2 s, 4 s, ... up to 5 minutes.
pub fn restart_delay(restarts: u32) -> Duration {
    let exponent = restarts.saturating_sub(1).min(16);
    FIRST_RESTART_DELAY
        .saturating_mul(1 << exponent)
        .min(MAX_RESTART_DELAY)
}

/// Decides the actions that move `actual` toward `desired` at time `now`.
pub fn plan(
    desired: &BTreeMap<InstanceId, Assignment>,
    actual: &BTreeMap<InstanceId, Tracked>,
    now: Instant,
) -> Vec<Action> {
    let mut actions = Vec::new();

    for (id, assignment) in desired {
        let wants_running = assignment.desired == DesiredState::Running;
        match (actual.get(id), wants_running) {
            (None, true) => actions.push(Action::Start(*id)),
            (None, false) => {}
            (Some(tracked), true) => plan_running(*id, tracked, now, &mut actions),
            (Some(tracked), false) => plan_stopped(*id, tracked, now, false, &mut actions),
        }
    }

    for (id, tracked) in actual {
        if !desired.contains_key(id) {
            plan_stopped(*id, tracked, now, true, &mut actions);
        }
    }
    actions
}

fn plan_running(id: InstanceId, tracked: &Tracked, now: Instant, actions: &mut Vec<Action>) {
    if tracked.assignment.run_once {
        plan_run_once(id, tracked, now, actions);
        return;
    }
    match &tracked.phase {
        Phase::Running | Phase::Healthy | Phase::Unhealthy => {
            if tracked.next_probe_at.is_none_or(|due| due <= now) {
                actions.push(Action::Probe(id));
            }
        }
        Phase::Stopping { deadline } => {
            if *deadline <= now {
                actions.push(Action::Kill(id));
            }
        }
        Phase::Exited { .. } | Phase::Failed { .. } => {
            if tracked.next_start_at.is_none_or(|due| due <= now) {
                actions.push(Action::Start(id));
            }
        }
    }
}

/// A run-once instance (a release command) is never health-checked and never started again:
/// once it has exited or failed, its resources go.
fn plan_run_once(id: InstanceId, tracked: &Tracked, now: Instant, actions: &mut Vec<Action>) {
    match &tracked.phase {
        Phase::Running | Phase::Healthy | Phase::Unhealthy => {}
        Phase::Stopping { deadline } => {
            if *deadline <= now {
                actions.push(Action::Kill(id));
            }
        }
        Phase::Exited { .. } | Phase::Failed { .. } => {
            if tracked.has_resources {
                actions.push(Action::Cleanup(id));
            }
        }
    }
}

fn plan_stopped(
    id: InstanceId,
    tracked: &Tracked,
    now: Instant,
    unassigned: bool,
    actions: &mut Vec<Action>,
) {
    match &tracked.phase {
        Phase::Running | Phase::Healthy | Phase::Unhealthy => actions.push(Action::Stop(id)),
        Phase::Stopping { deadline } => {
            if *deadline <= now {
                actions.push(Action::Kill(id));
            }
        }
        Phase::Exited { .. } | Phase::Failed { .. } => {
            if tracked.has_resources {
                actions.push(Action::Cleanup(id));
            } else if unassigned {
                actions.push(Action::Forget(id));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kiln_api::types::{ImageRef, InstanceNetwork};
    use kiln_core::{AppId, EnvId, OrgId, ReleaseId};

    use super::*;

    fn assignment(desired: DesiredState) -> Assignment {
        Assignment {
            instance_id: InstanceId::new(),
            org_id: OrgId::new(),
            org: "acme".parse().unwrap(),
            app_id: AppId::new(),
            app: "web".parse().unwrap(),
            env_id: EnvId::new(),
            env: "prod".parse().unwrap(),
            release_id: ReleaseId::new(),
            release_version: 1,
            process: "web".parse().unwrap(),
            image: ImageRef {
                reference: "registry.test/web:1".to_owned(),
                digest: format!("sha256:{}", "a".repeat(64)),
            },
            command: Vec::new(),
            env_vars: BTreeMap::new(),
            secrets_version: 0,
            vcpus: 1,
            memory_mib: 128,
            network: InstanceNetwork {
                ipv6: "fd00::2".parse().unwrap(),
                ipv6_prefix: "fd00::/64".to_owned(),
                ipv4: "100.64.0.2".parse().unwrap(),
            },
            ports: Vec::new(),
            volumes: Vec::new(),
            kill_signal: "SIGTERM".to_owned(),
            kill_timeout_secs: 10,
            hostname: None,
            startup_scripts: Vec::new(),
            desired,
            run_once: false,
        }
    }

    fn tracked(assignment: &Assignment, phase: Phase) -> Tracked {
        Tracked {
            assignment: assignment.clone(),
            phase,
            booted_at: None,
            restarts: 0,
            next_start_at: None,
            next_probe_at: None,
            probe_failures: 0,
            has_resources: true,
        }
    }

    fn one(assignment: &Assignment) -> BTreeMap<InstanceId, Assignment> {
        BTreeMap::from([(assignment.instance_id, assignment.clone())])
    }

    fn one_tracked(tracked: Tracked) -> BTreeMap<InstanceId, Tracked> {
        BTreeMap::from([(tracked.assignment.instance_id, tracked)])
    }

    #[test]
    fn new_assignment_starts() {
        let a = assignment(DesiredState::Running);
        let actions = plan(&one(&a), &BTreeMap::new(), Instant::now());
        assert_eq!(actions, [Action::Start(a.instance_id)]);
    }

    #[test]
    fn stopped_assignment_never_started() {
        let a = assignment(DesiredState::Stopped);
        assert!(plan(&one(&a), &BTreeMap::new(), Instant::now()).is_empty());
    }

    #[test]
    fn running_instance_probed_when_due() {
        let now = Instant::now();
        let a = assignment(DesiredState::Running);
        let mut t = tracked(&a, Phase::Running);
        t.next_probe_at = Some(now + Duration::from_secs(1));
        assert!(plan(&one(&a), &one_tracked(t.clone()), now).is_empty());
        t.next_probe_at = Some(now);
        assert_eq!(
            plan(&one(&a), &one_tracked(t), now),
            [Action::Probe(a.instance_id)]
        );
    }

    #[test]
    fn exited_instance_waits_for_backoff() {
        let now = Instant::now();
        let a = assignment(DesiredState::Running);
        let mut t = tracked(&a, Phase::Exited { code: Some(1) });
        t.next_start_at = Some(now + Duration::from_secs(4));
        assert!(plan(&one(&a), &one_tracked(t.clone()), now).is_empty());
        let later = now + Duration::from_secs(4);
        assert_eq!(
            plan(&one(&a), &one_tracked(t), later),
            [Action::Start(a.instance_id)]
        );
    }

    #[test]
    fn failed_start_retried_after_backoff() {
        let now = Instant::now();
        let a = assignment(DesiredState::Running);
        let mut t = tracked(
            &a,
            Phase::Failed {
                reason: "image pull failed".to_owned(),
            },
        );
        t.next_start_at = Some(now);
        assert_eq!(
            plan(&one(&a), &one_tracked(t), now),
            [Action::Start(a.instance_id)]
        );
    }

    #[test]
    fn desired_stop_sends_signal_then_kills() {
        let now = Instant::now();
        let a = assignment(DesiredState::Stopped);
        let running = tracked(&a, Phase::Healthy);
        assert_eq!(
            plan(&one(&a), &one_tracked(running), now),
            [Action::Stop(a.instance_id)]
        );

        let deadline = now + Duration::from_secs(10);
        let stopping = tracked(&a, Phase::Stopping { deadline });
        assert!(plan(&one(&a), &one_tracked(stopping.clone()), now).is_empty());
        assert_eq!(
            plan(&one(&a), &one_tracked(stopping), deadline),
            [Action::Kill(a.instance_id)]
        );
    }

    #[test]
    fn stopped_instance_cleaned_but_remembered() {
        let a = assignment(DesiredState::Stopped);
        let exited = tracked(&a, Phase::Exited { code: Some(0) });
        assert_eq!(
            plan(&one(&a), &one_tracked(exited.clone()), Instant::now()),
            [Action::Cleanup(a.instance_id)]
        );
        let mut cleaned = exited;
        cleaned.has_resources = false;
        assert!(plan(&one(&a), &one_tracked(cleaned), Instant::now()).is_empty());
    }

    #[test]
    fn unassigned_instance_stopped_cleaned_forgotten() {
        let now = Instant::now();
        let a = assignment(DesiredState::Running);
        let none = BTreeMap::new();
        let id = a.instance_id;
        assert_eq!(
            plan(&none, &one_tracked(tracked(&a, Phase::Running)), now),
            [Action::Stop(id)]
        );
        let exited = tracked(&a, Phase::Exited { code: None });
        assert_eq!(
            plan(&none, &one_tracked(exited.clone()), now),
            [Action::Cleanup(id)]
        );
        let mut cleaned = exited;
        cleaned.has_resources = false;
        assert_eq!(
            plan(&none, &one_tracked(cleaned), now),
            [Action::Forget(id)]
        );
    }

    #[test]
    fn run_once_never_probed_or_restarted() {
        let now = Instant::now();
        let mut a = assignment(DesiredState::Running);
        a.run_once = true;

        let running = tracked(&a, Phase::Running);
        assert!(plan(&one(&a), &one_tracked(running), now).is_empty());

        for phase in [
            Phase::Exited { code: Some(3) },
            Phase::Failed {
                reason: "image pull failed".to_owned(),
            },
        ] {
            let mut done = tracked(&a, phase);
            done.next_start_at = Some(now);
            assert_eq!(
                plan(&one(&a), &one_tracked(done.clone()), now),
                [Action::Cleanup(a.instance_id)]
            );
            done.has_resources = false;
            assert!(plan(&one(&a), &one_tracked(done), now).is_empty());
        }
    }

    #[test]
    fn restart_delay_doubles_and_caps() {
        assert_eq!(restart_delay(1), Duration::from_secs(1));
        assert_eq!(restart_delay(2), Duration::from_secs(2));
        assert_eq!(restart_delay(5), Duration::from_secs(16));
        assert_eq!(restart_delay(40), MAX_RESTART_DELAY);
    }

    #[test]
    fn crash_loop_visible_after_restarts() {
        let a = assignment(DesiredState::Running);
        let mut t = tracked(&a, Phase::Exited { code: Some(3) });
        t.restarts = CRASH_LOOP_RESTARTS - 1;
        assert!(!t.is_crash_looping());
        t.restarts = CRASH_LOOP_RESTARTS;
        assert!(t.is_crash_looping());
        t.phase = Phase::Running;
        assert!(!t.is_crash_looping());
    }

    #[test]
    fn many_instances_planned_independently() {
        let now = Instant::now();
        let start = assignment(DesiredState::Running);
        let stop = assignment(DesiredState::Stopped);
        let desired = BTreeMap::from([
            (start.instance_id, start.clone()),
            (stop.instance_id, stop.clone()),
        ]);
        let actual = one_tracked(tracked(&stop, Phase::Running));
        let actions = plan(&desired, &actual, now);
        assert_eq!(actions.len(), 2);
        assert!(actions.contains(&Action::Start(start.instance_id)));
        assert!(actions.contains(&Action::Stop(stop.instance_id)));
    }
}
