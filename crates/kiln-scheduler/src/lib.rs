//! Kiln's placement logic as pure functions: the scheduler core, IP address management and the
//! deploy planner.
//!
//! Deciding is kept apart from doing. Everything here takes a read-only snapshot and returns a
//! decision (placements, addresses, a plan of named steps); the control plane reads the
//! snapshot from its projections, records the decision as events and carries it out. Without
//! I/O, clocks or random sources, every rule is property-tested and every decision is
//! reproducible from its inputs.

pub mod cluster;
pub mod ipam;
pub mod plan;
pub mod progress;
pub mod schedule;

pub use cluster::{ClusterSnapshot, Host, HostState, PlacedInstance, Resources};
pub use ipam::{
    AddressesInUse, HostPrefixes, InstanceAddresses, Ipam, IpamError, ula_prefix_from_random,
};
pub use schedule::{
    CpuShortfall, InstanceRequest, MemoryShortfall, Placement, ScheduleError, Scheduler,
    SchedulerConfig, schedule,
};
