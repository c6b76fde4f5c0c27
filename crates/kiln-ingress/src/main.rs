//! The `kiln-ingress` binary.

fn main() {}
