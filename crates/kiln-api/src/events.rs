//! Events: the audit log and the change feed. Every state change in Kiln is one of these,
//! appended to the control plane's event log; `GET .../events` serves them after a cursor and
//! long-polls for new ones, which is how `kiln deploy` follows a rollout.
//!
//! Events never carry secret values, only names, versions and digests.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use kiln_core::{AppId, AppName, DeployId, EnvId, EnvName, HostId, Hostname, InstanceId};
use kiln_core::{OrgId, OrgName, ProcessName, ReleaseId, TokenId};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::types::{
    DeployState, DeployStrategy, HostCapacity, Release, Route, TokenKind, VmmDriver,
};

/// Lifecycle state of an instance as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Placed by the scheduler; the agent has not reported yet.
    Pending,
    /// The agent is pulling the image and building the root filesystem.
    Preparing,
    /// The microVM is booting.
    Booting,
    /// The workload runs; no health check has passed yet.
    Running,
    /// The health check passes.
    Healthy,
    /// The health check fails.
    Unhealthy,
    /// The kill signal was sent; waiting for exit.
    Stopping,
    /// The workload exited (after a stop, or on its own).
    Exited,
    /// The instance could not be started or crashed; the detail says why.
    Failed,
}

impl InstanceState {
    /// Returns true when the microVM is gone.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Exited | Self::Failed)
    }
}

/// One change. Serialized as `{"type": "...", "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", content = "data")]
pub enum Event {
    /// An org was created.
    OrgCreated {
        /// The org.
        org_id: OrgId,
        /// Its name.
        name: OrgName,
    },
    /// A token was created (its secret is never in an event).
    TokenCreated {
        /// The token.
        token_id: TokenId,
        /// Kind.
        kind: TokenKind,
        /// Org of an org token.
        org_id: Option<OrgId>,
        /// Host of a host token.
        host_id: Option<HostId>,
        /// Label.
        name: String,
        /// Expiry.
        #[serde(with = "time::serde::rfc3339::option")]
        #[cfg_attr(
            feature = "schema",
            schemars(schema_with = "crate::schema::optional_timestamp")
        )]
        expires_at: Option<OffsetDateTime>,
    },
    /// A token was revoked.
    TokenRevoked {
        /// The token.
        token_id: TokenId,
    },
    /// An app was created.
    AppCreated {
        /// The app.
        app_id: AppId,
        /// Its org.
        org_id: OrgId,
        /// Its name.
        name: AppName,
    },
    /// An app was deleted (it had no environments left).
    AppDeleted {
        /// The app.
        app_id: AppId,
    },
    /// An environment was created.
    EnvCreated {
        /// The environment.
        env_id: EnvId,
        /// Its app.
        app_id: AppId,
        /// Its org.
        org_id: OrgId,
        /// Its name.
        name: EnvName,
        /// Its platform hostname.
        hostname: Hostname,
        /// Its dedicated IPv6 address.
        ipv6_address: Ipv6Addr,
    },
    /// An environment was deleted.
    EnvDeleted {
        /// The environment.
        env_id: EnvId,
    },
    /// Instance counts of an environment changed.
    EnvScaled {
        /// The environment.
        env_id: EnvId,
        /// New counts of the named process types.
        counts: BTreeMap<ProcessName, u32>,
    },
    /// Config vars changed.
    ConfigChanged {
        /// The environment.
        env_id: EnvId,
        /// New config version.
        version: u64,
        /// Variables set (config vars are not secret).
        set: BTreeMap<String, String>,
        /// Variables removed.
        unset: Vec<String>,
    },
    /// A secret was set. Only its name, version and digest are recorded.
    SecretSet {
        /// The environment.
        env_id: EnvId,
        /// Secret name.
        name: String,
        /// Version of this secret.
        version: u64,
        /// Keyed digest of the value (see [`crate::SecretMeta::digest`]).
        digest: String,
        /// New version of the environment's secret set.
        secrets_version: u64,
    },
    /// A secret was removed.
    SecretUnset {
        /// The environment.
        env_id: EnvId,
        /// Secret name.
        name: String,
        /// New version of the environment's secret set.
        secrets_version: u64,
    },
    /// A release was created.
    ReleaseCreated {
        /// The release, including its spec.
        release: Box<Release>,
    },
    /// A deploy was requested.
    DeployRequested {
        /// The deploy.
        deploy_id: DeployId,
        /// The environment.
        env_id: EnvId,
        /// The release to roll out.
        release_id: ReleaseId,
        /// The release live before.
        previous_release_id: Option<ReleaseId>,
        /// Strategy.
        strategy: DeployStrategy,
    },
    /// A deploy changed state.
    DeployStateChanged {
        /// The deploy.
        deploy_id: DeployId,
        /// The environment.
        env_id: EnvId,
        /// The new state.
        state: DeployState,
        /// Why it failed, for `failed`.
        failure: Option<String>,
    },
    /// A named deploy step finished (for progress display and crash recovery).
    DeployStepCompleted {
        /// The deploy.
        deploy_id: DeployId,
        /// The environment.
        env_id: EnvId,
        /// Step name, such as `start_instances` or `shift_routes`.
        step: String,
        /// Human-readable detail.
        detail: String,
        /// The release command's last output lines, for the step that ran it.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        output: Vec<String>,
    },
    /// The environment's current release changed (deploy start, rollback).
    EnvReleaseChanged {
        /// The environment.
        env_id: EnvId,
        /// The release it now runs or rolls to.
        release_id: ReleaseId,
    },
    /// The scheduler placed an instance on a host.
    InstancePlaced {
        /// The instance.
        instance_id: InstanceId,
        /// Its environment.
        env_id: EnvId,
        /// Its release.
        release_id: ReleaseId,
        /// Process type.
        process: ProcessName,
        /// The host.
        host_id: HostId,
        /// Overlay address.
        ipv6: Ipv6Addr,
        /// Private IPv4 address.
        ipv4: Ipv4Addr,
    },
    /// An agent reported an instance state change.
    InstanceStateChanged {
        /// The instance.
        instance_id: InstanceId,
        /// Its environment.
        env_id: EnvId,
        /// Its host.
        host_id: HostId,
        /// The new state.
        state: InstanceState,
        /// Detail, such as a health-check failure.
        detail: Option<String>,
        /// Exit code, for `exited` and `failed`.
        exit_code: Option<i32>,
        /// Last output lines of a run-once instance (a release command), for `exited` and
        /// `failed`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        output: Vec<String>,
    },
    /// The control plane asked for an instance to stop.
    InstanceStopRequested {
        /// The instance.
        instance_id: InstanceId,
        /// Its environment.
        env_id: EnvId,
        /// Its host.
        host_id: HostId,
        /// Why (`deploy`, `scale`, `drain`, `env_deleted`, ...).
        reason: String,
    },
    /// A stopped instance was removed; its addresses are free again.
    InstanceRemoved {
        /// The instance.
        instance_id: InstanceId,
        /// Its environment.
        env_id: EnvId,
        /// Its host.
        host_id: HostId,
    },
    /// The routes of an environment were replaced.
    RoutesChanged {
        /// The environment.
        env_id: EnvId,
        /// Its complete new set of routes.
        routes: Vec<Route>,
    },
    /// An operator created a host.
    HostCreated {
        /// The host.
        host_id: HostId,
        /// Its name.
        name: String,
    },
    /// A host's agent registered (or registered again after a restart).
    HostRegistered {
        /// The host.
        host_id: HostId,
        /// Capacity.
        capacity: HostCapacity,
        /// VMM driver.
        driver: VmmDriver,
        /// WireGuard public key.
        overlay_public_key: String,
        /// WireGuard endpoint.
        overlay_endpoint: SocketAddr,
        /// The /64 assigned to the host.
        ipv6_prefix: String,
    },
    /// A host was cordoned.
    HostCordoned {
        /// The host.
        host_id: HostId,
    },
    /// A host was uncordoned.
    HostUncordoned {
        /// The host.
        host_id: HostId,
    },
    /// A host drain was requested.
    HostDrainRequested {
        /// The host.
        host_id: HostId,
    },
    /// A host's lease expired.
    HostLost {
        /// The host.
        host_id: HostId,
    },
    /// A dedicated IPv4 address was allocated to an environment. A billing event: the
    /// address is billed from this event until its [`Event::Ipv4AddressReleased`].
    Ipv4AddressAllocated {
        /// The environment.
        env_id: EnvId,
        /// The address.
        address: Ipv4Addr,
        /// The pool prefix (CIDR) it came from.
        pool: String,
    },
    /// A dedicated IPv4 address was released, on request or because its environment was
    /// deleted. A billing event: billing of the address stops here.
    Ipv4AddressReleased {
        /// The environment.
        env_id: EnvId,
        /// The address.
        address: Ipv4Addr,
        /// The pool prefix (CIDR) it came from.
        pool: String,
    },
}

impl Event {
    /// Returns the event's type name as stored in the log, such as `ReleaseCreated`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::OrgCreated { .. } => "OrgCreated",
            Self::TokenCreated { .. } => "TokenCreated",
            Self::TokenRevoked { .. } => "TokenRevoked",
            Self::AppCreated { .. } => "AppCreated",
            Self::AppDeleted { .. } => "AppDeleted",
            Self::EnvCreated { .. } => "EnvCreated",
            Self::EnvDeleted { .. } => "EnvDeleted",
            Self::EnvScaled { .. } => "EnvScaled",
            Self::ConfigChanged { .. } => "ConfigChanged",
            Self::SecretSet { .. } => "SecretSet",
            Self::SecretUnset { .. } => "SecretUnset",
            Self::ReleaseCreated { .. } => "ReleaseCreated",
            Self::DeployRequested { .. } => "DeployRequested",
            Self::DeployStateChanged { .. } => "DeployStateChanged",
            Self::DeployStepCompleted { .. } => "DeployStepCompleted",
            Self::EnvReleaseChanged { .. } => "EnvReleaseChanged",
            Self::InstancePlaced { .. } => "InstancePlaced",
            Self::InstanceStateChanged { .. } => "InstanceStateChanged",
            Self::InstanceStopRequested { .. } => "InstanceStopRequested",
            Self::InstanceRemoved { .. } => "InstanceRemoved",
            Self::RoutesChanged { .. } => "RoutesChanged",
            Self::HostCreated { .. } => "HostCreated",
            Self::HostRegistered { .. } => "HostRegistered",
            Self::HostCordoned { .. } => "HostCordoned",
            Self::HostUncordoned { .. } => "HostUncordoned",
            Self::HostDrainRequested { .. } => "HostDrainRequested",
            Self::HostLost { .. } => "HostLost",
            Self::Ipv4AddressAllocated { .. } => "Ipv4AddressAllocated",
            Self::Ipv4AddressReleased { .. } => "Ipv4AddressReleased",
        }
    }

    /// Returns the environment the event concerns, if any.
    pub fn env_id(&self) -> Option<EnvId> {
        match self {
            Self::EnvCreated { env_id, .. }
            | Self::EnvDeleted { env_id }
            | Self::EnvScaled { env_id, .. }
            | Self::ConfigChanged { env_id, .. }
            | Self::SecretSet { env_id, .. }
            | Self::SecretUnset { env_id, .. }
            | Self::DeployRequested { env_id, .. }
            | Self::DeployStateChanged { env_id, .. }
            | Self::DeployStepCompleted { env_id, .. }
            | Self::EnvReleaseChanged { env_id, .. }
            | Self::InstancePlaced { env_id, .. }
            | Self::InstanceStateChanged { env_id, .. }
            | Self::InstanceStopRequested { env_id, .. }
            | Self::InstanceRemoved { env_id, .. }
            | Self::RoutesChanged { env_id, .. }
            | Self::Ipv4AddressAllocated { env_id, .. }
            | Self::Ipv4AddressReleased { env_id, .. } => Some(*env_id),
            Self::ReleaseCreated { release } => Some(release.env_id),
            _ => None,
        }
    }

    /// Returns the host the event concerns, if any.
    pub fn host_id(&self) -> Option<HostId> {
        match self {
            Self::InstancePlaced { host_id, .. }
            | Self::InstanceStateChanged { host_id, .. }
            | Self::InstanceStopRequested { host_id, .. }
            | Self::InstanceRemoved { host_id, .. }
            | Self::HostCreated { host_id, .. }
            | Self::HostRegistered { host_id, .. }
            | Self::HostCordoned { host_id }
            | Self::HostUncordoned { host_id }
            | Self::HostDrainRequested { host_id }
            | Self::HostLost { host_id } => Some(*host_id),
            Self::TokenCreated { host_id, .. } => *host_id,
            _ => None,
        }
    }
}

/// An event as stored in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EventEnvelope {
    /// Global position in the log, from 1, gap-free in commit order as served.
    pub seq: u64,
    /// Stream the event belongs to, such as `env:env_0190...`.
    pub stream: String,
    /// Version of the stream after this event, from 1.
    pub stream_version: u64,
    /// The org the event belongs to; `null` for cluster events (hosts, operator tokens).
    #[serde(default)]
    pub org_id: Option<OrgId>,
    /// Who caused it: `token:tok_...`, `host:host_...` or `system:<component>`.
    pub actor: String,
    /// When it was appended.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub time: OffsetDateTime,
    /// The change.
    #[serde(flatten)]
    pub event: Event,
}

/// Result of the events endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EventPage {
    /// Events after the requested cursor, oldest first.
    pub events: Vec<EventEnvelope>,
    /// Pass as `after` to continue; it never passes an event that is not yet visible.
    pub cursor: u64,
}

/// Query of `GET /v1/orgs/{org}/events`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// Events after this cursor.
    #[serde(default)]
    pub after: Option<u64>,
    /// Seconds to wait when there is nothing new.
    #[serde(default)]
    pub wait: Option<u64>,
    /// Only events of this app (by name).
    #[serde(default)]
    pub app: Option<AppName>,
    /// Only events of this environment (by name; needs `app`).
    #[serde(default)]
    pub env: Option<EnvName>,
    /// At most this many events (default and maximum 1000).
    #[serde(default)]
    pub limit: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_flattens_type_and_data() {
        let envelope = EventEnvelope {
            seq: 7,
            stream: "host:x".to_owned(),
            stream_version: 1,
            org_id: None,
            actor: "system:test".to_owned(),
            time: OffsetDateTime::UNIX_EPOCH,
            event: Event::HostLost {
                host_id: HostId::new(),
            },
        };
        let json = serde_json::to_value(&envelope).unwrap();
        assert_eq!(json["type"], "HostLost");
        assert!(json["data"]["host_id"].is_string());
        let back: EventEnvelope = serde_json::from_value(json).unwrap();
        assert_eq!(back, envelope);
    }

    #[test]
    fn type_name_matches_serde_tag() {
        let event = Event::TokenRevoked {
            token_id: TokenId::new(),
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], event.type_name());
    }
}
