//! Deploy plans: what a deploy would do, computed and stored before anything changes.
//!
//! A plan is bound to the environment's event-stream version at the time it was made.
//! Applying it carries out exactly the stored release and placements, or fails with
//! [`crate::ErrorCode::PlanConflict`] when the environment changed in between (a config or
//! secret change, another deploy, a scale).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use kiln_core::{DeployId, EnvId, InstanceId, ProcessName, ReleaseId};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;
use uuid::Uuid;

use super::deploys::DeployTarget;
use super::releases::{DeployStrategy, ImageRef};

/// Id of a stored plan, printed as `pln_` followed by the UUID in simple form. The UUID is
/// derived from the plan's inputs, so the same request against the same state gets the same id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlanId(Uuid);

impl PlanId {
    /// The prefix printed before the UUID.
    pub const PREFIX: &'static str = "pln";

    /// Wraps a UUID.
    pub const fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// Returns the UUID inside.
    pub const fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for PlanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}", Self::PREFIX, self.0.simple())
    }
}

impl fmt::Debug for PlanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for PlanId {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed("PlanId")
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "`pln_` and a UUID in simple form, as `kiln plan` prints it.",
            "examples": ["pln_0193a1b2c3d47e8f9a0b1c2d3e4f5a6b"],
        })
    }
}

/// A plan id that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid plan id {value:?}: expected `pln_` followed by a UUID, as `kiln plan` prints it")]
pub struct PlanIdError {
    /// The rejected input.
    pub value: String,
}

impl FromStr for PlanId {
    type Err = PlanIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let raw = s.strip_prefix("pln_").unwrap_or(s);
        Uuid::parse_str(raw).map(Self).map_err(|_| PlanIdError {
            value: s.to_owned(),
        })
    }
}

impl Serialize for PlanId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PlanId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Body of `POST .../envs/{env}/plans`: what the deploy would roll out, as for
/// `POST .../deploys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CreatePlan {
    /// The release to deploy.
    pub target: DeployTarget,
    /// Strategy; absent uses the release's.
    #[serde(default)]
    pub strategy: Option<DeployStrategy>,
}

/// Body of `POST .../envs/{env}/plans/{plan}/apply`; it has no fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ApplyPlan {}

/// A release as a plan shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PlanRelease {
    /// Id of the release (for a new release, the id it gets when the plan is applied).
    pub id: ReleaseId,
    /// Version number within the environment.
    pub version: u64,
    /// The image.
    pub image: ImageRef,
    /// Config version whose values the release's instances get.
    pub config_version: u64,
    /// Version of the environment's secret set: for the current release, the version when
    /// the release was created; for the new one, the version its instances get.
    pub secrets_version: u64,
    /// For a rollback: the release whose image, manifest and config this one repeats.
    #[serde(default)]
    pub rollback_of: Option<ReleaseId>,
}

/// Difference between the environment's current release and the planned one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ReleaseChange {
    /// The release the environment runs now; `null` before its first deploy.
    #[serde(default)]
    pub from: Option<PlanRelease>,
    /// The release the deploy rolls out.
    pub to: PlanRelease,
    /// Whether applying the plan creates `to` (a new release or a rollback release).
    pub creates_release: bool,
    /// Whether the image digest changes.
    pub image_changed: bool,
    /// Config vars added or changed, by name (config values are not secret but can be long,
    /// so only names are listed).
    pub config_set: Vec<String>,
    /// Config vars removed, by name.
    pub config_unset: Vec<String>,
    /// Whether the secret set version changes.
    pub secrets_changed: bool,
}

/// One action of a plan step, with hosts by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum PlanAction {
    /// Run the release command in a one-off microVM; a non-zero exit or the timeout fails
    /// the deploy before any instance is replaced.
    RunReleaseCommand {
        /// The one-off instance.
        instance_id: InstanceId,
        /// The host it runs on.
        host: String,
        /// Time the command gets to exit 0, in seconds.
        timeout_secs: u64,
    },
    /// Start a new instance.
    StartInstance {
        /// The new instance.
        instance_id: InstanceId,
        /// Its process type.
        process: ProcessName,
        /// Its release.
        release_id: ReleaseId,
        /// The host chosen by the scheduler.
        host: String,
    },
    /// Wait until the instances report healthy.
    WaitHealthy {
        /// The instances.
        instances: Vec<InstanceId>,
        /// Deadline from the start of the step, in seconds.
        deadline_secs: u64,
    },
    /// Change which instances of a process type receive traffic.
    UpdateRoutes {
        /// The process type.
        process: ProcessName,
        /// Instances added to the routes.
        add: Vec<InstanceId>,
        /// Instances removed from the routes.
        remove: Vec<InstanceId>,
    },
    /// Stop an instance (kill signal, grace period, kill).
    StopInstance {
        /// The instance.
        instance_id: InstanceId,
        /// The host it runs on.
        host: String,
        /// Seconds between the kill signal and a forced stop.
        grace_secs: u64,
    },
    /// Set the environment's current release.
    SetRelease {
        /// The release.
        release_id: Option<ReleaseId>,
    },
    /// Set instance counts of the current release.
    SetScale {
        /// Counts by process type.
        counts: BTreeMap<ProcessName, u32>,
    },
}

/// A named step of a plan; a failed step rolls back it and every earlier step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PlanStep {
    /// Name, unique within the plan, such as `web/1/start`.
    pub name: String,
    /// Actions, in order.
    pub actions: Vec<PlanAction>,
}

/// A stored deploy plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Plan {
    /// Id of the plan; pass it to `POST .../plans/{plan}/apply`.
    pub id: PlanId,
    /// The environment.
    pub env_id: EnvId,
    /// Id the deploy gets when the plan is applied.
    pub deploy_id: DeployId,
    /// The environment's event-stream version the plan is bound to.
    pub base_version: u64,
    /// Strategy.
    pub strategy: DeployStrategy,
    /// The release change.
    pub release: ReleaseChange,
    /// Steps, in order.
    pub steps: Vec<PlanStep>,
    /// When the plan was made.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub created_at: OffsetDateTime,
    /// After this time the plan can no longer be applied.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub expires_at: OffsetDateTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_id_round_trips() {
        let id = PlanId::from_uuid(Uuid::from_u128(0x0190_f3c2));
        let text = id.to_string();
        assert!(text.starts_with("pln_"), "{text}");
        assert_eq!(text.parse::<PlanId>().unwrap(), id);
        let bare = text.trim_start_matches("pln_");
        assert_eq!(bare.parse::<PlanId>().unwrap(), id);
    }

    #[test]
    fn plan_id_rejects_garbage() {
        let error = "pln_nope".parse::<PlanId>().unwrap_err();
        assert!(error.to_string().contains("\"pln_nope\""), "{error}");
    }
}
