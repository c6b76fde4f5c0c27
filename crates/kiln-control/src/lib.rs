//! kiln-control: the control plane over PostgreSQL.
//!
//! PostgreSQL is the only source of truth: every state change appends an event and updates the
//! projections in the same transaction. The HTTP API, the scheduler, IPAM and secrets live here.

pub mod ipam;
pub mod orchestrator;
