//! kiln-ingress: an L4 ingress that reads the SNI from a TLS ClientHello and splices the
//! connection, bytes untouched, to a healthy instance. Tenant TLS is never terminated.
//!
//! The pure parts (ClientHello scanning, route lookup, backend choice, PROXY protocol
//! encoding) are separate modules so they can be tested and fuzzed without sockets;
//! [`proxy`] is the effectful layer that runs them on the network.

pub mod balance;
pub mod client_hello;
pub mod config;
pub mod control;
pub mod copy;
pub mod metrics;
pub mod proxy;
pub mod proxy_protocol;
pub mod routes;
pub mod splice;

pub use config::{Balance, DataPath, IngressConfig};
pub use proxy::{ApplyError, DrainReport, Ingress, StartError};
pub use routes::{Backends, Route, RouteSet, TcpService};
