//! TAP devices through `/dev/net/tun`: the same flags QEMU and Firecracker use when they open
//! the device (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), made persistent so the device outlives
//! the agent and the VMM can attach to it by name.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

use crate::spec::TapName;

const TUN_DEVICE: &str = "/dev/net/tun";
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Size of the `virtio_net_hdr` that prefixes every frame on a TAP opened with `IFF_VNET_HDR`.
pub const VNET_HDR_LEN: usize = 10;

/// `struct ifreq` as the TUN ioctls read it: a name and the flags, padded to the kernel's size.
#[repr(C)]
struct InterfaceRequest {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    padding: [u8; 22],
}

nix::ioctl_write_ptr_bad!(tun_set_iff, 0x4004_54ca, InterfaceRequest);
nix::ioctl_write_int_bad!(tun_set_persist, 0x4004_54cb);
nix::ioctl_write_int_bad!(tun_set_owner, 0x4004_54cc);

/// A failed TAP operation.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// `/dev/net/tun` could not be opened.
    #[error("failed to open {TUN_DEVICE} for TAP {tap} (is the tun module loaded?)")]
    OpenTun {
        /// The TAP device.
        tap: TapName,
        /// Why opening failed.
        #[source]
        source: std::io::Error,
    },
    /// One of the TUN ioctls failed.
    #[error("{operation} failed for TAP {tap}")]
    Ioctl {
        /// The ioctl, such as `TUNSETIFF`.
        operation: &'static str,
        /// The TAP device.
        tap: TapName,
        /// The kernel's error.
        #[source]
        source: nix::Error,
    },
}

/// Opens (creating it if needed) the TAP device `tap` with the VMM's flags.
///
/// The returned file reads and writes whole Ethernet frames, each after a
/// [`VNET_HDR_LEN`]-byte virtio-net header.
pub fn open_tap(tap: &TapName) -> Result<File, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_DEVICE)
        .map_err(|source| TapError::OpenTun {
            tap: tap.clone(),
            source,
        })?;

    let mut request = InterfaceRequest {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        padding: [0; 22],
    };
    // TapName guarantees at most 15 bytes, so the name stays NUL-terminated.
    request.name[..tap.as_str().len()].copy_from_slice(tap.as_str().as_bytes());
    // SAFETY: the fd is an open /dev/net/tun and `request` is a valid, initialized ifreq.
    unsafe { tun_set_iff(file.as_raw_fd(), &request) }.map_err(|source| TapError::Ioctl {
        operation: "TUNSETIFF",
        tap: tap.clone(),
        source,
    })?;
    Ok(file)
}

/// Creates `tap` as a persistent device, owned by `owner` when given, and closes it again.
pub fn create_persistent_tap(tap: &TapName, owner: Option<u32>) -> Result<(), TapError> {
    let file = open_tap(tap)?;
    let fd = file.as_raw_fd();

    if let Some(uid) = owner {
        // SAFETY: the fd is attached to a TAP device; TUNSETOWNER takes the uid by value.
        unsafe { tun_set_owner(fd, uid as libc::c_int) }.map_err(|source| TapError::Ioctl {
            operation: "TUNSETOWNER",
            tap: tap.clone(),
            source,
        })?;
    }

    // SAFETY: the fd is attached to a TAP device; TUNSETPERSIST takes a flag by value.
    unsafe { tun_set_persist(fd, 1) }.map_err(|source| TapError::Ioctl {
        operation: "TUNSETPERSIST",
        tap: tap.clone(),
        source,
    })?;
    Ok(())
}
