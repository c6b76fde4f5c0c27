//! Kiln's shared vocabulary: typed ids, validated names and the `kiln.toml` manifest.
//!
//! Every other crate depends on this one, so it stays small and free of I/O. The types here
//! are the words of the design (org, app, environment, process type, release, instance,
//! host, deploy) and carry their validation with them, so a value that exists is valid.

pub mod ids;
pub mod manifest;
pub mod names;
#[cfg(feature = "schema")]
mod schema;

pub use ids::{AppId, DeployId, EnvId, HostId, InstanceId, OrgId, ReleaseId, TokenId};
pub use names::{AppName, EnvName, Hostname, NameError, OrgName, ProcessName};
