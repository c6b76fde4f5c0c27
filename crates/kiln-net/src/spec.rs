//! What the caller asks for: the network identity of each instance on this host, and the
//! host-wide settings that do not change per instance.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use kiln_core::{InstanceId, OrgId};

/// The longest interface name Linux accepts (`IFNAMSIZ` minus the terminating NUL).
pub const MAX_INTERFACE_NAME: usize = 15;

/// Number of hex digits of the instance id that go into its TAP name.
const TAP_ID_DIGITS: usize = 12;

/// A TAP device name: the host's prefix plus the last 12 hex digits of the instance id.
///
/// The last digits are the random part of a UUIDv7, so instances created in the same
/// millisecond still get different names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TapName(String);

impl TapName {
    /// Derives the TAP name of `instance` under `prefix`.
    pub fn for_instance(prefix: &TapPrefix, instance: InstanceId) -> Self {
        let digits = instance.as_uuid().simple().to_string();
        let tail = &digits[digits.len() - TAP_ID_DIGITS..];
        Self(format!("{}{tail}", prefix.0))
    }

    /// Returns the name as the kernel sees it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Reports whether a kernel interface name was made by [`TapName::for_instance`] under
    /// `prefix`, so links Kiln did not create are never touched.
    pub fn parse_owned(prefix: &TapPrefix, name: &str) -> Option<Self> {
        let tail = name.strip_prefix(prefix.0.as_str())?;
        let is_ours = tail.len() == TAP_ID_DIGITS
            && tail
                .bytes()
                .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte));
        is_ours.then(|| Self(name.to_owned()))
    }
}

impl fmt::Display for TapName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The prefix of every TAP device this host's agent owns (1 to 3 lowercase letters, so the
/// whole name fits in 15 characters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapPrefix(String);

/// An invalid TAP prefix.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid TAP prefix {value:?}: use 1 to 3 lowercase ASCII letters, such as \"kt\", so that \
     prefix plus 12 hex digits fits the kernel's 15-character interface names"
)]
pub struct TapPrefixError {
    /// The rejected prefix.
    pub value: String,
}

impl TapPrefix {
    /// Validates a prefix.
    pub fn new(value: impl Into<String>) -> Result<Self, TapPrefixError> {
        let value = value.into();
        let valid = (1..=MAX_INTERFACE_NAME - TAP_ID_DIGITS).contains(&value.len())
            && value.bytes().all(|byte| byte.is_ascii_lowercase());
        if !valid {
            return Err(TapPrefixError { value });
        }
        Ok(Self(value))
    }

    /// Returns the prefix.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TapPrefix {
    fn default() -> Self {
        Self("kt".to_owned())
    }
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Derives a locally administered unicast MAC from the instance id, so the agent can
    /// hand the same MAC to the VMM and to the anti-spoofing rules without storing it.
    pub fn for_instance(instance: InstanceId) -> Self {
        let bytes = instance.as_uuid().into_bytes();
        let mut mac = [0x02, 0, 0, 0, 0, 0];
        mac[1..].copy_from_slice(&bytes[11..16]);
        Self(mac)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The network identity of one instance, as allocated by the control plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceNetwork {
    /// The instance.
    pub instance: InstanceId,
    /// The org that owns it: instances of the same org may reach each other, others may not.
    pub org: OrgId,
    /// The guest's MAC address; frames from the guest with any other source are dropped.
    pub mac: MacAddr,
    /// The guest's IPv6 address, routed to its TAP as a /128.
    pub ipv6: Ipv6Addr,
    /// The guest's private IPv4 address (from 100.64.0.0/10), routed to its TAP as a /32.
    pub ipv4: Option<Ipv4Addr>,
}

/// Host-wide settings of the network engine.
#[derive(Clone, Debug)]
pub struct HostNetworkConfig {
    /// Prefix of the TAP devices this engine owns (default `kt`).
    pub tap_prefix: TapPrefix,
    /// The user that may open the TAP devices (the VMM's user); `None` leaves them root-only.
    pub tap_owner: Option<u32>,
    /// The guest's IPv6 gateway, configured on every TAP (default `fe80::1`).
    pub ipv6_gateway: Ipv6Addr,
    /// The guest's IPv4 gateway, configured on every TAP with a /32 peer route to the guest
    /// (default `169.254.0.1`).
    pub ipv4_gateway: Ipv4Addr,
    /// The interface egress traffic leaves through and is masqueraded on. `None` masquerades
    /// guest traffic leaving through any interface that is not a guest TAP.
    pub egress_interface: Option<String>,
    /// Also turn on `net.ipv6.conf.all.forwarding`, which Linux requires before it forwards
    /// any IPv6 packet. It turns off router advertisements on interfaces with `accept_ra=1`.
    pub enable_global_ipv6_forwarding: bool,
    /// Absolute path of the `nft` binary (default `/usr/sbin/nft`).
    pub nft: PathBuf,
}

impl Default for HostNetworkConfig {
    fn default() -> Self {
        Self {
            tap_prefix: TapPrefix::default(),
            tap_owner: None,
            ipv6_gateway: Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
            ipv4_gateway: Ipv4Addr::new(169, 254, 0, 1),
            egress_interface: None,
            enable_global_ipv6_forwarding: true,
            nft: PathBuf::from("/usr/sbin/nft"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_name_fits_kernel_limit() {
        let name = TapName::for_instance(&TapPrefix::new("knt").unwrap(), InstanceId::new());
        assert_eq!(name.as_str().len(), MAX_INTERFACE_NAME);
    }

    #[test]
    fn tap_name_round_trips_through_parse() {
        let prefix = TapPrefix::default();
        let name = TapName::for_instance(&prefix, InstanceId::new());
        assert_eq!(TapName::parse_owned(&prefix, name.as_str()), Some(name));
    }

    #[test]
    fn foreign_interfaces_not_owned() {
        let prefix = TapPrefix::default();
        for name in ["eth0", "kt", "ktXYZ000000000", "kt0123456789abc", "tap0"] {
            assert_eq!(TapName::parse_owned(&prefix, name), None, "{name}");
        }
    }

    #[test]
    fn tap_prefix_rejects_long_or_odd() {
        for value in ["", "kiln", "K", "k-"] {
            assert!(TapPrefix::new(value).is_err(), "{value}");
        }
    }

    #[test]
    fn mac_is_local_unicast() {
        let mac = MacAddr::for_instance(InstanceId::new());
        assert_eq!(mac.0[0] & 0b11, 0b10);
    }
}
