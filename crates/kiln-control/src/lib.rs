//! kiln-control: the control plane over PostgreSQL.
//!
//! PostgreSQL is the only source of truth: every state change appends an event and updates the
//! projections in the same transaction ([`store`]). The HTTP API ([`api`]) authenticates every
//! call ([`auth`]), encrypts secrets at rest ([`secrets`]) and long-polls watchers woken by
//! `LISTEN/NOTIFY`. Singleton work runs on the replica holding an advisory lock ([`leader`]):
//! the deploy orchestrator ([`orchestrator`]) over the pure scheduler, with addresses from
//! [`ipam`].

pub mod api;
pub mod auth;
pub mod bootstrap;
pub mod config;
pub mod ingress_acks;
pub mod ipam;
pub mod leader;
pub mod orchestrator;
pub mod secrets;
pub mod server;
pub mod store;
