//! Kiln's public HTTP API (`/v1`): request and response types and a typed client.
//!
//! The CLI, the agent and the ingress talk to kiln-control only through these types, so the
//! wire format is defined once. Errors on the wire are `{code, message, details}` with stable
//! codes.
