//! kiln-control: the control plane over PostgreSQL.
//!
//! PostgreSQL is the only source of truth: every state change appends an event and updates the
//! projections in the same transaction ([`store`]). The HTTP API ([`api`]) authenticates every
//! call ([`auth`]), encrypts secrets at rest ([`secrets`]) and long-polls watchers woken by
//! `LISTEN/NOTIFY`. Singleton work runs on the replica holding an advisory lock ([`leader`]).

pub mod api;
pub mod auth;
pub mod bootstrap;
pub mod config;
pub mod leader;
pub mod secrets;
pub mod server;
pub mod store;
