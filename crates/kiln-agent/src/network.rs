//! [`HostNetwork`] over kiln-net's desired-state engine.

use std::collections::BTreeMap;

use kiln_core::InstanceId;
use kiln_net::{HostNetworkConfig, InstanceNetwork, MacAddr, NetEngine};
use tracing::debug;

use crate::runtime::{GuestNetwork, HostNetwork, NetworkRequest, RuntimeError};

/// Host networking through kiln-net: TAP devices, routes and nftables rules.
pub struct KilnNetwork {
    engine: NetEngine,
}

impl KilnNetwork {
    /// Opens the engine in the calling thread's network namespace.
    pub fn new(config: HostNetworkConfig) -> Result<Self, kiln_net::NetError> {
        Ok(Self {
            engine: NetEngine::new(config)?,
        })
    }
}

impl HostNetwork for KilnNetwork {
    async fn apply(
        &mut self,
        instances: &[NetworkRequest],
    ) -> Result<BTreeMap<InstanceId, GuestNetwork>, RuntimeError> {
        let desired: Vec<InstanceNetwork> = instances
            .iter()
            .map(|request| InstanceNetwork {
                instance: request.instance,
                org: request.org,
                mac: MacAddr::for_instance(request.instance),
                ipv6: request.ipv6,
                ipv4: Some(request.ipv4),
            })
            .collect();
        let applied = self.engine.apply(&desired).await?;
        if !applied.is_unchanged() {
            debug!(
                created = applied.created.len(),
                removed = applied.removed.len(),
                refreshed = applied.refreshed.len(),
                "network changed"
            );
        }

        let config = self.engine.config();
        Ok(instances
            .iter()
            .map(|request| {
                let guest = GuestNetwork {
                    tap: self.engine.tap_name(request.instance).to_string(),
                    mac: MacAddr::for_instance(request.instance).to_string(),
                    ipv6: request.ipv6,
                    ipv6_gateway: config.ipv6_gateway,
                    ipv4: request.ipv4,
                    ipv4_gateway: config.ipv4_gateway,
                };
                (request.instance, guest)
            })
            .collect())
    }
}
