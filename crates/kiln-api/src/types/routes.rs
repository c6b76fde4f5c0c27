//! Routes: what the ingress serves. A route maps a hostname (TLS, by SNI) or a dedicated
//! address and port (TCP) of an environment to its healthy instances.

use std::net::{IpAddr, Ipv6Addr};

use kiln_core::{EnvId, Hostname, InstanceId};
use serde::{Deserialize, Serialize};

use super::releases::ServiceProtocol;

/// One backend of a route: a healthy instance on the overlay.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RouteBackend {
    /// The instance.
    pub instance_id: InstanceId,
    /// Its overlay address.
    pub address: Ipv6Addr,
    /// The port the instance's process listens on.
    pub port: u16,
}

/// What a route listens for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RouteMatch {
    /// TLS connections whose SNI is this hostname, on the shared ingress addresses, port 443.
    Sni {
        /// The hostname (may be a wildcard).
        hostname: Hostname,
    },
    /// TCP connections to this dedicated address and port.
    Tcp {
        /// The environment's dedicated address.
        address: IpAddr,
        /// The public port.
        port: u16,
    },
}

/// A route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Route {
    /// The environment served.
    pub env_id: EnvId,
    /// The service name within the release.
    pub service: String,
    /// What the ingress listens for.
    pub matcher: RouteMatch,
    /// Transport.
    pub protocol: ServiceProtocol,
    /// Whether the ingress prepends a PROXY protocol v2 header.
    pub proxy_protocol: bool,
    /// Healthy instances to splice connections to; empty when none is healthy.
    pub backends: Vec<RouteBackend>,
}

/// Result of `GET /v1/ingress/routes`: the whole route table at a cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RouteTable {
    /// Pass as `after` to wait for the next change.
    pub cursor: u64,
    /// Every route.
    pub routes: Vec<Route>,
}
