//! Deploys: rolling an environment from its current release to a new one. A deploy intent is
//! recorded first; the orchestrator plans and carries it out step by step.

use kiln_core::{DeployId, EnvId, ProcessName, ReleaseId};
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
    /// An existing release of the environment, by version. The current release is deployed
    /// again as it is. Any other version is a rollback: a new release is created with that
    /// release's image digest, manifest and config vars (`rollback_of` names it), and the
    /// environment's config vars are set back to that release's values.
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

/// Body of `POST .../envs/{env}/restart`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RestartEnv {
    /// The only process type to restart; absent restarts every process type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessName>,
}
