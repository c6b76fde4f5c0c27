//! Integration and property tests of the scheduler core, IPAM and the deploy planner.

mod fixtures;
mod ipam;
mod plan;
mod schedule;
