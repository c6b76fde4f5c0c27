//! The deploy planner: rollouts reach the target, rollbacks restore the start, and plans are
//! deterministic. Plans are run on a small model of the cluster that checks every action.

use std::collections::{BTreeMap, BTreeSet};

use kiln_core::{DeployId, HostId, InstanceId, ProcessName, ReleaseId};
use kiln_scheduler::plan::{
    Action, EnvInstance, EnvState, Intent, Plan, PlanError, PlanKind, PlanRequest, ProcessSpec,
    RELEASE_COMMAND_PROCESS, ReleaseCommandSpec, ReleaseSpec, Strategy, Timeouts, plan,
};
use kiln_scheduler::{ClusterSnapshot, HostState, PlacedInstance, SchedulerConfig};
use proptest::prelude::*;
use uuid::Uuid;

use crate::fixtures::{env_id, host, host_id, instance_id, process, release_id, resources};

/// What an executor would leave behind: running instances and routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Model {
    running: BTreeMap<InstanceId, (ReleaseId, ProcessName, HostId)>,
    routes: BTreeMap<ProcessName, BTreeSet<InstanceId>>,
    release: Option<ReleaseId>,
    started: BTreeSet<InstanceId>,
}

impl Model {
    fn from_env(env: &EnvState) -> Self {
        let mut model = Self {
            release: env.current.as_ref().map(|release| release.id),
            ..Self::default()
        };
        for instance in &env.instances {
            model.running.insert(
                instance.id,
                (instance.release, instance.process.clone(), instance.host),
            );
            model.started.insert(instance.id);
            let routed = env
                .current
                .as_ref()
                .and_then(|release| release.processes.get(&instance.process))
                .is_some_and(|spec| spec.routed);
            if routed {
                model
                    .routes
                    .entry(instance.process.clone())
                    .or_default()
                    .insert(instance.id);
            }
        }
        model
    }

    fn apply(&mut self, action: &Action) {
        match action {
            Action::RunReleaseCommand { instance, .. } => {
                assert!(self.started.insert(instance.id), "{} reused", instance.id);
            }
            Action::StartInstances { instances } => {
                for instance in instances {
                    assert!(
                        self.started.insert(instance.id),
                        "{} started twice",
                        instance.id
                    );
                    self.running.insert(
                        instance.id,
                        (instance.release, instance.process.clone(), instance.host),
                    );
                }
            }
            Action::WaitHealthy { instances, .. } => {
                for id in instances {
                    assert!(self.running.contains_key(id), "waiting on stopped {id}");
                }
            }
            Action::UpdateRoutes {
                process,
                add,
                remove,
            } => {
                let routes = self.routes.entry(process.clone()).or_default();
                for id in remove {
                    routes.remove(id);
                }
                for id in add {
                    assert!(self.running.contains_key(id), "routing to stopped {id}");
                    routes.insert(*id);
                }
            }
            Action::StopInstances { instances, .. } => {
                for id in instances {
                    self.running.remove(id);
                    for routes in self.routes.values() {
                        assert!(!routes.contains(id), "stopping routed {id}");
                    }
                }
            }
            Action::SetRelease { release } => self.release = *release,
            Action::SetScale { .. } => {}
        }
    }

    /// Running instances per (release, process type).
    fn counts(&self) -> BTreeMap<(ReleaseId, ProcessName), usize> {
        let mut counts = BTreeMap::new();
        for (release, process, _) in self.running.values() {
            *counts.entry((*release, process.clone())).or_default() += 1;
        }
        counts
    }

    /// Every running instance of a routed process type is routed, and nothing else is.
    fn assert_routes_match(&self, routed: &BTreeSet<ProcessName>) {
        for process in routed {
            let running: BTreeSet<InstanceId> = self
                .running
                .iter()
                .filter(|(_, (_, p, _))| p == process)
                .map(|(id, _)| *id)
                .collect();
            let routes = self.routes.get(process).cloned().unwrap_or_default();
            assert_eq!(routes, running, "routes of {process}");
        }
    }
}

fn deploy_id(n: u128) -> DeployId {
    DeployId::from_uuid(Uuid::from_u128(0x5000_0000 + n))
}

fn release(n: u128, web: u32, worker: u32) -> ReleaseSpec {
    let mut processes = BTreeMap::new();
    if web > 0 {
        processes.insert(
            process("web"),
            ProcessSpec {
                count: web,
                resources: resources(512, 1),
                routed: true,
            },
        );
    }
    if worker > 0 {
        processes.insert(
            process("worker"),
            ProcessSpec {
                count: worker,
                resources: resources(256, 1),
                routed: false,
            },
        );
    }
    ReleaseSpec {
        id: release_id(n),
        processes,
        release_command: None,
    }
}

/// An env running `current` on hosts 1..=hosts (spread round-robin), and the cluster around it.
fn running_env(
    current: &ReleaseSpec,
    hosts: u128,
    host_memory: u64,
) -> (ClusterSnapshot, EnvState) {
    let env = env_id(1);
    let mut instances = Vec::new();
    let mut next = 0_u128;
    for (name, spec) in &current.processes {
        for _ in 0..spec.count {
            instances.push(EnvInstance {
                id: instance_id(next),
                release: current.id,
                process: name.clone(),
                host: host_id(1 + next % hosts),
                resources: spec.resources,
            });
            next += 1;
        }
    }
    let cluster = ClusterSnapshot {
        hosts: (1..=hosts).map(|n| host(n, host_memory, 4)).collect(),
        instances: instances
            .iter()
            .map(|instance| PlacedInstance {
                id: instance.id,
                env,
                process: instance.process.clone(),
                host: instance.host,
                resources: instance.resources,
            })
            .collect(),
    };
    let state = EnvState {
        env,
        version: 7,
        current: Some(current.clone()),
        instances,
    };
    (cluster, state)
}

fn request(intent: Intent) -> PlanRequest {
    PlanRequest {
        deploy: deploy_id(1),
        intent,
        timeouts: Timeouts::default(),
    }
}

fn routed() -> BTreeSet<ProcessName> {
    BTreeSet::from([process("web")])
}

fn step_names(plan: &Plan) -> Vec<&str> {
    plan.steps.iter().map(|step| step.name.as_str()).collect()
}

fn run(plan: &Plan, model: &mut Model) {
    for step in &plan.steps {
        for action in &step.actions {
            model.apply(action);
        }
    }
}

#[test]
fn rolling_deploy_reaches_target() {
    let old = release(1, 3, 1);
    let new = release(2, 3, 2);
    let (cluster, env) = running_env(&old, 3, 8192);
    let intent = Intent::Deploy {
        release: new.clone(),
        strategy: Strategy::Rolling { max_surge: 2 },
    };
    let plan = plan(&cluster, SchedulerConfig::default(), &env, &request(intent)).unwrap();

    assert_eq!(plan.kind, PlanKind::Deploy);
    assert_eq!(plan.base_version, 7);
    assert_eq!(
        step_names(&plan),
        vec![
            "web/1/start",
            "web/1/wait-healthy",
            "web/1/route",
            "web/1/retire",
            "web/2/start",
            "web/2/wait-healthy",
            "web/2/route",
            "web/2/retire",
            "worker/1/start",
            "worker/1/wait-healthy",
            "worker/1/retire",
            "activate",
        ]
    );

    let mut model = Model::from_env(&env);
    run(&plan, &mut model);
    assert_eq!(
        model.counts(),
        BTreeMap::from([
            ((new.id, process("web")), 3),
            ((new.id, process("worker")), 2)
        ])
    );
    assert_eq!(model.release, Some(new.id));
    model.assert_routes_match(&routed());
}

#[test]
fn release_command_runs_first() {
    let old = release(1, 2, 0);
    let mut new = release(2, 2, 0);
    let new_id = new.id;
    new.release_command = Some(ReleaseCommandSpec {
        resources: resources(256, 1),
        timeout_secs: 600,
    });
    let (cluster, env) = running_env(&old, 2, 4096);
    let intent = Intent::Deploy {
        release: new,
        strategy: Strategy::default(),
    };
    let plan = plan(&cluster, SchedulerConfig::default(), &env, &request(intent)).unwrap();
    assert_eq!(plan.steps[0].name, "release-command");
    let [
        Action::RunReleaseCommand {
            instance,
            timeout_secs: 600,
        },
        Action::StopInstances {
            instances: stopped, ..
        },
    ] = &plan.steps[0].actions[..]
    else {
        panic!("unexpected release command actions: {:?}", plan.steps[0]);
    };
    assert_eq!(stopped, &[instance.id]);
    assert_eq!(instance.release, new_id);
    assert!(matches!(
        &plan.steps[0].undo[..],
        [Action::StopInstances { instances, .. }] if instances == &[instance.id]
    ));

    // No old instance is touched before the release command's step.
    for step in &plan.steps[1..] {
        assert!(
            !step
                .actions
                .iter()
                .any(|action| matches!(action, Action::RunReleaseCommand { .. })),
            "the release command runs twice: {plan:?}"
        );
    }
}

#[test]
fn restart_skips_release_command() {
    let mut current = release(1, 2, 0);
    current.release_command = Some(ReleaseCommandSpec {
        resources: resources(256, 1),
        timeout_secs: 600,
    });
    let (cluster, env) = running_env(&current, 2, 4096);
    let intent = Intent::Restart {
        strategy: Strategy::default(),
        process: None,
    };
    let plan = plan(&cluster, SchedulerConfig::default(), &env, &request(intent)).unwrap();
    assert!(
        plan.started_instances()
            .all(|instance| instance.process.as_str() != RELEASE_COMMAND_PROCESS),
        "{plan:?}"
    );
}

#[test]
fn rolling_surge_needs_spare_capacity() {
    // Each host fits exactly three web instances: (2048 - 1024 reserve) / (256 + 64 overhead).
    let old = release(1, 5, 0);
    let mut new = release(2, 5, 0);
    for spec in new.processes.values_mut() {
        spec.resources = resources(256, 1);
    }
    let mut old_small = old.clone();
    for spec in old_small.processes.values_mut() {
        spec.resources = resources(256, 1);
    }
    let (cluster, env) = running_env(&old_small, 2, 2048);

    let surge_one = Intent::Deploy {
        release: new.clone(),
        strategy: Strategy::Rolling { max_surge: 1 },
    };
    assert!(
        plan(
            &cluster,
            SchedulerConfig::default(),
            &env,
            &request(surge_one)
        )
        .is_ok()
    );

    let surge_two = Intent::Deploy {
        release: new.clone(),
        strategy: Strategy::Rolling { max_surge: 2 },
    };
    let error = plan(
        &cluster,
        SchedulerConfig::default(),
        &env,
        &request(surge_two),
    )
    .unwrap_err();
    assert!(
        matches!(&error, PlanError::Schedule { step, .. } if step == "web/1/start"),
        "{error}"
    );

    let immediate = Intent::Deploy {
        release: new,
        strategy: Strategy::Immediate,
    };
    let plan = plan(
        &cluster,
        SchedulerConfig::default(),
        &env,
        &request(immediate),
    )
    .unwrap();
    assert_eq!(
        step_names(&plan),
        vec![
            "web/retire",
            "web/start",
            "web/wait-healthy",
            "web/route",
            "activate"
        ]
    );
}

#[test]
fn same_inputs_same_plan() {
    let (cluster, env) = running_env(&release(1, 4, 2), 3, 8192);
    let intent = Intent::Deploy {
        release: release(2, 4, 2),
        strategy: Strategy::default(),
    };
    let first = plan(
        &cluster,
        SchedulerConfig::default(),
        &env,
        &request(intent.clone()),
    )
    .unwrap();
    let second = plan(&cluster, SchedulerConfig::default(), &env, &request(intent)).unwrap();
    assert_eq!(first, second);
    assert_eq!(first.digest(), second.digest());
    assert_eq!(first.digest().len(), 64);
}

#[test]
fn new_instance_ids_unique() {
    let (cluster, env) = running_env(&release(1, 6, 3), 4, 16384);
    let intent = Intent::Deploy {
        release: release(2, 6, 3),
        strategy: Strategy::Rolling { max_surge: 2 },
    };
    let plan = plan(&cluster, SchedulerConfig::default(), &env, &request(intent)).unwrap();
    let mut ids = BTreeSet::new();
    for instance in plan.started_instances() {
        assert!(ids.insert(instance.id), "{} repeated", instance.id);
    }
    // Restored instances in undo lists are new ids too.
    for step in &plan.steps {
        for action in &step.undo {
            if let Action::StartInstances { instances } = action {
                for instance in instances {
                    assert!(ids.insert(instance.id), "{} repeated", instance.id);
                }
            }
        }
    }
}

#[test]
fn zero_surge_rejected() {
    let (cluster, env) = running_env(&release(1, 1, 0), 1, 4096);
    let intent = Intent::Deploy {
        release: release(2, 1, 0),
        strategy: Strategy::Rolling { max_surge: 0 },
    };
    assert_eq!(
        plan(&cluster, SchedulerConfig::default(), &env, &request(intent)),
        Err(PlanError::ZeroMaxSurge)
    );
}

#[test]
fn scale_up_and_down() {
    let current = release(1, 2, 3);
    let (cluster, env) = running_env(&current, 3, 8192);
    let intent = Intent::Scale {
        counts: BTreeMap::from([(process("web"), 4), (process("worker"), 1)]),
    };
    let plan = plan(&cluster, SchedulerConfig::default(), &env, &request(intent)).unwrap();
    assert_eq!(plan.kind, PlanKind::Scale);
    assert_eq!(
        step_names(&plan),
        vec![
            "web/scale-up/start",
            "web/scale-up/wait-healthy",
            "web/scale-up/route",
            "worker/scale-down",
            "set-scale"
        ]
    );

    let mut model = Model::from_env(&env);
    run(&plan, &mut model);
    assert_eq!(
        model.counts(),
        BTreeMap::from([
            ((current.id, process("web")), 4),
            ((current.id, process("worker")), 1)
        ])
    );
    model.assert_routes_match(&routed());
}

#[test]
fn scale_down_keeps_spread() {
    // Four workers: two on h1, one on h2, one on h3. Scaling to 3 must stop one on h1.
    let current = release(1, 0, 4);
    let (cluster, env) = running_env(&current, 3, 8192);
    let intent = Intent::Scale {
        counts: BTreeMap::from([(process("worker"), 3)]),
    };
    let plan = plan(&cluster, SchedulerConfig::default(), &env, &request(intent)).unwrap();
    let Action::StopInstances { instances, .. } = &plan.steps[0].actions[0] else {
        panic!("expected a stop, got {:?}", plan.steps[0].actions);
    };
    let stopped_host = env
        .instances
        .iter()
        .find(|instance| instance.id == instances[0])
        .unwrap()
        .host;
    assert_eq!(stopped_host, host_id(1));
}

#[test]
fn scale_unknown_process_rejected() {
    let (cluster, env) = running_env(&release(1, 1, 0), 1, 4096);
    let intent = Intent::Scale {
        counts: BTreeMap::from([(process("cron"), 1)]),
    };
    let error = plan(&cluster, SchedulerConfig::default(), &env, &request(intent)).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "release {} has no process type cron; use one of: web",
            release_id(1)
        )
    );
}

#[test]
fn scale_without_release_rejected() {
    let (cluster, mut env) = running_env(&release(1, 1, 0), 1, 4096);
    env.current = None;
    let intent = Intent::Scale {
        counts: BTreeMap::new(),
    };
    assert_eq!(
        plan(&cluster, SchedulerConfig::default(), &env, &request(intent)),
        Err(PlanError::NoCurrentRelease { env: env.env })
    );
}

#[test]
fn restart_replaces_every_instance() {
    let mut current = release(1, 2, 1);
    current.release_command = Some(kiln_scheduler::plan::ReleaseCommandSpec {
        resources: resources(256, 1),
        timeout_secs: 60,
    });
    let (cluster, env) = running_env(&current, 2, 8192);
    let intent = Intent::Restart {
        strategy: Strategy::default(),
        process: None,
    };
    let plan = plan(&cluster, SchedulerConfig::default(), &env, &request(intent)).unwrap();
    assert!(!step_names(&plan).contains(&"activate"));
    assert!(!step_names(&plan).contains(&"release-command"));

    let mut model = Model::from_env(&env);
    run(&plan, &mut model);
    let old: BTreeSet<InstanceId> = env.instances.iter().map(|i| i.id).collect();
    assert!(model.running.keys().all(|id| !old.contains(id)));
    assert_eq!(model.running.len(), 3);
    model.assert_routes_match(&routed());
}

#[test]
fn restart_of_one_process_keeps_others() {
    let current = release(1, 2, 1);
    let (cluster, env) = running_env(&current, 2, 8192);
    let worker = ProcessName::new("worker").unwrap();
    let intent = Intent::Restart {
        strategy: Strategy::default(),
        process: Some(worker.clone()),
    };
    let plan = plan(&cluster, SchedulerConfig::default(), &env, &request(intent)).unwrap();
    assert_eq!(plan.kind, PlanKind::Restart);
    assert!(plan.started_instances().all(|i| i.process == worker));

    let mut model = Model::from_env(&env);
    run(&plan, &mut model);
    let old_web: BTreeSet<InstanceId> = env
        .instances
        .iter()
        .filter(|i| i.process.as_str() == "web")
        .map(|i| i.id)
        .collect();
    let old_worker: BTreeSet<InstanceId> = env
        .instances
        .iter()
        .filter(|i| i.process == worker)
        .map(|i| i.id)
        .collect();
    assert!(old_web.iter().all(|id| model.running.contains_key(id)));
    assert!(old_worker.iter().all(|id| !model.running.contains_key(id)));
    assert_eq!(model.running.len(), 3);
    model.assert_routes_match(&routed());
}

#[test]
fn restart_of_unknown_process_rejected() {
    let current = release(1, 2, 1);
    let (cluster, env) = running_env(&current, 2, 8192);
    let intent = Intent::Restart {
        strategy: Strategy::default(),
        process: Some(ProcessName::new("cron").unwrap()),
    };
    let error = plan(&cluster, SchedulerConfig::default(), &env, &request(intent)).unwrap_err();
    assert!(
        matches!(&error, PlanError::UnknownProcess { process, .. } if process.as_str() == "cron"),
        "{error}"
    );
    assert!(
        error.to_string().contains("use one of: web, worker"),
        "{error}"
    );
}

#[test]
fn lost_instances_replaced_elsewhere() {
    let current = release(1, 4, 0);
    let (mut cluster, env) = running_env(&current, 4, 8192);
    cluster.hosts[1].state = HostState::Dead;
    let dead = cluster.hosts[1].id;

    let plan = plan(
        &cluster,
        SchedulerConfig::default(),
        &env,
        &request(Intent::ReplaceLost),
    )
    .unwrap();
    assert_eq!(plan.kind, PlanKind::ReplaceLost);
    for instance in plan.started_instances() {
        assert_ne!(instance.host, dead);
    }

    let mut model = Model::from_env(&env);
    run(&plan, &mut model);
    assert_eq!(model.running.len(), 4);
    assert!(model.running.values().all(|(_, _, host)| *host != dead));
    model.assert_routes_match(&routed());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever step fails, running the undo list leaves the env as it was: the old release's
    /// counts, all routed, and no new instance left.
    #[test]
    fn rollback_restores_start(
        old_web in 0_u32..5,
        old_worker in 0_u32..4,
        new_web in 0_u32..5,
        new_worker in 0_u32..4,
        surge in 1_u32..4,
        immediate in any::<bool>(),
        failing in any::<prop::sample::Index>(),
    ) {
        prop_assume!(new_web + new_worker > 0);
        let old = release(1, old_web, old_worker);
        let new = release(2, new_web, new_worker);
        let (cluster, env) = running_env(&old, 3, 16384);
        let strategy = if immediate { Strategy::Immediate } else { Strategy::Rolling { max_surge: surge } };
        let intent = Intent::Deploy { release: new.clone(), strategy };
        let plan = plan(&cluster, SchedulerConfig::default(), &env, &request(intent)).unwrap();

        // Success reaches the target.
        let mut done = Model::from_env(&env);
        run(&plan, &mut done);
        let mut wanted = BTreeMap::new();
        for (name, spec) in &new.processes {
            wanted.insert((new.id, name.clone()), spec.count as usize);
        }
        prop_assert_eq!(done.counts(), wanted);
        done.assert_routes_match(&routed());

        // A failure at any step rolls back to the start.
        let failed = failing.index(plan.steps.len());
        let mut model = Model::from_env(&env);
        for step in &plan.steps[..=failed] {
            for action in &step.actions {
                model.apply(action);
            }
        }
        for action in plan.rollback_actions(failed) {
            model.apply(&action);
        }
        let start = Model::from_env(&env);
        prop_assert_eq!(model.counts(), start.counts());
        prop_assert_eq!(model.release, start.release);
        model.assert_routes_match(&routed());
    }
}
