//! Stream names. An event's stream is the unit of optimistic concurrency: appends to one
//! stream are ordered by its version, appends to different streams do not conflict.

use kiln_core::{DeployId, EnvId, HostId, InstanceId, OrgId};

/// The stream of cluster-wide events (operator and ingress tokens).
pub const CLUSTER: &str = "cluster";

/// The stream of an org: the org, its tokens and its apps.
pub fn org(id: OrgId) -> String {
    format!("org:{id}")
}

/// The stream of an environment: config, secrets, releases, deploy intents and routes.
pub fn env(id: EnvId) -> String {
    format!("env:{id}")
}

/// The stream of one deploy's progress.
pub fn deploy(id: DeployId) -> String {
    format!("deploy:{id}")
}

/// The stream of one instance: placement, state reports, stop and removal.
pub fn instance(id: InstanceId) -> String {
    format!("instance:{id}")
}

/// The stream of a host: creation, registration, cordon, drain, loss.
pub fn host(id: HostId) -> String {
    format!("host:{id}")
}
