//! The `kiln-agent` binary: the host daemon and its operator commands.

fn main() {}
