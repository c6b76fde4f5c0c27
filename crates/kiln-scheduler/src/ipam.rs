//! IP address management: the cluster's ULA /48, one prefix pair per host, and one address
//! pair per instance.
//!
//! Layout:
//!
//! - The cluster prefix is a unique local /48 (RFC 4193): `fd` followed by a 40-bit global id
//!   drawn at bootstrap.
//! - A host with slot `n` (1 or more) gets the IPv6 /64 whose subnet id is `n`, and the `n`-th
//!   IPv4 block of 100.64.0.0/10 (a /22 by default). Slot 0 is reserved for cluster-wide
//!   addresses. Giving each host one IPv4 block as well as one /64 keeps a host's overlay
//!   routes (WireGuard `AllowedIPs`) to exactly two prefixes.
//! - In both prefixes the first address after the network address (`::1`, `.1`) is the host's
//!   gateway. Instances get the lowest offset from 2 up that is free in both families, so the
//!   IPv6 and IPv4 addresses of an instance share their offset.
//!
//! The allocator is pure: callers pass the slots or addresses still referenced (by any instance
//! that is not yet gone) and persist what it returns. An address is free again only when no
//! caller passes it any more, so it is never handed out while still referenced.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// The shared address space for instances' private IPv4 addresses (RFC 6598).
pub const IPV4_SPACE: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10) {
    Ok(net) => net,
    Err(_) => panic!("100.64.0.0/10 is a valid prefix"),
};

/// Default length of each host's IPv4 block: 1,024 addresses, 1,021 of them for instances.
pub const DEFAULT_HOST_IPV4_PREFIX_LEN: u8 = 22;

/// The first offset handed to an instance; 0 is the network address and 1 the host gateway.
const FIRST_INSTANCE_OFFSET: u32 = 2;

/// Why an allocation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// The cluster prefix is not a ULA /48.
    #[error("invalid cluster prefix {prefix}: expected a unique local /48 inside fd00::/8")]
    NotUla48 {
        /// The rejected prefix.
        prefix: Ipv6Net,
    },
    /// The host IPv4 block length cannot split 100.64.0.0/10 into usable blocks.
    #[error(
        "invalid host IPv4 prefix length /{len}: use /12 to /29 so 100.64.0.0/10 splits into \
         at least 4 blocks of at least 8 addresses"
    )]
    InvalidHostIpv4PrefixLen {
        /// The rejected length.
        len: u8,
    },
    /// Every host slot is taken.
    #[error("no host slot is free: all {max} are in use; remove a dead host to free its slot")]
    HostSlotsExhausted {
        /// Number of host slots in the cluster.
        max: u32,
    },
    /// A host slot outside the range.
    #[error("invalid host slot {slot}: slots run from 1 to {max}")]
    HostSlotOutOfRange {
        /// The rejected slot.
        slot: u32,
        /// The largest slot.
        max: u32,
    },
    /// Every instance address of a host is taken.
    #[error(
        "no instance address is free on host slot {slot} ({ipv6}, {ipv4}): all {capacity} are \
         referenced by instances that are not yet gone"
    )]
    HostAddressesExhausted {
        /// The host's slot.
        slot: u32,
        /// The host's IPv6 prefix.
        ipv6: Ipv6Net,
        /// The host's IPv4 block.
        ipv4: Ipv4Net,
        /// Instance addresses per host.
        capacity: u32,
    },
}

/// Derives the cluster's ULA /48 from 40 random bits (the RFC 4193 global id).
///
/// The caller draws the bytes, so bootstrap stays testable.
pub fn ula_prefix_from_random(global_id: [u8; 5]) -> Ipv6Net {
    let mut octets = [0_u8; 16];
    octets[0] = 0xfd;
    octets[1..6].copy_from_slice(&global_id);
    Ipv6Net::new(Ipv6Addr::from(octets), 48).unwrap_or_default()
}

/// The two prefixes routed to one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HostPrefixes {
    /// The host's slot, from 1.
    pub slot: u32,
    /// The host's IPv6 /64.
    pub ipv6: Ipv6Net,
    /// The host's IPv4 block inside 100.64.0.0/10.
    pub ipv4: Ipv4Net,
}

impl HostPrefixes {
    /// The host's own address in each prefix, the instances' gateway.
    pub fn gateway(&self) -> (Ipv6Addr, Ipv4Addr) {
        (
            offset_v6(self.ipv6, 1),
            Ipv4Addr::from(u32::from(self.ipv4.network()) + 1),
        )
    }
}

/// The addresses of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceAddresses {
    /// The instance's /128 inside its host's /64.
    pub ipv6: Ipv6Addr,
    /// The instance's private IPv4 inside its host's block.
    pub ipv4: Ipv4Addr,
}

/// Addresses referenced on one host by instances that are not yet gone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressesInUse {
    /// IPv6 addresses in use.
    pub ipv6: BTreeSet<Ipv6Addr>,
    /// IPv4 addresses in use.
    pub ipv4: BTreeSet<Ipv4Addr>,
}

impl AddressesInUse {
    /// Records a pair as in use.
    pub fn insert(&mut self, addresses: InstanceAddresses) {
        self.ipv6.insert(addresses.ipv6);
        self.ipv4.insert(addresses.ipv4);
    }
}

/// The allocator for one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipam {
    cluster: Ipv6Net,
    host_ipv4_prefix_len: u8,
}

impl Ipam {
    /// An allocator over a cluster prefix with the default host IPv4 block length.
    pub fn new(cluster: Ipv6Net) -> Result<Self, IpamError> {
        Self::with_host_ipv4_prefix_len(cluster, DEFAULT_HOST_IPV4_PREFIX_LEN)
    }

    /// An allocator with another host IPv4 block length (a shorter one means fewer hosts with
    /// more instances each).
    pub fn with_host_ipv4_prefix_len(cluster: Ipv6Net, len: u8) -> Result<Self, IpamError> {
        let is_ula48 = cluster.prefix_len() == 48
            && cluster.network() == cluster.addr()
            && cluster.addr().octets()[0] == 0xfd;
        if !is_ula48 {
            return Err(IpamError::NotUla48 { prefix: cluster });
        }
        if !(12..=29).contains(&len) {
            return Err(IpamError::InvalidHostIpv4PrefixLen { len });
        }
        Ok(Self {
            cluster,
            host_ipv4_prefix_len: len,
        })
    }

    /// The cluster prefix.
    pub fn cluster(&self) -> Ipv6Net {
        self.cluster
    }

    /// The largest host slot: the IPv4 blocks run out before the 65,535 IPv6 subnets do.
    pub fn max_host_slot(&self) -> u32 {
        let blocks = 1_u32 << (self.host_ipv4_prefix_len - IPV4_SPACE.prefix_len());
        (blocks - 1).min(u32::from(u16::MAX))
    }

    /// Instance addresses per host.
    pub fn instances_per_host(&self) -> u32 {
        let block = 1_u32 << (32 - self.host_ipv4_prefix_len);
        // The network address, the gateway and the broadcast address are never handed out.
        block - 3
    }

    /// The prefixes of a host slot.
    pub fn host_prefixes(&self, slot: u32) -> Result<HostPrefixes, IpamError> {
        let max = self.max_host_slot();
        if slot == 0 || slot > max {
            return Err(IpamError::HostSlotOutOfRange { slot, max });
        }

        let mut octets = self.cluster.network().octets();
        octets[6..8].copy_from_slice(&(slot as u16).to_be_bytes());
        let ipv6 = Ipv6Net::new(Ipv6Addr::from(octets), 64).unwrap_or_default();

        let block_size = 1_u32 << (32 - self.host_ipv4_prefix_len);
        let base = u32::from(IPV4_SPACE.network()) + slot * block_size;
        let ipv4 =
            Ipv4Net::new(Ipv4Addr::from(base), self.host_ipv4_prefix_len).unwrap_or_default();

        Ok(HostPrefixes { slot, ipv6, ipv4 })
    }

    /// Allocates the lowest host slot not in `in_use`.
    pub fn allocate_host(&self, in_use: &BTreeSet<u32>) -> Result<HostPrefixes, IpamError> {
        let max = self.max_host_slot();
        let slot = (1..=max)
            .find(|slot| !in_use.contains(slot))
            .ok_or(IpamError::HostSlotsExhausted { max })?;
        self.host_prefixes(slot)
    }

    /// Allocates the lowest instance address pair of a host that is free in both families.
    pub fn allocate_instance(
        &self,
        host: &HostPrefixes,
        in_use: &AddressesInUse,
    ) -> Result<InstanceAddresses, IpamError> {
        let last = FIRST_INSTANCE_OFFSET + self.instances_per_host();
        let base_v4 = u32::from(host.ipv4.network());
        (FIRST_INSTANCE_OFFSET..last)
            .map(|offset| InstanceAddresses {
                ipv6: offset_v6(host.ipv6, offset),
                ipv4: Ipv4Addr::from(base_v4 + offset),
            })
            .find(|pair| !in_use.ipv6.contains(&pair.ipv6) && !in_use.ipv4.contains(&pair.ipv4))
            .ok_or(IpamError::HostAddressesExhausted {
                slot: host.slot,
                ipv6: host.ipv6,
                ipv4: host.ipv4,
                capacity: self.instances_per_host(),
            })
    }
}

fn offset_v6(prefix: Ipv6Net, offset: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(prefix.network()) + u128::from(offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam() -> Ipam {
        Ipam::new(ula_prefix_from_random([0x12, 0x34, 0x56, 0x78, 0x9a])).unwrap()
    }

    #[test]
    fn ula_prefix_uses_random_global_id() {
        let prefix = ula_prefix_from_random([0x12, 0x34, 0x56, 0x78, 0x9a]);
        assert_eq!(prefix.to_string(), "fd12:3456:789a::/48");
    }

    #[test]
    fn rejects_non_ula_cluster_prefix() {
        let prefix: Ipv6Net = "2001:db8::/48".parse().unwrap();
        assert_eq!(Ipam::new(prefix), Err(IpamError::NotUla48 { prefix }));
        let too_long: Ipv6Net = "fd00:1:2:3::/64".parse().unwrap();
        assert!(Ipam::new(too_long).is_err());
        let host_bits: Ipv6Net = "fd00:1:2::1/48".parse().unwrap();
        assert!(Ipam::new(host_bits).is_err());
    }

    #[test]
    fn rejects_ipv4_block_length_out_of_range() {
        let cluster = ipam().cluster();
        for len in [0, 10, 11, 30, 32] {
            assert_eq!(
                Ipam::with_host_ipv4_prefix_len(cluster, len),
                Err(IpamError::InvalidHostIpv4PrefixLen { len })
            );
        }
    }

    #[test]
    fn host_prefixes_follow_slot() {
        let prefixes = ipam().host_prefixes(3).unwrap();
        assert_eq!(prefixes.ipv6.to_string(), "fd12:3456:789a:3::/64");
        assert_eq!(prefixes.ipv4.to_string(), "100.64.12.0/22");
        let (v6, v4) = prefixes.gateway();
        assert_eq!(v6.to_string(), "fd12:3456:789a:3::1");
        assert_eq!(v4.to_string(), "100.64.12.1");
    }

    #[test]
    fn last_host_block_ends_inside_shared_space() {
        let ipam = ipam();
        let last = ipam.host_prefixes(ipam.max_host_slot()).unwrap();
        assert_eq!(last.ipv4.to_string(), "100.127.252.0/22");
        assert!(IPV4_SPACE.contains(&last.ipv4));
        assert!(matches!(
            ipam.host_prefixes(ipam.max_host_slot() + 1),
            Err(IpamError::HostSlotOutOfRange { .. })
        ));
        assert!(ipam.host_prefixes(0).is_err());
    }

    #[test]
    fn host_slots_reuse_lowest_free() {
        let ipam = ipam();
        let in_use = BTreeSet::from([1, 2, 4]);
        assert_eq!(ipam.allocate_host(&in_use).unwrap().slot, 3);
        let in_use = BTreeSet::from([2, 3]);
        assert_eq!(ipam.allocate_host(&in_use).unwrap().slot, 1);
    }

    #[test]
    fn host_slots_exhaust() {
        let ipam = Ipam::with_host_ipv4_prefix_len(ipam().cluster(), 12).unwrap();
        assert_eq!(ipam.max_host_slot(), 3);
        let in_use = BTreeSet::from([1, 2, 3]);
        assert_eq!(
            ipam.allocate_host(&in_use),
            Err(IpamError::HostSlotsExhausted { max: 3 })
        );
    }

    #[test]
    fn instance_addresses_share_offset() {
        let ipam = ipam();
        let host = ipam.host_prefixes(1).unwrap();
        let first = ipam
            .allocate_instance(&host, &AddressesInUse::default())
            .unwrap();
        assert_eq!(first.ipv6.to_string(), "fd12:3456:789a:1::2");
        assert_eq!(first.ipv4.to_string(), "100.64.4.2");
    }

    #[test]
    fn instance_addresses_skip_referenced() {
        let ipam = ipam();
        let host = ipam.host_prefixes(1).unwrap();
        let mut in_use = AddressesInUse::default();
        let mut seen = BTreeSet::new();
        for _ in 0..50 {
            let pair = ipam.allocate_instance(&host, &in_use).unwrap();
            assert!(host.ipv6.contains(&pair.ipv6));
            assert!(host.ipv4.contains(&pair.ipv4));
            assert!(seen.insert(pair), "{pair:?} handed out twice");
            in_use.insert(pair);
        }
    }

    #[test]
    fn instance_address_reused_after_free() {
        let ipam = ipam();
        let host = ipam.host_prefixes(2).unwrap();
        let mut in_use = AddressesInUse::default();
        let pairs: Vec<_> = (0..3)
            .map(|_| {
                let pair = ipam.allocate_instance(&host, &in_use).unwrap();
                in_use.insert(pair);
                pair
            })
            .collect();

        in_use.ipv6.remove(&pairs[1].ipv6);
        in_use.ipv4.remove(&pairs[1].ipv4);
        assert_eq!(ipam.allocate_instance(&host, &in_use).unwrap(), pairs[1]);
    }

    #[test]
    fn instance_address_held_in_either_family_is_skipped() {
        let ipam = ipam();
        let host = ipam.host_prefixes(1).unwrap();
        let mut in_use = AddressesInUse::default();
        in_use.ipv4.insert("100.64.4.2".parse().unwrap());
        in_use.ipv6.insert("fd12:3456:789a:1::3".parse().unwrap());
        let pair = ipam.allocate_instance(&host, &in_use).unwrap();
        assert_eq!(pair.ipv4.to_string(), "100.64.4.4");
        assert_eq!(pair.ipv6.to_string(), "fd12:3456:789a:1::4");
    }

    #[test]
    fn instance_addresses_exhaust() {
        let ipam = Ipam::with_host_ipv4_prefix_len(ipam().cluster(), 29).unwrap();
        assert_eq!(ipam.instances_per_host(), 5);
        let host = ipam.host_prefixes(1).unwrap();
        let mut in_use = AddressesInUse::default();
        for _ in 0..5 {
            let pair = ipam.allocate_instance(&host, &in_use).unwrap();
            assert_ne!(pair.ipv4, host.ipv4.broadcast());
            in_use.insert(pair);
        }
        let error = ipam.allocate_instance(&host, &in_use).unwrap_err();
        assert!(matches!(
            error,
            IpamError::HostAddressesExhausted { capacity: 5, .. }
        ));
    }
}
