//! Resource, request and response types, one module per resource.

pub mod addresses;
pub mod apps;
pub mod assignments;
pub mod config;
pub mod deploys;
pub mod envs;
pub mod hosts;
pub mod instances;
pub mod ips;
pub mod logs;
pub mod orgs;
pub mod plans;
pub mod releases;
pub mod routes;
pub mod secrets;
pub mod tokens;

pub use addresses::*;
pub use apps::*;
pub use assignments::*;
pub use config::*;
pub use deploys::*;
pub use envs::*;
pub use hosts::*;
pub use instances::*;
pub use ips::*;
pub use logs::*;
pub use orgs::*;
pub use plans::*;
pub use releases::*;
pub use routes::*;
pub use secrets::*;
pub use tokens::*;

/// A list of items, the shape of every list response.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(rename = "List_{T}"))]
pub struct List<T> {
    /// The items, in the order the endpoint documents.
    pub items: Vec<T>,
}

/// Query of the long-polling watch endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct WatchQuery {
    /// Return changes after this cursor (an event `seq`); 0 or absent starts from the
    /// beginning.
    #[serde(default)]
    pub after: Option<u64>,
    /// Seconds to wait for a change when there is none yet; 0 or absent returns at once.
    /// Capped at [`crate::MAX_WAIT_SECS`].
    #[serde(default)]
    pub wait: Option<u64>,
}
