//! Deploys: rolling an environment from its current release to a new one. A deploy intent is
//! recorded first; the orchestrator plans and carries it out step by step.

use kiln_core::{DeployId, EnvId, InstanceId, ProcessName, ReleaseId};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::releases::{CreateRelease, DeployStrategy};

/// State of a deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum DeployState {
    /// Recorded, not yet picked up by the orchestrator.
    Pending,
    /// The orchestrator is carrying out the plan.
    InProgress,
    /// Every step finished; the release is live.
    Succeeded,
    /// A step failed; the environment was rolled back to the previous release.
    Failed,
    /// Replaced by a newer deploy of the same environment before it finished.
    Superseded,
}

impl DeployState {
    /// Returns true when the deploy will not change any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Superseded)
    }
}

/// A deploy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Deploy {
    /// Id of the deploy.
    pub id: DeployId,
    /// The environment being deployed.
    pub env_id: EnvId,
    /// The release being rolled out.
    pub release_id: ReleaseId,
    /// The release that was live before; `null` for the first deploy.
    #[serde(default)]
    pub previous_release_id: Option<ReleaseId>,
    /// Strategy.
    pub strategy: DeployStrategy,
    /// Current state.
    pub state: DeployState,
    /// Why the deploy failed, for `failed`.
    #[serde(default)]
    pub failure: Option<String>,
    /// When the deploy was requested.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub created_at: OffsetDateTime,
    /// When the deploy reached its current state.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub updated_at: OffsetDateTime,
}

/// What a deploy rolls out: an existing release, or a new one created in the same call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DeployTarget {
    /// An existing release of the environment, by version (this is also how a rollback to
    /// an older release is asked for).
    ReleaseVersion(u64),
    /// A new release, created and deployed atomically.
    NewRelease(Box<CreateRelease>),
}

/// Body of `POST .../envs/{env}/deploys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateDeploy {
    /// What to deploy.
    pub target: DeployTarget,
    /// Strategy; absent uses the release's.
    #[serde(default)]
    pub strategy: Option<DeployStrategy>,
}

/// Result of `POST .../envs/{env}/deploys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreatedDeploy {
    /// The deploy.
    pub deploy: Deploy,
    /// The release being deployed (new or existing).
    pub release: super::releases::Release,
    /// Event cursor just before the deploy's first event: watch from here to follow it.
    pub cursor: u64,
}

/// Body of `POST .../envs/{env}/plans`: preview what a deploy would do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CreatePlan {
    /// What to deploy.
    pub target: DeployTarget,
    /// Strategy; absent uses the release's.
    #[serde(default)]
    pub strategy: Option<DeployStrategy>,
}

/// One step of a deploy plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum PlanStep {
    /// Start a new instance of a process type on a host.
    StartInstance {
        /// Process type.
        process: ProcessName,
        /// Host chosen by the scheduler (by name).
        host: String,
    },
    /// Wait until the new instances are healthy.
    WaitHealthy,
    /// Point the routes at the new instances.
    ShiftRoutes,
    /// Stop an old instance.
    StopInstance {
        /// The instance.
        instance_id: InstanceId,
    },
}

/// A deploy plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Plan {
    /// Steps in order.
    pub steps: Vec<PlanStep>,
    /// Reasons the plan cannot be carried out (for example not enough memory on any host).
    #[serde(default)]
    pub problems: Vec<String>,
}
