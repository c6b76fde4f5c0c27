//! Kiln's public HTTP API (`/v1`): request and response types and a typed client.
//!
//! The CLI, the agent and the ingress talk to kiln-control only through these types, so the
//! wire format is defined once. Errors on the wire are `{code, message, details}` with stable
//! codes ([`ErrorCode`]). Every path is a constant in [`routes`], and [`routes::ROUTES`] lists
//! each endpoint with its method and the kind of token it accepts; the OpenAPI document is
//! generated from that table.
//!
//! Request types reject unknown fields, so a typo in a client is an error rather than a
//! silently ignored setting. Response types accept unknown fields, so an older client keeps
//! working against a newer server.

pub mod client;
pub mod error;
pub mod events;
pub mod routes;
#[cfg(feature = "schema")]
pub mod schema;
pub mod types;

pub use client::{Client, ClientError};
pub use error::{ErrorBody, ErrorCode};
pub use events::{Event, EventEnvelope, EventPage, InstanceState};
pub use types::*;

/// HTTP header carrying the idempotency key of a mutating request.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Maximum size of a request body the server accepts, in bytes, except log batches.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Maximum size of a log batch body, in bytes.
pub const MAX_LOG_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Longest long-poll wait a watch endpoint honors, in seconds.
pub const MAX_WAIT_SECS: u64 = 60;
