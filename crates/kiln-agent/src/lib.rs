//! kiln-agent: makes a host's desired state real and keeps it so.
//!
//! It watches the host's assignments, prepares images, networking and microVMs through
//! `kiln-image`, `kiln-net` and `kiln-vmm`, health-checks instances and reports their state.
