//! VMM drivers behind one trait: `firecracker` (production) and `qemu` (KVM or, where allowed,
//! TCG), plus the host side of the host-guest channel and the guest assets.
