//! The deploy planner: turns an env's state, the cluster and an intent (deploy, scale, restart,
//! replace lost instances) into a declared list of named steps, each with its undo.
//!
//! The planner decides everything up front: which instances start on which hosts, in which
//! batches, which old instances retire and in which order, and the ids of every instance it
//! creates (derived from the deploy id). A plan is therefore a value that can be shown to a
//! user, stored, bound to the env's event-log position and executed later exactly as shown.
//!
//! Executing a plan means running each step's actions in order. When a step fails, the
//! executor runs the undo actions of that step and of every earlier step, latest first
//! ([`Plan::rollback_actions`]). Undo lists are written so that this reverse order keeps the
//! env serving: an old instance that was retired is restored (started, waited for, routed)
//! before the new instances that replaced it lose their routes.

use std::collections::{BTreeMap, BTreeSet};

use kiln_core::{DeployId, EnvId, HostId, InstanceId, ProcessName, ReleaseId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Builder;

use crate::cluster::{ClusterSnapshot, HostState, Resources};
use crate::schedule::{InstanceRequest, ScheduleError, Scheduler, SchedulerConfig};

/// Default time new instances get to report healthy, in seconds.
pub const DEFAULT_HEALTH_DEADLINE_SECS: u64 = 300;

/// Default time a retiring instance gets between SIGTERM and kill, in seconds.
pub const DEFAULT_DRAIN_GRACE_SECS: u64 = 30;

/// Name of the one-off process type that runs a release command.
pub const RELEASE_COMMAND_PROCESS: &str = "release-command";

/// Name of the step that runs the release command.
pub const RELEASE_COMMAND_STEP: &str = "release-command";

/// One process type of a release as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    /// Instances wanted.
    pub count: u32,
    /// Resources of each instance.
    pub resources: Resources,
    /// Whether the ingress routes traffic to this process type, so routes move with it.
    pub routed: bool,
}

/// The release command of a release: run once, in its own microVM, before any instance is
/// replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseCommandSpec {
    /// Resources of the one-off microVM.
    pub resources: Resources,
    /// Time the command gets to exit 0, in seconds.
    pub timeout_secs: u64,
}

/// A release as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseSpec {
    /// Id of the release.
    pub id: ReleaseId,
    /// Process types by name, with the counts the env wants for this release.
    pub processes: BTreeMap<ProcessName, ProcessSpec>,
    /// The release command, when the manifest has one and it has not yet succeeded for this
    /// release.
    pub release_command: Option<ReleaseCommandSpec>,
}

/// An instance of the env that is not yet gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvInstance {
    /// Id of the instance.
    pub id: InstanceId,
    /// Release it runs.
    pub release: ReleaseId,
    /// Process type it runs.
    pub process: ProcessName,
    /// Host it is placed on.
    pub host: HostId,
    /// Resources it holds.
    pub resources: Resources,
}

/// The env as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvState {
    /// Id of the env.
    pub env: EnvId,
    /// The env's event-stream version the state was read at; a plan is bound to it.
    pub version: u64,
    /// The release the env runs, with its current counts; `None` before the first deploy.
    pub current: Option<ReleaseSpec>,
    /// Every instance of the env that is not yet gone, whatever its release.
    pub instances: Vec<EnvInstance>,
}

/// How new instances replace old ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Strategy {
    /// Per process type, start up to `max_surge` new instances, wait for them to be healthy,
    /// route to them, then retire as many old ones; repeat.
    Rolling {
        /// New instances started before old ones retire (at least 1).
        max_surge: u32,
    },
    /// Retire every old instance, then start every new one: downtime, but no spare capacity
    /// needed.
    Immediate,
}

impl Default for Strategy {
    fn default() -> Self {
        Self::Rolling { max_surge: 1 }
    }
}

/// Deadlines applied to the steps of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Time new instances get to report healthy, in seconds. Default 300.
    pub health_deadline_secs: u64,
    /// Time a retiring instance gets between SIGTERM and kill, in seconds. Default 30.
    pub drain_grace_secs: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            health_deadline_secs: DEFAULT_HEALTH_DEADLINE_SECS,
            drain_grace_secs: DEFAULT_DRAIN_GRACE_SECS,
        }
    }
}

/// What the plan should achieve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Intent {
    /// Roll the env to a release. A rollback is a deploy of a new release that points at an
    /// older release's image digest, config and secret versions.
    Deploy {
        /// The target release.
        release: ReleaseSpec,
        /// How to replace the old instances.
        strategy: Strategy,
    },
    /// Change instance counts of the current release.
    Scale {
        /// New counts by process type; process types not named keep their count.
        counts: BTreeMap<ProcessName, u32>,
    },
    /// Replace every instance with a fresh one of the same release.
    Restart {
        /// How to replace the instances.
        strategy: Strategy,
    },
    /// Replace the instances on dead hosts.
    ReplaceLost,
}

/// What the planner is asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRequest {
    /// Id of the deploy; new instance ids are derived from it, so planning twice gives the
    /// same plan.
    pub deploy: DeployId,
    /// What to achieve.
    pub intent: Intent,
    /// Deadlines of the steps.
    pub timeouts: Timeouts,
}

/// An instance the plan creates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedInstance {
    /// Id of the new instance.
    pub id: InstanceId,
    /// Release it runs.
    pub release: ReleaseId,
    /// Process type it runs.
    pub process: ProcessName,
    /// Host it is placed on.
    pub host: HostId,
    /// Resources it holds.
    pub resources: Resources,
}

/// One effect the executor carries out. Every action is idempotent, so a step can be run again
/// after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    /// Run the release command in a one-off microVM and wait for it to exit; a non-zero exit
    /// or the timeout fails the step. The instance is placed once: applying the action again
    /// (after a control plane restart) only waits for it.
    RunReleaseCommand {
        /// The one-off instance.
        instance: PlannedInstance,
        /// Time it gets to exit 0, in seconds.
        timeout_secs: u64,
    },
    /// Assign new instances to their hosts.
    StartInstances {
        /// The instances to start.
        instances: Vec<PlannedInstance>,
    },
    /// Wait until every listed instance reports healthy; the deadline fails the step.
    WaitHealthy {
        /// The instances to wait for.
        instances: Vec<InstanceId>,
        /// Deadline from the start of the step, in seconds.
        deadline_secs: u64,
    },
    /// Change which instances of a process type receive traffic.
    UpdateRoutes {
        /// The process type.
        process: ProcessName,
        /// Instances to add to the routes.
        add: Vec<InstanceId>,
        /// Instances to remove from the routes.
        remove: Vec<InstanceId>,
    },
    /// Stop instances (SIGTERM, grace period, kill) and free their resources and addresses.
    StopInstances {
        /// The instances to stop.
        instances: Vec<InstanceId>,
        /// Time between SIGTERM and kill, in seconds.
        grace_secs: u64,
    },
    /// Set the release the env runs.
    SetRelease {
        /// The release; `None` only when undoing an env's first deploy.
        release: Option<ReleaseId>,
    },
    /// Set the instance counts of the current release.
    SetScale {
        /// Counts by process type.
        counts: BTreeMap<ProcessName, u32>,
    },
}

/// A named step: its actions and the actions that undo them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Name, unique within the plan (`web/2/start`).
    pub name: String,
    /// Actions, run in order.
    pub actions: Vec<Action>,
    /// Actions that undo this step, run in order during a rollback.
    pub undo: Vec<Action>,
}

/// What a plan does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanKind {
    /// Roll to a release.
    Deploy,
    /// Change counts.
    Scale,
    /// Replace every instance.
    Restart,
    /// Replace the instances on dead hosts.
    ReplaceLost,
}

/// A deterministic list of steps bound to the env's event-log position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Id of the deploy the plan belongs to.
    pub deploy: DeployId,
    /// The env.
    pub env: EnvId,
    /// What the plan does.
    pub kind: PlanKind,
    /// The env's stream version the plan was made at; applying it at another version is a
    /// conflict.
    pub base_version: u64,
    /// The release the env runs before the plan.
    pub from_release: Option<ReleaseId>,
    /// The release the env runs after the plan.
    pub to_release: ReleaseId,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

impl Plan {
    /// The undo actions of step `failed` and of every step before it, latest first: what the
    /// executor runs when step `failed` fails.
    pub fn rollback_actions(&self, failed: usize) -> Vec<Action> {
        let end = (failed + 1).min(self.steps.len());
        self.steps[..end]
            .iter()
            .rev()
            .flat_map(|step| step.undo.iter().cloned())
            .collect()
    }

    /// Hex SHA-256 of the plan's JSON form; equal plans have equal digests.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex_encode(&Sha256::digest(json))
    }

    /// Every instance the plan starts, including release command instances, in step order.
    pub fn started_instances(&self) -> impl Iterator<Item = &PlannedInstance> {
        self.steps
            .iter()
            .flat_map(|step| step.actions.iter())
            .flat_map(|action| match action {
                Action::StartInstances { instances } => instances.iter().collect::<Vec<_>>(),
                Action::RunReleaseCommand { instance, .. } => vec![instance],
                _ => Vec::new(),
            })
    }
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The target release has no process types.
    #[error("release {release} has no process types; add at least one to the manifest")]
    NoProcesses {
        /// The release.
        release: ReleaseId,
    },
    /// A rolling strategy with no surge can never start a new instance.
    #[error("invalid max surge 0: a rolling deploy needs at least 1")]
    ZeroMaxSurge,
    /// Scale or restart of an env that was never deployed.
    #[error("env {env} has no release yet; deploy one first")]
    NoCurrentRelease {
        /// The env.
        env: EnvId,
    },
    /// Scale of a process type the current release does not have.
    #[error("release {release} has no process type {process}; scale one of: {known}")]
    UnknownProcess {
        /// The requested process type.
        process: ProcessName,
        /// The current release.
        release: ReleaseId,
        /// The process types the release has, comma-separated.
        known: String,
    },
    /// A step's instances do not fit on the cluster.
    #[error("cannot plan step {step}")]
    Schedule {
        /// The step that needed the placements.
        step: String,
        /// Why the scheduler failed.
        #[source]
        source: ScheduleError,
    },
}

/// Makes a plan for `request` against the env and cluster state.
///
/// A pure function: the same inputs always give the same plan, new instance ids included.
pub fn plan(
    cluster: &ClusterSnapshot,
    config: SchedulerConfig,
    env: &EnvState,
    request: &PlanRequest,
) -> Result<Plan, PlanError> {
    let scheduler = Scheduler::new(cluster, config).map_err(|source| PlanError::Schedule {
        step: "snapshot".to_owned(),
        source,
    })?;
    let mut planner = Planner {
        scheduler,
        env,
        deploy: request.deploy,
        timeouts: request.timeouts,
        next_id: 0,
        steps: Vec::new(),
    };

    let (kind, to_release) = match &request.intent {
        Intent::Deploy { release, strategy } => {
            planner.plan_rollout(release, *strategy)?;
            (PlanKind::Deploy, release.id)
        }
        Intent::Restart { strategy } => {
            let current = current_release(env)?;
            planner.plan_rollout(current, *strategy)?;
            (PlanKind::Restart, current.id)
        }
        Intent::Scale { counts } => {
            let current = current_release(env)?;
            planner.plan_scale(current, counts)?;
            (PlanKind::Scale, current.id)
        }
        Intent::ReplaceLost => {
            let current = current_release(env)?;
            planner.plan_replace_lost(cluster)?;
            (PlanKind::ReplaceLost, current.id)
        }
    };

    Ok(Plan {
        deploy: request.deploy,
        env: env.env,
        kind,
        base_version: env.version,
        from_release: env.current.as_ref().map(|release| release.id),
        to_release,
        steps: planner.steps,
    })
}

fn current_release(env: &EnvState) -> Result<&ReleaseSpec, PlanError> {
    env.current
        .as_ref()
        .ok_or(PlanError::NoCurrentRelease { env: env.env })
}

/// Derives the `n`-th instance id of a deploy: the deploy id's timestamp (so ids stay roughly
/// time-ordered like UUIDv7) followed by a hash of the deploy id and `n`.
pub fn derive_instance_id(deploy: DeployId, n: u64) -> InstanceId {
    let seed = deploy.as_uuid();
    let mut hasher = Sha256::new();
    hasher.update(seed.as_bytes());
    hasher.update(n.to_be_bytes());
    let hash = hasher.finalize();

    let mut bytes = [0_u8; 16];
    bytes[..6].copy_from_slice(&seed.as_bytes()[..6]);
    bytes[6..].copy_from_slice(&hash[..10]);
    InstanceId::from_uuid(Builder::from_custom_bytes(bytes).into_uuid())
}

fn hex_encode(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// An old instance, with what is needed to restore it.
#[derive(Debug, Clone)]
struct OldInstance {
    id: InstanceId,
    release: ReleaseId,
    process: ProcessName,
    host: HostId,
    resources: Resources,
}

struct Planner<'a> {
    scheduler: Scheduler,
    env: &'a EnvState,
    deploy: DeployId,
    timeouts: Timeouts,
    next_id: u64,
    steps: Vec<Step>,
}

impl Planner<'_> {
    fn new_id(&mut self) -> InstanceId {
        let id = derive_instance_id(self.deploy, self.next_id);
        self.next_id += 1;
        id
    }

    fn push(&mut self, name: String, actions: Vec<Action>, undo: Vec<Action>) {
        self.steps.push(Step {
            name,
            actions,
            undo,
        });
    }

    /// Places `count` new instances of a process type and returns them.
    fn place_new(
        &mut self,
        step: &str,
        release: ReleaseId,
        process: &ProcessName,
        resources: Resources,
        count: u32,
    ) -> Result<Vec<PlannedInstance>, PlanError> {
        let requests: Vec<InstanceRequest> = (0..count)
            .map(|_| InstanceRequest {
                id: self.new_id(),
                env: self.env.env,
                process: process.clone(),
                resources,
            })
            .collect();
        let placements = self
            .scheduler
            .place(&requests)
            .map_err(|source| PlanError::Schedule {
                step: step.to_owned(),
                source,
            })?;
        Ok(requests
            .into_iter()
            .zip(placements)
            .map(|(request, placement)| PlannedInstance {
                id: request.id,
                release,
                process: request.process,
                host: placement.host,
                resources: request.resources,
            })
            .collect())
    }

    /// Old instances of the env by process type, oldest id first.
    fn old_instances(&self) -> BTreeMap<ProcessName, Vec<OldInstance>> {
        let mut old: BTreeMap<ProcessName, Vec<OldInstance>> = BTreeMap::new();
        for instance in &self.env.instances {
            old.entry(instance.process.clone())
                .or_default()
                .push(OldInstance {
                    id: instance.id,
                    release: instance.release,
                    process: instance.process.clone(),
                    host: instance.host,
                    resources: instance.resources,
                });
        }
        for instances in old.values_mut() {
            instances.sort_by_key(|instance| instance.id);
        }
        old
    }

    fn is_routed(&self, process: &ProcessName, target: &ReleaseSpec) -> bool {
        let in_release = |release: &ReleaseSpec| {
            release
                .processes
                .get(process)
                .is_some_and(|spec| spec.routed)
        };
        in_release(target) || self.env.current.as_ref().is_some_and(in_release)
    }

    fn plan_release_command(&mut self, release: &ReleaseSpec) -> Result<(), PlanError> {
        let Some(command) = &release.release_command else {
            return Ok(());
        };
        let step = RELEASE_COMMAND_STEP.to_owned();
        let process = ProcessName::new(RELEASE_COMMAND_PROCESS)
            .expect("the release command's process name is a valid label");
        let mut instances = self.place_new(&step, release.id, &process, command.resources, 1)?;
        let Some(instance) = instances.pop() else {
            return Ok(());
        };

        // The one-off microVM exits before any instance is replaced, so its capacity is free
        // again for the rollout. Once it exited, stopping it removes the instance and frees
        // its addresses; the undo stops it too, so a timed-out command is killed.
        self.scheduler.remove(instance.id);
        let id = instance.id;
        self.push(
            step,
            vec![
                Action::RunReleaseCommand {
                    instance,
                    timeout_secs: command.timeout_secs,
                },
                self.stop(vec![id], 0),
            ],
            vec![self.stop(vec![id], 0)],
        );
        Ok(())
    }

    fn plan_rollout(&mut self, target: &ReleaseSpec, strategy: Strategy) -> Result<(), PlanError> {
        if target.processes.is_empty() {
            return Err(PlanError::NoProcesses { release: target.id });
        }
        if strategy == (Strategy::Rolling { max_surge: 0 }) {
            return Err(PlanError::ZeroMaxSurge);
        }

        self.plan_release_command(target)?;

        let old = self.old_instances();
        let processes: BTreeSet<ProcessName> =
            target.processes.keys().chain(old.keys()).cloned().collect();

        match strategy {
            Strategy::Rolling { max_surge } => {
                for process in &processes {
                    let old_of_process = old.get(process).cloned().unwrap_or_default();
                    self.plan_rolling_process(target, process, old_of_process, max_surge)?;
                }
            }
            Strategy::Immediate => self.plan_immediate(target, &processes, &old)?,
        }

        self.plan_activate(target.id);
        Ok(())
    }

    fn plan_rolling_process(
        &mut self,
        target: &ReleaseSpec,
        process: &ProcessName,
        old: Vec<OldInstance>,
        max_surge: u32,
    ) -> Result<(), PlanError> {
        let spec = target.processes.get(process);
        let wanted = spec.map_or(0, |spec| spec.count);
        let routed = self.is_routed(process, target);
        let mut old = old.into_iter();
        let mut started = 0;
        let mut batch = 1;

        loop {
            let size = max_surge.min(wanted - started);
            let last_batch = started + size == wanted;
            let prefix = format!("{process}/{batch}");

            if let Some(spec) = spec.filter(|_| size > 0) {
                let new = self.place_new(
                    &format!("{prefix}/start"),
                    target.id,
                    process,
                    spec.resources,
                    size,
                )?;
                self.plan_bring_up(&prefix, process, new, routed);
            }
            started += size;

            // Retire one old instance per new one, and every remaining old one with the last
            // batch (the new release may want fewer).
            let retiring: Vec<OldInstance> = if last_batch {
                old.by_ref().collect()
            } else {
                old.by_ref().take(size as usize).collect()
            };
            if !retiring.is_empty() {
                self.plan_retire(&format!("{prefix}/retire"), process, retiring, routed);
            }

            if last_batch {
                return Ok(());
            }
            batch += 1;
        }
    }

    fn plan_immediate(
        &mut self,
        target: &ReleaseSpec,
        processes: &BTreeSet<ProcessName>,
        old: &BTreeMap<ProcessName, Vec<OldInstance>>,
    ) -> Result<(), PlanError> {
        for process in processes {
            let retiring = old.get(process).cloned().unwrap_or_default();
            if !retiring.is_empty() {
                let routed = self.is_routed(process, target);
                self.plan_retire(&format!("{process}/retire"), process, retiring, routed);
            }
        }
        for (process, spec) in &target.processes {
            if spec.count == 0 {
                continue;
            }
            let new = self.place_new(
                &format!("{process}/start"),
                target.id,
                process,
                spec.resources,
                spec.count,
            )?;
            let routed = self.is_routed(process, target);
            self.plan_bring_up(process.as_str(), process, new, routed);
        }
        Ok(())
    }

    /// Start, wait healthy, route: the three steps that bring new instances into service.
    fn plan_bring_up(
        &mut self,
        prefix: &str,
        process: &ProcessName,
        new: Vec<PlannedInstance>,
        routed: bool,
    ) {
        let ids: Vec<InstanceId> = new.iter().map(|instance| instance.id).collect();

        self.push(
            format!("{prefix}/start"),
            vec![Action::StartInstances { instances: new }],
            vec![self.stop(ids.clone(), 0)],
        );
        self.push(
            format!("{prefix}/wait-healthy"),
            vec![Action::WaitHealthy {
                instances: ids.clone(),
                deadline_secs: self.timeouts.health_deadline_secs,
            }],
            Vec::new(),
        );
        if routed {
            self.push(
                format!("{prefix}/route"),
                vec![Action::UpdateRoutes {
                    process: process.clone(),
                    add: ids.clone(),
                    remove: Vec::new(),
                }],
                vec![Action::UpdateRoutes {
                    process: process.clone(),
                    add: Vec::new(),
                    remove: ids,
                }],
            );
        }
    }

    /// Unroute and stop old instances. The undo restores each on its host under a new id, waits
    /// for it and routes it, so a rollback never leaves the env with fewer instances.
    fn plan_retire(
        &mut self,
        name: &str,
        process: &ProcessName,
        retiring: Vec<OldInstance>,
        routed: bool,
    ) {
        let ids: Vec<InstanceId> = retiring.iter().map(|instance| instance.id).collect();
        for instance in &retiring {
            self.scheduler.remove(instance.id);
        }

        let restored: Vec<PlannedInstance> = retiring
            .into_iter()
            .map(|instance| PlannedInstance {
                id: self.new_id(),
                release: instance.release,
                process: instance.process,
                host: instance.host,
                resources: instance.resources,
            })
            .collect();
        let restored_ids: Vec<InstanceId> = restored.iter().map(|instance| instance.id).collect();

        let mut actions = Vec::new();
        let mut undo = vec![
            Action::StartInstances {
                instances: restored,
            },
            Action::WaitHealthy {
                instances: restored_ids.clone(),
                deadline_secs: self.timeouts.health_deadline_secs,
            },
        ];
        if routed {
            actions.push(Action::UpdateRoutes {
                process: process.clone(),
                add: Vec::new(),
                remove: ids.clone(),
            });
            undo.push(Action::UpdateRoutes {
                process: process.clone(),
                add: restored_ids,
                remove: Vec::new(),
            });
        }
        actions.push(self.stop(ids, self.timeouts.drain_grace_secs));

        self.push(name.to_owned(), actions, undo);
    }

    fn plan_activate(&mut self, release: ReleaseId) {
        let from = self.env.current.as_ref().map(|current| current.id);
        if from == Some(release) {
            return;
        }
        self.push(
            "activate".to_owned(),
            vec![Action::SetRelease {
                release: Some(release),
            }],
            vec![Action::SetRelease { release: from }],
        );
    }

    fn plan_scale(
        &mut self,
        current: &ReleaseSpec,
        counts: &BTreeMap<ProcessName, u32>,
    ) -> Result<(), PlanError> {
        for process in counts.keys() {
            if !current.processes.contains_key(process) {
                let known: Vec<&str> = current.processes.keys().map(|p| p.as_str()).collect();
                return Err(PlanError::UnknownProcess {
                    process: process.clone(),
                    release: current.id,
                    known: known.join(", "),
                });
            }
        }

        let old = self.old_instances();
        let before: BTreeMap<ProcessName, u32> = current
            .processes
            .iter()
            .map(|(process, spec)| (process.clone(), spec.count))
            .collect();
        let mut after = before.clone();

        for (process, &wanted) in counts {
            let Some(spec) = current.processes.get(process) else {
                continue;
            };
            after.insert(process.clone(), wanted);
            let running: Vec<OldInstance> = old
                .get(process)
                .map(|instances| {
                    instances
                        .iter()
                        .filter(|instance| instance.release == current.id)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            let have = u32::try_from(running.len()).unwrap_or(u32::MAX);

            if wanted > have {
                let prefix = format!("{process}/scale-up");
                let new = self.place_new(
                    &format!("{prefix}/start"),
                    current.id,
                    process,
                    spec.resources,
                    wanted - have,
                )?;
                self.plan_bring_up(&prefix, process, new, spec.routed);
            } else if wanted < have {
                let retiring = self.pick_scale_down(running, (have - wanted) as usize);
                self.plan_retire(
                    &format!("{process}/scale-down"),
                    process,
                    retiring,
                    spec.routed,
                );
            }
        }

        if after != before {
            self.push(
                "set-scale".to_owned(),
                vec![Action::SetScale { counts: after }],
                vec![Action::SetScale { counts: before }],
            );
        }
        Ok(())
    }

    /// Picks the instances to stop when scaling down: each time from the host with the most
    /// replicas of the process type (so the rest stay spread), newest id first on ties.
    fn pick_scale_down(&self, mut running: Vec<OldInstance>, count: usize) -> Vec<OldInstance> {
        let mut per_host: BTreeMap<HostId, usize> = BTreeMap::new();
        for instance in &running {
            *per_host.entry(instance.host).or_default() += 1;
        }

        let mut picked = Vec::with_capacity(count);
        for _ in 0..count {
            let position = running
                .iter()
                .enumerate()
                .max_by_key(|(_, instance)| (per_host[&instance.host], instance.id))
                .map(|(position, _)| position);
            let Some(position) = position else {
                break;
            };
            let instance = running.swap_remove(position);
            if let Some(count) = per_host.get_mut(&instance.host) {
                *count -= 1;
            }
            picked.push(instance);
        }
        picked.sort_by_key(|instance| instance.id);
        picked
    }

    fn plan_replace_lost(&mut self, cluster: &ClusterSnapshot) -> Result<(), PlanError> {
        let dead: BTreeSet<HostId> = cluster
            .hosts
            .iter()
            .filter(|host| host.state == HostState::Dead)
            .map(|host| host.id)
            .collect();
        let mut lost: BTreeMap<(ProcessName, ReleaseId), Vec<OldInstance>> = BTreeMap::new();
        for (process, instances) in self.old_instances() {
            for instance in instances {
                if dead.contains(&instance.host) {
                    lost.entry((process.clone(), instance.release))
                        .or_default()
                        .push(instance);
                }
            }
        }

        for ((process, release), instances) in lost {
            let Some(first) = instances.first() else {
                continue;
            };
            let routed = self
                .env
                .current
                .as_ref()
                .and_then(|current| current.processes.get(&process))
                .is_some_and(|spec| spec.routed);
            let prefix = format!("{process}/replace-{}", short_release(release));
            let count = u32::try_from(instances.len()).unwrap_or(u32::MAX);
            let new = self.place_new(
                &format!("{prefix}/start"),
                release,
                &process,
                first.resources,
                count,
            )?;
            self.plan_bring_up(&prefix, &process, new, routed);

            // The lost instances are already gone with their host; forgetting them frees their
            // addresses. A host that comes back stops them itself, so there is nothing to undo.
            let ids: Vec<InstanceId> = instances.iter().map(|instance| instance.id).collect();
            let mut actions = Vec::new();
            if routed {
                actions.push(Action::UpdateRoutes {
                    process: process.clone(),
                    add: Vec::new(),
                    remove: ids.clone(),
                });
            }
            actions.push(self.stop(ids, 0));
            self.push(format!("{prefix}/forget-lost"), actions, Vec::new());
        }
        Ok(())
    }

    fn stop(&self, instances: Vec<InstanceId>, grace_secs: u64) -> Action {
        Action::StopInstances {
            instances,
            grace_secs,
        }
    }
}

/// The last 8 hex digits of a release id: enough to keep step names unique within a plan.
fn short_release(release: ReleaseId) -> String {
    let text = release.as_uuid().simple().to_string();
    text[text.len() - 8..].to_owned()
}
