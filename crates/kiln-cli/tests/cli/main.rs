//! Integration tests of the `kiln` binary: the real binary, run as a user would run it, with
//! stdin never a terminal. Tests that need a control plane start a real kiln-control on a
//! private PostgreSQL (see `server`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod commands;
mod deploys;
mod docs;
mod harness;
mod ips;
mod local;
mod plans;
mod pty;
mod registry;
mod resolve;
mod secrets;
mod server;
