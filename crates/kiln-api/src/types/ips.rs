//! Dedicated IP addresses of an environment, on which the ingress serves its `tcp` services.
//!
//! Every environment has one free dedicated IPv6 address from its creation. Dedicated IPv4
//! addresses are a paid add-on: each is allocated from the operator's configured pool and
//! released on request, and both steps are billing events in the event log
//! ([`crate::Event::Ipv4AddressAllocated`], [`crate::Event::Ipv4AddressReleased`]).

use std::net::IpAddr;

use kiln_core::EnvId;
use serde::{Deserialize, Serialize};

/// IP version of a dedicated address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum IpVersion {
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
}

/// A dedicated address of an environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DedicatedIp {
    /// The environment that owns it.
    pub env_id: EnvId,
    /// The address.
    pub address: IpAddr,
    /// Its IP version.
    pub version: IpVersion,
    /// Whether the address is billed: true for IPv4, false for the free IPv6 address.
    pub billed: bool,
    /// The pool prefix (CIDR) an IPv4 address was allocated from; `None` for IPv6.
    #[serde(default)]
    pub pool: Option<String>,
}

/// Body of `POST .../ips`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AllocateIp {
    /// IP version to allocate. Only `ipv4` is accepted: the dedicated IPv6 address exists
    /// from the environment's creation.
    pub version: IpVersion,
}
