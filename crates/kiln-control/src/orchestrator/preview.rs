//! Plans made ahead of a deploy: the planner over the same snapshot the orchestrator reads,
//! with nothing recorded. The API stores the result as a deploy plan, and applying it hands
//! the stored plan to the orchestrator unchanged.

use std::collections::BTreeMap;

use kiln_api::DeployStrategy;
use kiln_core::{DeployId, EnvId, HostId, InstanceId, ProcessName, ReleaseId};
use kiln_scheduler::plan::{Intent, Plan, PlanError, PlanRequest, plan};

use super::convert;
use super::pg::{Orchestrator, OrchestratorError};

/// Deploy target of a preview.
#[derive(Debug, Clone, Copy)]
pub enum PreviewTarget<'a> {
    /// Roll the env to a release, which need not be stored yet.
    Deploy {
        /// Id of the release.
        release: ReleaseId,
        /// Its manifest.
        spec: &'a kiln_api::ReleaseSpec,
        /// How to replace the old instances.
        strategy: DeployStrategy,
    },
    /// Replace the instances of the current release, all of them or of one process type.
    Restart {
        /// The only process type to restart.
        process: Option<&'a ProcessName>,
        /// The current release's manifest, for its strategy and max surge.
        spec: &'a kiln_api::ReleaseSpec,
    },
}

/// A plan with the names of the hosts it places instances on.
#[derive(Debug, Clone)]
pub struct Preview {
    /// The plan, or why none could be made (such as no host with enough memory).
    pub plan: Result<Plan, PlanError>,
    /// Names of every host in the snapshot, by id.
    pub host_names: BTreeMap<HostId, String>,
    /// Hosts of the env's instances before the plan, by instance.
    pub old_hosts: BTreeMap<InstanceId, HostId>,
}

impl Orchestrator {
    /// Plans `target` for deploy `deploy` of `env` against the current cluster, recording
    /// nothing. The plan's `base_version` is the env's stream version read with the snapshot.
    pub async fn preview(
        &self,
        deploy: DeployId,
        env: EnvId,
        target: PreviewTarget<'_>,
    ) -> Result<Preview, OrchestratorError> {
        let intent = match target {
            PreviewTarget::Deploy {
                release,
                spec,
                strategy,
            } => {
                let scale = self.env_scale(env).await?;
                Intent::Deploy {
                    release: convert::planner_release(release, spec, &scale),
                    strategy: convert::planner_strategy(strategy, spec.max_surge.max(1)),
                }
            }
            PreviewTarget::Restart { process, spec } => Intent::Restart {
                strategy: convert::planner_strategy(spec.strategy, spec.max_surge.max(1)),
                process: process.cloned(),
            },
        };

        let (cluster, state) = self.snapshot(env, None).await?;
        let request = PlanRequest {
            deploy,
            intent,
            timeouts: self.timeouts,
        };
        let host_names = cluster
            .hosts
            .iter()
            .map(|host| (host.id, host.name.clone()))
            .collect();
        let old_hosts = state
            .instances
            .iter()
            .map(|instance| (instance.id, instance.host))
            .collect();
        Ok(Preview {
            plan: plan(&cluster, self.config, &state, &request),
            host_names,
            old_hosts,
        })
    }
}
