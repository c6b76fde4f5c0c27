//! The `kiln-control` binary: serves the API and runs the control plane's singleton work.

fn main() {}
