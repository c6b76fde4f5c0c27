//! Hosts: machines running `kiln-agent`. An operator creates a host and receives its token;
//! the agent registers with that token, heartbeats to renew its lease and watches its
//! assignments.

use std::net::SocketAddr;

use kiln_core::HostId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The VMM driver a host runs microVMs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum VmmDriver {
    /// Firecracker, the production driver.
    Firecracker,
    /// QEMU (`microvm` with KVM, or TCG where allowed).
    Qemu,
}

/// Capacity of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct HostCapacity {
    /// Physical CPUs offered to microVMs.
    pub vcpus: u32,
    /// Memory offered to microVMs, in MiB.
    pub memory_mib: u64,
}

/// State of a host as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Created by an operator, agent not yet registered.
    Pending,
    /// Registered and accepting work.
    Ready,
    /// Accepts no new instances; running ones stay.
    Cordoned,
    /// Accepts no new instances; running ones are being moved away.
    Draining,
    /// Its lease expired; its instances are rescheduled.
    Lost,
}

/// A host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Host {
    /// Id of the host.
    pub id: HostId,
    /// Unique name chosen by the operator.
    pub name: String,
    /// State.
    pub state: HostState,
    /// Capacity, once registered.
    #[serde(default)]
    pub capacity: Option<HostCapacity>,
    /// VMM driver, once registered.
    #[serde(default)]
    pub driver: Option<VmmDriver>,
    /// WireGuard public key (base64), once registered.
    #[serde(default)]
    pub overlay_public_key: Option<String>,
    /// WireGuard endpoint other hosts dial, once registered.
    #[serde(default)]
    pub overlay_endpoint: Option<SocketAddr>,
    /// The /64 of the cluster's ULA /48 assigned to the host, such as `fd12:3456:789a:1::/64`.
    #[serde(default)]
    pub ipv6_prefix: Option<String>,
    /// When the current lease ends; `null` before registration.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[cfg_attr(
        feature = "schema",
        schemars(schema_with = "crate::schema::optional_timestamp")
    )]
    pub lease_expires_at: Option<OffsetDateTime>,
    /// When the host was created.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub created_at: OffsetDateTime,
}

/// Body of `POST /v1/hosts` (operator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateHost {
    /// Unique name, a DNS label.
    pub name: String,
}

/// Result of `POST /v1/hosts`: the host and its token, shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreatedHost {
    /// The host.
    pub host: Host,
    /// The host token for the agent.
    pub token: super::tokens::CreatedToken,
}

/// Body of `POST /v1/host/register` (host token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RegisterHost {
    /// Capacity offered to microVMs.
    pub capacity: HostCapacity,
    /// VMM driver.
    pub driver: VmmDriver,
    /// WireGuard public key, base64 of 32 bytes.
    pub overlay_public_key: String,
    /// WireGuard endpoint other hosts dial.
    pub overlay_endpoint: SocketAddr,
}

/// Result of registration and heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HostLease {
    /// The host, with its assigned prefix.
    pub host: Host,
    /// Seconds until the lease ends unless renewed.
    pub lease_secs: u64,
    /// The cluster's ULA /48.
    pub cluster_prefix: String,
    /// The other registered hosts, as overlay peers.
    pub peers: Vec<OverlayPeer>,
}

/// Another host as a WireGuard peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OverlayPeer {
    /// The peer host.
    pub host_id: HostId,
    /// Its WireGuard public key.
    pub public_key: String,
    /// Its endpoint.
    pub endpoint: SocketAddr,
    /// AllowedIPs: the peer's prefixes.
    pub allowed_ips: Vec<String>,
}

/// Body of `POST /v1/host/heartbeat`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Number of microVMs the agent runs, for operators.
    #[serde(default)]
    pub running_instances: u32,
}
