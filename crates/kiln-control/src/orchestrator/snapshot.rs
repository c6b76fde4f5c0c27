//! The planner's view of the cluster: every host, every instance that holds resources on one,
//! and the instances that unfinished plans will still start.
//!
//! Capacity is counted from the instances table and from the plans that were recorded but not
//! yet carried out, because a plan's instances hold no row until their step runs. Without the
//! reservations, two deploys planned before either started could both count the same free
//! memory and overcommit a host. The orchestrator reads the cluster once per pass and plans
//! every pending deploy against it, reserving each plan's instances before the next deploy.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kiln_core::{EnvId, HostId, InstanceId, ProcessName, ReleaseId};
use kiln_scheduler::plan::{EnvInstance, EnvState, Plan};
use kiln_scheduler::{ClusterSnapshot, PlacedInstance, Resources};
use sqlx::Row;
use uuid::Uuid;

use super::convert;
use super::pg::{Orchestrator, OrchestratorError};
use crate::store::streams;

/// The cluster as the planner reads it, with each env's running instances.
#[derive(Debug, Clone, Default)]
pub(super) struct Cluster {
    /// Hosts, and the instances that hold or will hold resources on them.
    pub(super) snapshot: ClusterSnapshot,
    /// Instances wanted running, by env, with their release.
    env_instances: HashMap<EnvId, Vec<EnvInstance>>,
}

impl Cluster {
    /// Counts the instances `plan` starts against their hosts' capacity.
    pub(super) fn reserve(&mut self, plan: &Plan) {
        for instance in plan.started_instances() {
            self.snapshot.instances.push(PlacedInstance {
                id: instance.id,
                env: plan.env,
                process: instance.process.clone(),
                host: instance.host,
                resources: instance.resources,
            });
        }
    }
}

/// The columns of an env that planning reads.
#[derive(Debug, Clone)]
pub(super) struct EnvRow {
    /// The release the env runs.
    pub(super) current: Option<ReleaseId>,
    /// Desired instance counts by process type.
    pub(super) scale: BTreeMap<ProcessName, u32>,
}

impl Orchestrator {
    /// Reads the cluster and the env as the planner needs them.
    pub(super) async fn snapshot(
        &self,
        env: EnvId,
        previous: Option<Option<ReleaseId>>,
    ) -> Result<(ClusterSnapshot, EnvState), OrchestratorError> {
        let cluster = self.cluster().await?;
        let row = self.env_row(env).await?;
        let state = self.env_state(env, row, previous, &cluster).await?;
        Ok((cluster.snapshot, state))
    }

    /// Reads every host, every instance wanted running and the instances that unfinished
    /// plans have not started yet.
    pub(super) async fn cluster(&self) -> Result<Cluster, OrchestratorError> {
        let pool = self.store.pool();
        let hosts = sqlx::query("SELECT id, name, state, vcpus, memory_mib FROM hosts ORDER BY id")
            .fetch_all(pool)
            .await
            .map_err(super::pg::query("list hosts"))?;
        let mut cluster = Cluster::default();
        for row in hosts {
            let (Some(vcpus), Some(memory)) = (
                row.get::<Option<i32>, _>("vcpus"),
                row.get::<Option<i64>, _>("memory_mib"),
            ) else {
                continue;
            };
            let state: String = row.get("state");
            let state = match state.as_str() {
                "ready" => kiln_scheduler::HostState::Ready,
                "cordoned" => kiln_scheduler::HostState::Cordoned,
                "draining" => kiln_scheduler::HostState::Draining,
                "lost" => kiln_scheduler::HostState::Dead,
                _ => continue,
            };
            cluster.snapshot.hosts.push(kiln_scheduler::Host {
                id: HostId::from_uuid(row.get("id")),
                name: row.get("name"),
                memory_mib: u64::try_from(memory).unwrap_or(0),
                cpus: u32::try_from(vcpus).unwrap_or(0),
                state,
            });
        }

        // Specs come from the release cache, so each release's JSON is parsed once and not
        // once per instance.
        let rows = sqlx::query(
            "SELECT id, env_id, release_id, process, host_id FROM instances
             WHERE desired = 'running' ORDER BY id",
        )
        .fetch_all(pool)
        .await
        .map_err(super::pg::query("list instances"))?;
        for row in rows {
            let release = ReleaseId::from_uuid(row.get("release_id"));
            let spec = self.load_release(release).await?;
            let process: String = row.get("process");
            let process = ProcessName::new(process.clone())
                .map_err(|_| super::pg::corrupt("instances.process", process))?;
            // An instance whose process the release lacks is its release command's.
            let resources = spec.processes.get(&process).map_or_else(
                || convert::release_command_resources(&spec),
                |process| Resources {
                    memory_mib: u64::from(process.memory_mib),
                    vcpus: process.vcpus,
                },
            );
            let instance = PlacedInstance {
                id: InstanceId::from_uuid(row.get("id")),
                env: EnvId::from_uuid(row.get("env_id")),
                process,
                host: HostId::from_uuid(row.get("host_id")),
                resources,
            };
            cluster
                .env_instances
                .entry(instance.env)
                .or_default()
                .push(EnvInstance {
                    id: instance.id,
                    release,
                    process: instance.process.clone(),
                    host: instance.host,
                    resources,
                });
            cluster.snapshot.instances.push(instance);
        }

        for plan in self.unstarted_plans().await? {
            cluster.reserve(&plan);
        }
        Ok(cluster)
    }

    /// Reads the plans of unfinished deploys, keeping only the instances they have not placed
    /// yet. An instance's stream exists from its placement on and outlives its removal.
    async fn unstarted_plans(&self) -> Result<Vec<Plan>, OrchestratorError> {
        let pool = self.store.pool();
        let values: Vec<serde_json::Value> = sqlx::query_scalar(
            "SELECT p.plan FROM deploy_plans p JOIN deploys d ON d.id = p.deploy_id
             WHERE d.state IN ('pending', 'in_progress') ORDER BY d.created_at",
        )
        .fetch_all(pool)
        .await
        .map_err(super::pg::query("list unfinished plans"))?;
        let mut plans = Vec::with_capacity(values.len());
        for value in values {
            let plan: Plan = serde_json::from_value(value)
                .map_err(|error| super::pg::corrupt("deploy_plans.plan", error))?;
            plans.push(plan);
        }

        let names: Vec<String> = plans
            .iter()
            .flat_map(Plan::started_instances)
            .map(|instance| streams::instance(instance.id))
            .collect();
        if names.is_empty() {
            return Ok(plans);
        }
        let placed: Vec<String> = sqlx::query_scalar("SELECT id FROM streams WHERE id = ANY($1)")
            .bind(&names)
            .fetch_all(pool)
            .await
            .map_err(super::pg::query("check instance placements"))?;
        let placed: BTreeSet<String> = placed.into_iter().collect();

        for plan in &mut plans {
            for step in &mut plan.steps {
                step.actions.retain_mut(|action| match action {
                    kiln_scheduler::plan::Action::StartInstances { instances } => {
                        instances
                            .retain(|instance| !placed.contains(&streams::instance(instance.id)));
                        true
                    }
                    kiln_scheduler::plan::Action::RunReleaseCommand { instance, .. } => {
                        !placed.contains(&streams::instance(instance.id))
                    }
                    _ => true,
                });
            }
        }
        Ok(plans)
    }

    /// Reads an env's current release and scale.
    pub(super) async fn env_row(&self, env: EnvId) -> Result<EnvRow, OrchestratorError> {
        let row = sqlx::query("SELECT current_release_id, scale FROM envs WHERE id = $1")
            .bind(env.as_uuid())
            .fetch_one(self.store.pool())
            .await
            .map_err(super::pg::query("read an env"))?;
        let current: Option<Uuid> = row.get("current_release_id");
        let scale = serde_json::from_value(row.get("scale"))
            .map_err(|error| super::pg::corrupt("envs.scale", error))?;
        Ok(EnvRow {
            current: current.map(ReleaseId::from_uuid),
            scale,
        })
    }

    /// Builds the planner's view of `env` from its row and the cluster. `previous`, when
    /// given, replaces the env's current release (see `record_plan`). The stream version is
    /// read last, so a plan is never bound to a version older than what it was made from.
    pub(super) async fn env_state(
        &self,
        env: EnvId,
        row: EnvRow,
        previous: Option<Option<ReleaseId>>,
        cluster: &Cluster,
    ) -> Result<EnvState, OrchestratorError> {
        let current = match previous {
            Some(previous) => previous,
            None => row.current,
        };
        let current = match current {
            Some(id) => {
                let spec = self.load_release(id).await?;
                Some(convert::planner_release(id, &spec, &row.scale))
            }
            None => None,
        };
        let version = self.store.stream_version(&streams::env(env)).await?;
        Ok(EnvState {
            env,
            version,
            current,
            instances: cluster.env_instances.get(&env).cloned().unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use kiln_core::{DeployId, EnvId, HostId, InstanceId, ProcessName, ReleaseId};
    use kiln_scheduler::plan::{Action, Plan, PlanKind, PlannedInstance, Step};
    use kiln_scheduler::{ClusterSnapshot, Resources};

    use super::*;

    fn planned(host: HostId, release: ReleaseId, process: &str) -> PlannedInstance {
        PlannedInstance {
            id: InstanceId::new(),
            release,
            process: ProcessName::new(process).unwrap(),
            host,
            resources: Resources {
                memory_mib: 256,
                vcpus: 1,
            },
        }
    }

    #[test]
    fn reserve_counts_started_instances() {
        let (host, release) = (HostId::new(), ReleaseId::new());
        let command = planned(host, release, "release-command");
        let web = planned(host, release, "web");
        let plan = Plan {
            deploy: DeployId::new(),
            env: EnvId::new(),
            kind: PlanKind::Deploy,
            base_version: 1,
            from_release: None,
            to_release: release,
            steps: vec![
                Step {
                    name: "release-command".to_owned(),
                    actions: vec![Action::RunReleaseCommand {
                        instance: command.clone(),
                        timeout_secs: 60,
                    }],
                    undo: Vec::new(),
                },
                Step {
                    name: "web/1/start".to_owned(),
                    actions: vec![
                        Action::StartInstances {
                            instances: vec![web.clone()],
                        },
                        Action::WaitHealthy {
                            instances: vec![web.id],
                            deadline_secs: 60,
                        },
                    ],
                    undo: Vec::new(),
                },
            ],
        };
        let mut cluster = Cluster {
            snapshot: ClusterSnapshot::default(),
            env_instances: HashMap::new(),
        };

        cluster.reserve(&plan);

        let reserved: Vec<InstanceId> = cluster.snapshot.instances.iter().map(|i| i.id).collect();
        assert_eq!(reserved, vec![command.id, web.id]);
        assert!(cluster.snapshot.instances.iter().all(|i| i.env == plan.env));
        assert!(cluster.snapshot.instances.iter().all(|i| i.host == host));
    }
}
