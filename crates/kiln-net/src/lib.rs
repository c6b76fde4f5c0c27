//! Host networking for microVMs: TAP devices, addresses and routes over netlink, anti-spoofing
//! and org isolation in nftables tables Kiln owns, and the WireGuard overlay between hosts.
