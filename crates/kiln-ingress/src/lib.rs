//! kiln-ingress: an L4 ingress that reads the SNI from a TLS ClientHello and splices the
//! connection, bytes untouched, to a healthy instance. Tenant TLS is never terminated.

pub mod client_hello;
