//! The orchestrator's loop body: one pass over every unfinished deploy, moving each as far as
//! it can go without waiting.
//!
//! The engine keeps no state of its own between passes. Everything it decides comes from the
//! store (the plan, the recorded step outcomes, the instances' reported states), and every
//! effect it causes goes through the store with the leader's fencing token. A control plane
//! that crashes between two steps therefore resumes at the same point: the next leader reads
//! the same records and [`position`] gives it the same next step. Actions are idempotent, so a
//! step whose effects were recorded just before the crash is run again without duplicating
//! instances.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;

use kiln_core::{DeployId, InstanceId};
use kiln_scheduler::plan::{Action, Plan};
use kiln_scheduler::progress::{
    Observed, Position, ProgressError, StepRecord, WaitStatus, evaluate, position,
};

/// The leader's fencing token: every write carries it, and the store rejects writes from a
/// leader whose token is older than the newest one issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fence(pub i64);

/// An unfinished deploy, as the store has recorded it.
#[derive(Debug, Clone)]
pub struct DeployProgress {
    /// The deploy.
    pub deploy: DeployId,
    /// Its plan, shared because a stored plan never changes and is kept between passes.
    pub plan: Arc<Plan>,
    /// Step outcomes, in the order they were recorded.
    pub records: Vec<StepRecord>,
    /// Seconds since the last record (or since the plan was recorded): how long the current
    /// step has been running.
    pub step_elapsed_secs: u64,
}

/// How a deploy ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every step completed.
    Succeeded,
    /// A step failed and the rollback finished.
    Failed {
        /// Why the step failed.
        reason: String,
    },
}

/// Storage and effects of the orchestrator, with every write fenced.
pub trait Store {
    /// Error of the store.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Unfinished deploys with their plans and records, oldest first.
    fn unfinished(&self) -> impl Future<Output = Result<Vec<DeployProgress>, Self::Error>> + Send;

    /// Carries out one action. Must be idempotent: an action already in effect is a no-op.
    fn apply(
        &self,
        fence: Fence,
        plan: &Plan,
        action: &Action,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The last reported state of instances.
    fn observe(
        &self,
        instances: &[InstanceId],
    ) -> impl Future<Output = Result<BTreeMap<InstanceId, Observed>, Self::Error>> + Send;

    /// Records a step outcome, with a reason for a failure.
    fn record(
        &self,
        fence: Fence,
        deploy: DeployId,
        record: StepRecord,
        reason: Option<String>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Reports whether instances of the plan's environment may stop: every ingress has
    /// applied the env's latest route change, so none still sends them new connections, or
    /// the step has waited `step_elapsed_secs` past the store's drain deadline. A store
    /// without ingresses has nothing to wait for.
    fn routes_drained(
        &self,
        plan: &Plan,
        step_elapsed_secs: u64,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send {
        let _ = (plan, step_elapsed_secs);
        async { Ok(true) }
    }

    /// Records how a deploy ended.
    fn finish(
        &self,
        fence: Fence,
        deploy: DeployId,
        outcome: Outcome,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Why a pass stopped early.
#[derive(Debug, thiserror::Error)]
pub enum EngineError<E: std::error::Error + 'static> {
    /// The store failed.
    #[error("orchestrator store operation failed")]
    Store(#[source] E),
    /// A deploy's records do not match its plan.
    #[error("records of deploy {deploy} do not match its plan")]
    Records {
        /// The deploy.
        deploy: DeployId,
        /// The mismatch.
        #[source]
        source: ProgressError,
    },
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    /// Steps completed or undone in this pass.
    pub steps: usize,
    /// Deploys that ended in this pass.
    pub finished: Vec<(DeployId, Outcome)>,
    /// Deploys still waiting on instances.
    pub waiting: usize,
}

/// Runs one pass over every unfinished deploy.
///
/// Deploys of one env run one after another, oldest first, because a later deploy of an env
/// starts from the instances the earlier one leaves. Deploys of different envs touch disjoint
/// instances, routes and streams, so up to `concurrency` envs advance at once. The
/// error stops only its env's deploys: the other envs still get their turn, and the pass
/// returns the first error once they are done. The next pass resumes every deploy from its
/// records.
pub async fn run_pass<S: Store + Sync>(
    store: &S,
    fence: Fence,
    concurrency: usize,
) -> Result<PassReport, EngineError<S::Error>> {
    let mut by_env: Vec<Vec<DeployProgress>> = Vec::new();
    let mut env_index = BTreeMap::new();
    for progress in store.unfinished().await.map_err(EngineError::Store)? {
        let index = *env_index.entry(progress.plan.env).or_insert_with(|| {
            by_env.push(Vec::new());
            by_env.len() - 1
        });
        by_env[index].push(progress);
    }

    let mut runs = Vec::with_capacity(by_env.len());
    for deploys in by_env {
        runs.push(advance_env(store, fence, deploys));
    }
    let mut reports = futures::stream::iter(runs).buffer_unordered(concurrency.max(1));

    let mut report = PassReport::default();
    let mut first_error = None;
    while let Some(result) = reports.next().await {
        match result {
            Ok(env_report) => {
                report.steps += env_report.steps;
                report.waiting += env_report.waiting;
                report.finished.extend(env_report.finished);
            }
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(report),
    }
}

/// Runs `futures` with at most `limit` at a time, and returns the first error once every one
/// has finished.
pub async fn run_concurrently<F, E>(futures: Vec<F>, limit: usize) -> Result<(), E>
where
    F: Future<Output = Result<(), E>>,
{
    let mut results = futures::stream::iter(futures).buffer_unordered(limit.max(1));
    let mut first_error = None;
    while let Some(result) = results.next().await {
        if let Err(error) = result {
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Moves the deploys of one env forward, oldest first.
async fn advance_env<S: Store>(
    store: &S,
    fence: Fence,
    deploys: Vec<DeployProgress>,
) -> Result<PassReport, EngineError<S::Error>> {
    let mut report = PassReport::default();
    for progress in deploys {
        advance(store, fence, progress, &mut report).await?;
    }
    Ok(report)
}

/// Moves one deploy forward until it has to wait or ends.
async fn advance<S: Store>(
    store: &S,
    fence: Fence,
    mut progress: DeployProgress,
    report: &mut PassReport,
) -> Result<(), EngineError<S::Error>> {
    let deploy = progress.deploy;
    loop {
        let at = position(&progress.plan, &progress.records)
            .map_err(|source| EngineError::Records { deploy, source })?;

        let (record, reason) = match at {
            Position::Succeeded => {
                let outcome = Outcome::Succeeded;
                store
                    .finish(fence, deploy, outcome.clone())
                    .await
                    .map_err(EngineError::Store)?;
                report.finished.push((deploy, outcome));
                return Ok(());
            }
            Position::RolledBack { failed } => {
                let reason = failure_reason(&progress, failed);
                let outcome = Outcome::Failed { reason };
                store
                    .finish(fence, deploy, outcome.clone())
                    .await
                    .map_err(EngineError::Store)?;
                report.finished.push((deploy, outcome));
                return Ok(());
            }
            Position::Forward { next } => {
                let step = &progress.plan.steps[next];
                match run_actions(store, fence, &progress, &step.actions).await? {
                    WaitStatus::Waiting => {
                        report.waiting += 1;
                        return Ok(());
                    }
                    WaitStatus::Done => (StepRecord::Completed(step.name.clone()), None),
                    WaitStatus::Failed(failure) => (
                        StepRecord::Failed(step.name.clone()),
                        Some(format!("step {} failed: {failure}", step.name)),
                    ),
                }
            }
            Position::RollingBack { next, .. } => {
                let step = &progress.plan.steps[next];
                match run_actions(store, fence, &progress, &step.undo).await? {
                    WaitStatus::Waiting => {
                        report.waiting += 1;
                        return Ok(());
                    }
                    // A restored instance that does not become healthy is not retried: the
                    // rollback continues so the env is left as close to its start as it can be.
                    WaitStatus::Done | WaitStatus::Failed(_) => {
                        (StepRecord::Undone(step.name.clone()), None)
                    }
                }
            }
        };

        store
            .record(fence, deploy, record.clone(), reason)
            .await
            .map_err(EngineError::Store)?;
        progress.records.push(record);
        progress.step_elapsed_secs = 0;
        report.steps += 1;
    }
}

/// Applies every action of a step and evaluates the waiting ones.
async fn run_actions<S: Store>(
    store: &S,
    fence: Fence,
    progress: &DeployProgress,
    actions: &[Action],
) -> Result<WaitStatus, EngineError<S::Error>> {
    for action in actions {
        // Stopping is the drain's end: wait until no ingress routes new connections to the
        // instances, which a route removal earlier in the step has just taken them out of.
        if matches!(action, Action::StopInstances { .. })
            && !store
                .routes_drained(&progress.plan, progress.step_elapsed_secs)
                .await
                .map_err(EngineError::Store)?
        {
            return Ok(WaitStatus::Waiting);
        }
        store
            .apply(fence, &progress.plan, action)
            .await
            .map_err(EngineError::Store)?;

        let watched = watched_instances(action);
        if watched.is_empty() {
            continue;
        }
        let observed = store.observe(&watched).await.map_err(EngineError::Store)?;
        match evaluate(action, &observed, progress.step_elapsed_secs) {
            WaitStatus::Done => {}
            other => return Ok(other),
        }
    }
    Ok(WaitStatus::Done)
}

fn watched_instances(action: &Action) -> Vec<InstanceId> {
    match action {
        Action::WaitHealthy { instances, .. } => instances.clone(),
        Action::RunReleaseCommand { instance, .. } => vec![instance.id],
        _ => Vec::new(),
    }
}

fn failure_reason(progress: &DeployProgress, failed: usize) -> String {
    let name = progress
        .plan
        .steps
        .get(failed)
        .map_or("unknown", |step| step.name.as_str());
    format!("step {name} failed; the deploy was rolled back")
}

#[cfg(test)]
mod tests {
    //! The engine over an in-memory store whose instances report at once. The PostgreSQL store
    //! runs the same engine in the crate's integration tests.

    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Mutex;

    use kiln_core::{EnvId, HostId, ProcessName, ReleaseId};
    use kiln_scheduler::plan::{
        EnvInstance, EnvState, Intent, PlanRequest, ProcessSpec, ReleaseSpec, Strategy, Timeouts,
        plan,
    };
    use kiln_scheduler::{ClusterSnapshot, Host, HostState, Resources, SchedulerConfig};

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("stale fence {0:?}")]
    struct StaleFence(Fence);

    #[derive(Default)]
    struct Memory {
        newest_fence: i64,
        unhealthy_release: Option<ReleaseId>,
        plan: Option<Plan>,
        records: Vec<StepRecord>,
        finished: Option<Outcome>,
        instances: BTreeMap<InstanceId, (ReleaseId, Observed)>,
        starts: BTreeMap<InstanceId, u32>,
        routes: BTreeSet<InstanceId>,
    }

    struct MemoryStore(Mutex<Memory>);

    impl MemoryStore {
        fn check(&self, fence: Fence) -> Result<std::sync::MutexGuard<'_, Memory>, StaleFence> {
            let memory = self.0.lock().unwrap();
            if fence.0 < memory.newest_fence {
                return Err(StaleFence(fence));
            }
            Ok(memory)
        }
    }

    impl Store for MemoryStore {
        type Error = StaleFence;

        async fn unfinished(&self) -> Result<Vec<DeployProgress>, StaleFence> {
            let memory = self.0.lock().unwrap();
            let Some(plan) = memory.plan.clone().filter(|_| memory.finished.is_none()) else {
                return Ok(Vec::new());
            };
            Ok(vec![DeployProgress {
                deploy: plan.deploy,
                plan: Arc::new(plan),
                records: memory.records.clone(),
                step_elapsed_secs: 0,
            }])
        }

        async fn apply(
            &self,
            fence: Fence,
            _plan: &Plan,
            action: &Action,
        ) -> Result<(), StaleFence> {
            let mut memory = self.check(fence)?;
            match action {
                Action::StartInstances { instances } => {
                    for instance in instances {
                        if memory.instances.contains_key(&instance.id) {
                            continue;
                        }
                        *memory.starts.entry(instance.id).or_default() += 1;
                        let state = if Some(instance.release) == memory.unhealthy_release {
                            Observed::Unhealthy
                        } else {
                            Observed::Healthy
                        };
                        memory
                            .instances
                            .insert(instance.id, (instance.release, state));
                    }
                }
                Action::StopInstances { instances, .. } => {
                    for id in instances {
                        memory.instances.remove(id);
                        memory.routes.remove(id);
                    }
                }
                Action::UpdateRoutes { add, remove, .. } => {
                    for id in remove {
                        memory.routes.remove(id);
                    }
                    memory.routes.extend(add.iter().copied());
                }
                _ => {}
            }
            Ok(())
        }

        async fn observe(
            &self,
            instances: &[InstanceId],
        ) -> Result<BTreeMap<InstanceId, Observed>, StaleFence> {
            let memory = self.0.lock().unwrap();
            Ok(instances
                .iter()
                .filter_map(|id| Some((*id, memory.instances.get(id)?.1.clone())))
                .collect())
        }

        async fn record(
            &self,
            fence: Fence,
            _deploy: DeployId,
            record: StepRecord,
            _reason: Option<String>,
        ) -> Result<(), StaleFence> {
            self.check(fence)?.records.push(record);
            Ok(())
        }

        async fn finish(
            &self,
            fence: Fence,
            _deploy: DeployId,
            outcome: Outcome,
        ) -> Result<(), StaleFence> {
            self.check(fence)?.finished = Some(outcome);
            Ok(())
        }
    }

    fn rolling_plan() -> (Plan, Vec<EnvInstance>) {
        let web = ProcessName::new("web").unwrap();
        let release = |count| ReleaseSpec {
            id: ReleaseId::new(),
            processes: BTreeMap::from([(
                web.clone(),
                ProcessSpec {
                    count,
                    resources: Resources {
                        memory_mib: 256,
                        vcpus: 1,
                    },
                    routed: true,
                },
            )]),
            release_command: None,
        };
        let (old, new) = (release(3), release(3));
        let hosts: Vec<Host> = (0..3)
            .map(|n| Host {
                id: HostId::new(),
                name: format!("h{n}"),
                memory_mib: 8192,
                cpus: 4,
                state: HostState::Ready,
            })
            .collect();
        let instances: Vec<EnvInstance> = (0..3)
            .map(|n| EnvInstance {
                id: InstanceId::new(),
                release: old.id,
                process: web.clone(),
                host: hosts[n].id,
                resources: Resources {
                    memory_mib: 256,
                    vcpus: 1,
                },
            })
            .collect();
        let env = EnvState {
            env: EnvId::new(),
            version: 1,
            current: Some(old),
            instances: instances.clone(),
        };
        let cluster = ClusterSnapshot {
            hosts,
            instances: Vec::new(),
        };
        let request = PlanRequest {
            deploy: DeployId::new(),
            intent: Intent::Deploy {
                release: new,
                strategy: Strategy::default(),
            },
            timeouts: Timeouts {
                health_deadline_secs: 0,
                drain_grace_secs: 0,
            },
        };
        (
            plan(&cluster, SchedulerConfig::default(), &env, &request).unwrap(),
            instances,
        )
    }

    fn store_for(plan: &Plan, old: &[EnvInstance]) -> MemoryStore {
        let mut memory = Memory {
            plan: Some(plan.clone()),
            newest_fence: 1,
            ..Memory::default()
        };
        for instance in old {
            memory
                .instances
                .insert(instance.id, (instance.release, Observed::Healthy));
            memory.routes.insert(instance.id);
        }
        MemoryStore(Mutex::new(memory))
    }

    #[tokio::test]
    async fn pass_completes_rolling_deploy() {
        let (plan, old) = rolling_plan();
        let store = store_for(&plan, &old);
        let report = run_pass(&store, Fence(1), 4).await.unwrap();
        assert_eq!(report.finished, vec![(plan.deploy, Outcome::Succeeded)]);

        let memory = store.0.lock().unwrap();
        assert_eq!(memory.instances.len(), 3);
        assert!(
            memory
                .instances
                .values()
                .all(|(release, _)| *release == plan.to_release)
        );
        assert_eq!(memory.routes, memory.instances.keys().copied().collect());
    }

    #[tokio::test]
    async fn unhealthy_release_rolls_back() {
        let (plan, old) = rolling_plan();
        let store = store_for(&plan, &old);
        store.0.lock().unwrap().unhealthy_release = Some(plan.to_release);

        let report = run_pass(&store, Fence(1), 4).await.unwrap();
        assert!(matches!(report.finished[..], [(_, Outcome::Failed { .. })]));

        let memory = store.0.lock().unwrap();
        assert_eq!(memory.instances.len(), 3);
        let old_release = plan.from_release.unwrap();
        assert!(
            memory
                .instances
                .values()
                .all(|(release, _)| *release == old_release)
        );
        assert_eq!(memory.routes, memory.instances.keys().copied().collect());
    }

    #[tokio::test]
    async fn stale_fence_writes_nothing() {
        let (plan, old) = rolling_plan();
        let store = store_for(&plan, &old);
        store.0.lock().unwrap().newest_fence = 2;
        assert!(run_pass(&store, Fence(1), 4).await.is_err());
        assert!(store.0.lock().unwrap().records.is_empty());
    }

    #[tokio::test]
    async fn resumes_from_records_without_duplicates() {
        let (plan, old) = rolling_plan();
        let store = store_for(&plan, &old);

        // Run the first four steps, then "crash": the next pass starts from the store alone.
        {
            let mut memory = store.0.lock().unwrap();
            memory.plan = Some(Plan {
                steps: plan.steps[..4].to_vec(),
                ..plan.clone()
            });
        }
        run_pass(&store, Fence(1), 4).await.unwrap();
        {
            let mut memory = store.0.lock().unwrap();
            memory.plan = Some(plan.clone());
            memory.finished = None;
        }
        // The effects of step 5 were applied but its outcome never recorded.
        store
            .apply(Fence(2), &plan, &plan.steps[4].actions[0])
            .await
            .unwrap();
        run_pass(&store, Fence(2), 4).await.unwrap();

        let memory = store.0.lock().unwrap();
        assert_eq!(memory.finished, Some(Outcome::Succeeded));
        assert!(
            memory.starts.values().all(|count| *count == 1),
            "{:?}",
            memory.starts
        );
        assert_eq!(memory.instances.len(), 3);
    }
}
