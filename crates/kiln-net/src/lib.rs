//! Host networking for microVMs: TAP devices, addresses and routes over netlink, anti-spoofing
//! and org isolation in nftables tables Kiln owns, and the WireGuard overlay between hosts.
//!
//! The caller hands [`NetEngine::apply`] the complete set of instances on the host; the engine
//! diffs it against the kernel's state and changes only the difference, the way a desired-state
//! network engine should, so the agent can call it on every reconcile pass.

mod command;
mod engine;
mod netlink;
pub mod rules;
mod spec;
mod tap;

pub use command::{CommandError, run_command};
pub use engine::{Applied, NetEngine, NetError};
pub use netlink::NetlinkError;
pub use spec::{
    HostNetworkConfig, InstanceNetwork, MAX_INTERFACE_NAME, MacAddr, TapName, TapPrefix,
    TapPrefixError,
};
pub use tap::{TapError, VNET_HDR_LEN, create_persistent_tap, open_tap};
