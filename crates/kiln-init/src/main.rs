//! kiln-init: PID 1 inside every Kiln microVM.
//!
//! It mounts the guest's filesystems, applies the instance config the host sent over the
//! host-guest channel (never anything the workload says), runs the workload and reports back.

fn main() {}
