//! Integration tests of kiln-control against a real PostgreSQL (the kiln-testkit fixture).

// Helpers outside #[test] functions fail fast on setup errors, like the tests themselves.
#![allow(clippy::unwrap_used)]

mod harness;

mod api_auth;
mod api_input;
mod api_resources;
mod host_reports;
mod host_watch;
mod ips;
mod leader;
mod openapi;
mod secrets;
mod store;
mod watch;
