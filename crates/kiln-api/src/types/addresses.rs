//! Addresses allocated to an environment.

use std::net::IpAddr;

use kiln_core::{EnvId, InstanceId};
use serde::{Deserialize, Serialize};

/// What an address is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum AddressKind {
    /// The environment's dedicated public IPv6 address for TCP services.
    Dedicated,
    /// An instance's overlay IPv6 address.
    InstanceIpv6,
    /// An instance's private IPv4 address.
    InstanceIpv4,
    /// A billed dedicated public IPv4 address for TCP services, from the operator's pool.
    DedicatedIpv4,
}

/// An allocated address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Address {
    /// The environment that owns it.
    pub env_id: EnvId,
    /// The address.
    pub address: IpAddr,
    /// What it is for.
    pub kind: AddressKind,
    /// The instance, for instance addresses.
    #[serde(default)]
    pub instance_id: Option<InstanceId>,
}
