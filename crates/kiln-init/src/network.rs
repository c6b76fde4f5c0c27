//! Guest network setup from the instance config: the IPv6 /128 with a link-local default
//! gateway, the optional private IPv4 /32 with an on-link gateway, MTU and DNS.
//!
//! It uses the classic `SIOC*` ioctls rather than netlink to keep kiln-init small; they cover
//! exactly these operations. Router advertisements, autoconfiguration and duplicate address
//! detection are switched off first, so the guest ends up with exactly the addresses the
//! host assigned (plus the kernel's own link-local address) and they are usable at once.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use kiln_guest_proto::NetworkConfig;

use crate::sys::{SysError, SysResult, check, context};

/// `struct ifreq`: the interface name plus a 24-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(interface: &str) -> IfReq {
        let mut name = [0u8; libc::IFNAMSIZ];
        let len = interface.len().min(libc::IFNAMSIZ - 1);
        name[..len].copy_from_slice(&interface.as_bytes()[..len]);
        IfReq {
            name,
            data: [0; 24],
        }
    }

    fn set_ipv4(&mut self, address: Ipv4Addr) {
        self.data = [0; 24];
        self.data[..16].copy_from_slice(&sockaddr_in(address));
    }
}

/// Kernel `struct rtentry` (include/uapi/linux/route.h) for IPv4 routes.
#[repr(C)]
struct RtEntry {
    pad1: libc::c_ulong,
    dst: [u8; 16],
    gateway: [u8; 16],
    genmask: [u8; 16],
    flags: libc::c_ushort,
    pad2: libc::c_short,
    pad3: libc::c_ulong,
    pad4: *mut libc::c_void,
    metric: libc::c_short,
    dev: *mut libc::c_char,
    mtu: libc::c_ulong,
    window: libc::c_ulong,
    irtt: libc::c_ushort,
}

/// Kernel `struct in6_rtmsg` (include/uapi/linux/ipv6_route.h) for IPv6 routes.
#[repr(C)]
struct In6RtMsg {
    dst: libc::in6_addr,
    src: libc::in6_addr,
    gateway: libc::in6_addr,
    route_type: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

/// `struct sockaddr_in` as 16 bytes.
fn sockaddr_in(address: Ipv4Addr) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    bytes[4..8].copy_from_slice(&address.octets());
    bytes
}

fn socket(family: libc::c_int) -> SysResult<OwnedFd> {
    // SAFETY: socket has no memory-safety preconditions.
    let fd = check(
        unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) },
        || format!("open a control socket of family {family}"),
    )?;
    // SAFETY: fd is a fresh socket that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl<T>(
    socket: &OwnedFd,
    request: libc::c_ulong,
    argument: &mut T,
    what: impl FnOnce() -> String,
) -> SysResult<()> {
    // SAFETY: argument is the structure the request expects, valid for the call.
    let result = unsafe { libc::ioctl(socket.as_raw_fd(), request, std::ptr::from_mut(argument)) };
    check(result, what).map(drop)
}

/// Brings an interface up, optionally setting its MTU first.
fn link_up(interface: &str, mtu: Option<u32>) -> SysResult<()> {
    let control = socket(libc::AF_INET)?;

    if let Some(mtu) = mtu {
        let mut request = IfReq::new(interface);
        request.data[..4].copy_from_slice(&i32::try_from(mtu).unwrap_or(i32::MAX).to_ne_bytes());
        ioctl(&control, libc::SIOCSIFMTU, &mut request, || {
            format!("set MTU {mtu} on {interface}")
        })?;
    }

    let mut request = IfReq::new(interface);
    ioctl(&control, libc::SIOCGIFFLAGS, &mut request, || {
        format!("read flags of {interface}")
    })?;
    let flags = i16::from_ne_bytes([request.data[0], request.data[1]]);
    let flags = flags | (libc::IFF_UP as i16);
    request.data[..2].copy_from_slice(&flags.to_ne_bytes());
    ioctl(&control, libc::SIOCSIFFLAGS, &mut request, || {
        format!("bring {interface} up")
    })
}

fn interface_index(interface: &str) -> SysResult<libc::c_int> {
    let name = std::ffi::CString::new(interface).unwrap_or_default();
    // SAFETY: name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(SysError {
            what: format!("find interface {interface}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(libc::c_int::try_from(index).unwrap_or(libc::c_int::MAX))
}

fn write_sysctl(path: &str, value: &str) -> SysResult<()> {
    context(std::fs::write(path, value), || {
        format!("write {value} to {path}")
    })
}

/// Brings up the loopback device. Every guest gets one, with or without a network config.
pub(crate) fn loopback_up() -> SysResult<()> {
    link_up("lo", None)
}

/// Returns the first non-loopback interface, waiting for virtio-net to register it.
pub(crate) fn find_interface() -> SysResult<String> {
    let entries = context(std::fs::read_dir("/sys/class/net"), || {
        "list /sys/class/net".to_owned()
    })?;
    let mut names: Vec<String> = entries
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name != "lo")
        .collect();
    names.sort();
    names.into_iter().next().ok_or_else(|| SysError {
        what: "find the guest's network interface".to_owned(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no interface besides lo; was a network device attached?",
        ),
    })
}

/// Applies the network config to `interface`.
pub(crate) fn configure(interface: &str, config: &NetworkConfig) -> SysResult<()> {
    for (key, value) in [("accept_ra", "0"), ("autoconf", "0"), ("accept_dad", "0")] {
        write_sysctl(&format!("/proc/sys/net/ipv6/conf/{interface}/{key}"), value)?;
    }
    link_up(interface, Some(config.mtu))?;
    let index = interface_index(interface)?;

    add_ipv6_address(interface, index, config.ipv6)?;
    add_ipv6_default_route(interface, index, config.ipv6_gateway)?;

    if let Some(address) = config.ipv4 {
        add_ipv4_address(interface, address)?;
        if let Some(gateway) = config.ipv4_gateway {
            add_ipv4_routes(interface, gateway)?;
        }
    }

    write_resolv_conf(config)
}

fn add_ipv6_address(interface: &str, index: libc::c_int, address: Ipv6Addr) -> SysResult<()> {
    let control = socket(libc::AF_INET6)?;
    let mut request = libc::in6_ifreq {
        ifr6_addr: libc::in6_addr {
            s6_addr: address.octets(),
        },
        ifr6_prefixlen: 128,
        ifr6_ifindex: index,
    };
    ioctl(&control, libc::SIOCSIFADDR, &mut request, || {
        format!("add {address}/128 to {interface}")
    })
}

fn add_ipv6_default_route(interface: &str, index: libc::c_int, gateway: Ipv6Addr) -> SysResult<()> {
    let control = socket(libc::AF_INET6)?;
    let unspecified = libc::in6_addr { s6_addr: [0; 16] };
    let mut route = In6RtMsg {
        dst: unspecified,
        src: unspecified,
        gateway: libc::in6_addr {
            s6_addr: gateway.octets(),
        },
        route_type: 0,
        dst_len: 0,
        src_len: 0,
        metric: 1,
        info: 0,
        flags: u32::from(libc::RTF_UP | libc::RTF_GATEWAY),
        ifindex: index,
    };
    ioctl(&control, libc::SIOCADDRT, &mut route, || {
        format!("add IPv6 default route via {gateway} dev {interface}")
    })
}

fn add_ipv4_address(interface: &str, address: Ipv4Addr) -> SysResult<()> {
    let control = socket(libc::AF_INET)?;
    let mut request = IfReq::new(interface);
    request.set_ipv4(address);
    ioctl(&control, libc::SIOCSIFADDR, &mut request, || {
        format!("add {address} to {interface}")
    })?;

    request.set_ipv4(Ipv4Addr::BROADCAST);
    ioctl(&control, libc::SIOCSIFNETMASK, &mut request, || {
        format!("set netmask /32 on {interface}")
    })
}

/// Adds an on-link host route to the gateway, then the default route through it; a /32
/// address has no subnet in which the gateway could otherwise be reached.
fn add_ipv4_routes(interface: &str, gateway: Ipv4Addr) -> SysResult<()> {
    let control = socket(libc::AF_INET)?;
    let mut device = std::ffi::CString::new(interface)
        .unwrap_or_default()
        .into_bytes_with_nul();

    let mut host_route = RtEntry {
        pad1: 0,
        dst: sockaddr_in(gateway),
        gateway: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        genmask: sockaddr_in(Ipv4Addr::BROADCAST),
        flags: libc::RTF_UP | libc::RTF_HOST,
        pad2: 0,
        pad3: 0,
        pad4: std::ptr::null_mut(),
        metric: 0,
        dev: device.as_mut_ptr().cast(),
        mtu: 0,
        window: 0,
        irtt: 0,
    };
    ioctl(&control, libc::SIOCADDRT, &mut host_route, || {
        format!("add route {gateway}/32 dev {interface}")
    })?;

    let mut default_route = RtEntry {
        dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        gateway: sockaddr_in(gateway),
        genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        flags: libc::RTF_UP | libc::RTF_GATEWAY,
        ..host_route
    };
    ioctl(&control, libc::SIOCADDRT, &mut default_route, || {
        format!("add IPv4 default route via {gateway}")
    })
}

fn write_resolv_conf(config: &NetworkConfig) -> SysResult<()> {
    if config.dns_servers.is_empty() {
        return Ok(());
    }
    let text: String = config
        .dns_servers
        .iter()
        .map(|server| format!("nameserver {server}\n"))
        .collect();
    let path = Path::new("/etc/resolv.conf");
    // The image may ship resolv.conf as a symlink (to systemd-resolved's file); replace it.
    let _ = std::fs::remove_file(path);
    context(std::fs::write(path, text), || {
        format!("write {}", path.display())
    })
}
