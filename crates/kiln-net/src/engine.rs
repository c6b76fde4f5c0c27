//! The network engine: takes the complete desired set of instances on this host, diffs it
//! against what exists and changes only the difference, reporting when nothing changed.
//!
//! "What exists" is the TAP devices named with this host's prefix (read from the kernel, so a
//! restarted agent finds the devices of running VMs) plus the set this engine last applied.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use kiln_core::InstanceId;

use crate::command::{CommandError, run_command};
use crate::netlink::{Netlink, NetlinkError};
use crate::rules::{GuestRules, TABLE, build_ruleset};
use crate::spec::{HostNetworkConfig, InstanceNetwork, TapName};
use crate::tap::{TapError, create_persistent_tap};

/// A failed network change.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The desired set contradicts itself.
    #[error("invalid desired network state: {0}")]
    InvalidDesired(String),
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// Creating a TAP device failed.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// Turning on forwarding failed.
    #[error("failed to write sysctl {path}")]
    Sysctl {
        /// The file under `/proc/sys`.
        path: String,
        /// Why writing failed.
        #[source]
        source: std::io::Error,
    },
    /// Serializing the ruleset failed (a bug).
    #[error("failed to serialize the nftables ruleset")]
    SerializeRules(#[source] serde_json::Error),
    /// `nft` rejected the ruleset or could not run.
    #[error("failed to apply the nftables ruleset")]
    ApplyRules(#[source] CommandError),
    /// `nft` printed a counter that could not be read.
    #[error("failed to read nftables counter {family} {TABLE} {name}")]
    ReadCounter {
        /// The table family.
        family: &'static str,
        /// The counter.
        name: String,
        /// Why reading failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What [`NetEngine::apply`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// TAP devices created (new instances).
    pub created: Vec<TapName>,
    /// TAP devices configured again (existing devices the engine had not configured yet in
    /// this process, such as after an agent restart).
    pub refreshed: Vec<TapName>,
    /// TAP devices deleted (instances gone, or instances whose network identity changed, which
    /// are then also in `created`).
    pub removed: Vec<TapName>,
}

impl Applied {
    /// Reports whether nothing was changed.
    pub fn is_unchanged(&self) -> bool {
        self.created.is_empty() && self.refreshed.is_empty() && self.removed.is_empty()
    }
}

/// Host networking for the instances on one host.
pub struct NetEngine {
    config: HostNetworkConfig,
    netlink: Netlink,
    /// What the last successful `apply` configured; `None` until the first one, so the first
    /// call always rewrites the rules.
    applied: Option<BTreeMap<TapName, InstanceNetwork>>,
}

impl NetEngine {
    /// Opens a netlink socket in the calling thread's network namespace. Needs a Tokio runtime.
    pub fn new(config: HostNetworkConfig) -> Result<Self, NetError> {
        Ok(Self {
            config,
            netlink: Netlink::connect()?,
            applied: None,
        })
    }

    /// Returns the engine's configuration.
    pub fn config(&self) -> &HostNetworkConfig {
        &self.config
    }

    /// Returns the TAP device name of `instance`.
    pub fn tap_name(&self, instance: InstanceId) -> TapName {
        TapName::for_instance(&self.config.tap_prefix, instance)
    }

    /// Makes the host's networking match `desired`, the complete set of instances on this
    /// host: creates what is missing, deletes what is no longer wanted and rewrites the
    /// rules when anything changed.
    pub async fn apply(&mut self, desired: &[InstanceNetwork]) -> Result<Applied, NetError> {
        let desired = self.index_desired(desired)?;
        let existing = self.netlink.owned_links(&self.config.tap_prefix).await?;
        let first_apply = self.applied.is_none();
        let previous = self.applied.take().unwrap_or_default();
        let mut outcome = Applied::default();

        for (tap, index) in &existing {
            let keep = match desired.get(tap) {
                None => false,
                // An instance's addresses never change; if they do, start its TAP over.
                Some(network) => previous.get(tap).is_none_or(|old| old == network),
            };
            if !keep {
                self.netlink.delete_link(*index, tap).await?;
                outcome.removed.push(tap.clone());
            }
        }

        for (tap, network) in &desired {
            let exists = existing.contains_key(tap) && !outcome.removed.contains(tap);
            if exists && previous.get(tap) == Some(network) {
                continue;
            }
            if !exists {
                create_persistent_tap(tap, self.config.tap_owner)?;
            }
            let index = self.netlink.link_index(tap).await?;
            self.netlink
                .configure(index, tap, network, &self.config)
                .await?;
            self.enable_forwarding(tap.as_str())?;
            if exists {
                outcome.refreshed.push(tap.clone());
            } else {
                outcome.created.push(tap.clone());
            }
        }

        if !outcome.is_unchanged() || first_apply || previous != desired {
            self.apply_rules(&desired).await?;
        }
        self.applied = Some(desired);
        Ok(outcome)
    }

    /// Reads a named counter of Kiln's `inet` table (`family` "inet") or `arp` table.
    pub async fn counter_packets(&self, family: &'static str, name: &str) -> Result<u64, NetError> {
        let output = run_command(
            &self.config.nft,
            &["-j", "list", "counter", family, TABLE, name],
            None,
        )
        .await
        .map_err(|source| NetError::ReadCounter {
            family,
            name: name.to_owned(),
            source: Box::new(source),
        })?;
        let document: serde_json::Value =
            serde_json::from_slice(&output).map_err(|source| NetError::ReadCounter {
                family,
                name: name.to_owned(),
                source: Box::new(source),
            })?;
        let packets = document["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|object| object["counter"]["packets"].as_u64());
        packets.ok_or_else(|| NetError::ReadCounter {
            family,
            name: name.to_owned(),
            source: "no counter in nft output".into(),
        })
    }

    fn index_desired(
        &self,
        desired: &[InstanceNetwork],
    ) -> Result<BTreeMap<TapName, InstanceNetwork>, NetError> {
        let mut by_tap = BTreeMap::new();
        let mut addresses = BTreeSet::new();
        for network in desired {
            let tap = self.tap_name(network.instance);
            if by_tap.insert(tap, network.clone()).is_some() {
                return Err(NetError::InvalidDesired(format!(
                    "instance {} listed twice, or two instance ids share the TAP name suffix",
                    network.instance
                )));
            }
            let mut own = vec![network.ipv6.to_string()];
            own.extend(network.ipv4.map(|ipv4| ipv4.to_string()));
            for address in own {
                if !addresses.insert(address.clone()) {
                    return Err(NetError::InvalidDesired(format!(
                        "address {address} is assigned to more than one instance"
                    )));
                }
            }
        }
        Ok(by_tap)
    }

    fn enable_forwarding(&self, interface: &str) -> Result<(), NetError> {
        let mut paths = vec![
            format!("/proc/sys/net/ipv4/conf/{interface}/forwarding"),
            format!("/proc/sys/net/ipv6/conf/{interface}/forwarding"),
        ];
        if let Some(egress) = &self.config.egress_interface {
            paths.push(format!("/proc/sys/net/ipv4/conf/{egress}/forwarding"));
            paths.push(format!("/proc/sys/net/ipv6/conf/{egress}/forwarding"));
        }
        if self.config.enable_global_ipv6_forwarding {
            paths.push("/proc/sys/net/ipv6/conf/all/forwarding".to_owned());
        }
        for path in paths {
            write_sysctl(Path::new(&path), "1")
                .map_err(|source| NetError::Sysctl { path, source })?;
        }
        Ok(())
    }

    async fn apply_rules(
        &self,
        desired: &BTreeMap<TapName, InstanceNetwork>,
    ) -> Result<(), NetError> {
        let guests: Vec<GuestRules<'_>> = desired
            .iter()
            .map(|(tap, network)| GuestRules { tap, network })
            .collect();
        let ruleset = build_ruleset(&self.config, &guests);
        let json = serde_json::to_vec(&ruleset).map_err(NetError::SerializeRules)?;
        run_command(&self.config.nft, &["-j", "-f", "-"], Some(&json))
            .await
            .map_err(NetError::ApplyRules)?;
        Ok(())
    }
}

fn write_sysctl(path: &Path, value: &str) -> std::io::Result<()> {
    if std::fs::read_to_string(path)?.trim() == value {
        return Ok(());
    }
    std::fs::write(path, value)
}
