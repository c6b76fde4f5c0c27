//! Links, addresses, routes and neighbor entries through rtnetlink.
//!
//! Every request replaces what exists (`NLM_F_REPLACE`), so configuring an instance twice is
//! the same as configuring it once.

use std::collections::BTreeMap;
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlag};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::neighbour::NeighbourState;

use crate::spec::{HostNetworkConfig, InstanceNetwork, TapName, TapPrefix};

/// A failed netlink request.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened.
    #[error("failed to open a netlink socket")]
    Connect(#[source] std::io::Error),
    /// Listing links failed.
    #[error("failed to list network links")]
    ListLinks(#[source] Box<rtnetlink::Error>),
    /// A TAP device is missing right after it was created.
    #[error("TAP {tap} not found after creating it")]
    LinkMissing {
        /// The TAP device.
        tap: TapName,
    },
    /// One configuration step failed on a TAP device.
    #[error("failed to {step} on TAP {tap}")]
    Configure {
        /// The step, such as `add route fd00::2/128`.
        step: String,
        /// The TAP device.
        tap: TapName,
        /// The kernel's error.
        #[source]
        source: Box<rtnetlink::Error>,
    },
}

/// A netlink connection in the calling thread's network namespace.
pub(crate) struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Opens the socket and spawns its driver on the current Tokio runtime.
    pub(crate) fn connect() -> Result<Self, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// Lists the TAP devices named with `prefix`, with their interface index.
    pub(crate) async fn owned_links(
        &self,
        prefix: &TapPrefix,
    ) -> Result<BTreeMap<TapName, u32>, NetlinkError> {
        let mut links = BTreeMap::new();
        let mut stream = self.handle.link().get().execute();
        while let Some(message) = stream
            .try_next()
            .await
            .map_err(|error| NetlinkError::ListLinks(Box::new(error)))?
        {
            let name = message
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    LinkAttribute::IfName(name) => Some(name.as_str()),
                    _ => None,
                });
            if let Some(tap) = name.and_then(|name| TapName::parse_owned(prefix, name)) {
                links.insert(tap, message.header.index);
            }
        }
        Ok(links)
    }

    /// Returns the index of `tap`.
    pub(crate) async fn link_index(&self, tap: &TapName) -> Result<u32, NetlinkError> {
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(tap.as_str().to_owned())
            .execute();
        match stream.try_next().await {
            Ok(Some(message)) => Ok(message.header.index),
            Ok(None) | Err(_) => Err(NetlinkError::LinkMissing { tap: tap.clone() }),
        }
    }

    /// Brings `tap` up and routes the guest's addresses to it, with the gateway addresses on
    /// the host side and permanent neighbor entries for the guest's MAC.
    pub(crate) async fn configure(
        &self,
        index: u32,
        tap: &TapName,
        network: &InstanceNetwork,
        config: &HostNetworkConfig,
    ) -> Result<(), NetlinkError> {
        let failed = |step: String| {
            let tap = tap.clone();
            move |source| NetlinkError::Configure {
                step,
                tap,
                source: Box::new(source),
            }
        };

        self.handle
            .link()
            .set(index)
            .up()
            .execute()
            .await
            .map_err(failed("set link up".to_owned()))?;

        // The gateway must answer neighbor solicitations at once: skip duplicate detection,
        // which would keep it tentative for a second.
        let mut gateway6 = self
            .handle
            .address()
            .add(index, IpAddr::V6(config.ipv6_gateway), 64)
            .replace();
        gateway6
            .message_mut()
            .attributes
            .push(AddressAttribute::Flags(vec![AddressFlag::Nodad]));
        gateway6
            .execute()
            .await
            .map_err(failed(format!("add address {}/64", config.ipv6_gateway)))?;

        self.handle
            .route()
            .add()
            .v6()
            .destination_prefix(network.ipv6, 128)
            .output_interface(index)
            .replace()
            .execute()
            .await
            .map_err(failed(format!("add route {}/128", network.ipv6)))?;
        self.add_neighbor(index, IpAddr::V6(network.ipv6), network)
            .await
            .map_err(failed(format!("add neighbor {}", network.ipv6)))?;

        if let Some(ipv4) = network.ipv4 {
            // IFA_LOCAL is the gateway, IFA_ADDRESS the guest: the kernel then adds the /32
            // route to the guest through this TAP.
            let mut gateway4 = self
                .handle
                .address()
                .add(index, IpAddr::V4(config.ipv4_gateway), 32)
                .replace();
            let attributes = &mut gateway4.message_mut().attributes;
            attributes.retain(|attribute| {
                !matches!(
                    attribute,
                    AddressAttribute::Address(_) | AddressAttribute::Broadcast(_)
                )
            });
            attributes.push(AddressAttribute::Address(IpAddr::V4(ipv4)));
            gateway4.execute().await.map_err(failed(format!(
                "add address {} peer {ipv4}/32",
                config.ipv4_gateway
            )))?;
            self.add_neighbor(index, IpAddr::V4(ipv4), network)
                .await
                .map_err(failed(format!("add neighbor {ipv4}")))?;
        }
        Ok(())
    }

    async fn add_neighbor(
        &self,
        index: u32,
        address: IpAddr,
        network: &InstanceNetwork,
    ) -> Result<(), rtnetlink::Error> {
        self.handle
            .neighbours()
            .add(index, address)
            .link_local_address(&network.mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
    }

    /// Deletes `tap`; the kernel removes its addresses, routes and neighbor entries with it.
    pub(crate) async fn delete_link(&self, index: u32, tap: &TapName) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|source| NetlinkError::Configure {
                step: "delete link".to_owned(),
                tap: tap.clone(),
                source: Box::new(source),
            })
    }
}
