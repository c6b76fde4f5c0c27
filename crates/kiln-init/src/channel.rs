//! The guest end of the host-guest channel: a virtio-serial port named
//! [`VIRTIO_PORT_NAME`] under QEMU, a vsock connection to the host under Firecracker.
//!
//! The kernel command line selects the transport (`kiln.channel=virtio-serial|vsock`), so the
//! workload has no say in where the config comes from.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_guest_proto::{GuestMessage, VIRTIO_PORT_NAME, VSOCK_PORT};

use crate::sys::{SysError, SysResult, check, context};

/// How long to wait for the channel device to appear after the modules load.
const CHANNEL_APPEAR_TIMEOUT: Duration = Duration::from_secs(30);

/// Transport of the channel, from the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    VirtioSerial,
    Vsock,
}

impl Transport {
    /// Reads `kiln.channel=` from the kernel command line; virtio-serial when absent.
    pub(crate) fn from_cmdline(cmdline: &str) -> Transport {
        let value = cmdline
            .split_whitespace()
            .find_map(|word| word.strip_prefix("kiln.channel="));
        match value {
            Some("vsock") => Transport::Vsock,
            _ => Transport::VirtioSerial,
        }
    }
}

/// The channel: a reader for host messages and a shared writer for guest messages.
pub(crate) struct Channel {
    pub(crate) reader: File,
    pub(crate) writer: Writer,
}

/// Sends guest messages; cloned into every thread that reports to the host.
#[derive(Clone)]
pub(crate) struct Writer(Arc<Mutex<File>>);

impl Writer {
    /// Sends one message. A failed send is printed on the console because the channel is
    /// the only other way out.
    pub(crate) fn send(&self, message: &GuestMessage) {
        let mut file = match self.0.lock() {
            Ok(file) => file,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(error) = kiln_guest_proto::write_frame(&mut *file, message) {
            eprintln!("kiln-init: sending to the host failed: {error}");
        }
    }
}

/// Opens the channel with the given transport, waiting for its device to appear.
pub(crate) fn open(transport: Transport) -> SysResult<Channel> {
    let file = match transport {
        Transport::VirtioSerial => open_virtio_port()?,
        Transport::Vsock => connect_vsock()?,
    };
    let reader = context(file.try_clone(), || "duplicate the channel fd".to_owned())?;
    Ok(Channel {
        reader,
        writer: Writer(Arc::new(Mutex::new(file))),
    })
}

fn open_virtio_port() -> SysResult<File> {
    let deadline = Instant::now() + CHANNEL_APPEAR_TIMEOUT;
    loop {
        if let Some(device) = find_virtio_port()? {
            return context(File::options().read(true).write(true).open(&device), || {
                format!("open {}", device.display())
            });
        }
        if Instant::now() > deadline {
            return Err(SysError {
                what: format!("find virtio-serial port {VIRTIO_PORT_NAME:?}"),
                source: io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("not present after {CHANNEL_APPEAR_TIMEOUT:?}"),
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Finds `/dev/vportNpM` whose sysfs `name` is [`VIRTIO_PORT_NAME`] (there is no udev to
/// make the `/dev/virtio-ports/` link).
fn find_virtio_port() -> SysResult<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") else {
        return Ok(None);
    };
    for entry in entries.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == VIRTIO_PORT_NAME {
            let device = PathBuf::from("/dev").join(entry.file_name());
            if device.exists() {
                return Ok(Some(device));
            }
        }
    }
    Ok(None)
}

fn connect_vsock() -> SysResult<File> {
    let describe = || format!("connect vsock to the host (CID 2) port {VSOCK_PORT}");
    let deadline = Instant::now() + CHANNEL_APPEAR_TIMEOUT;
    loop {
        // SAFETY: socket has no memory-safety preconditions.
        let fd = check(
            unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) },
            describe,
        )?;
        // SAFETY: fd is a fresh socket owned by this File from here on.
        let file = unsafe { File::from_raw_fd(fd) };

        // SAFETY: sockaddr_vm is plain data.
        let mut address: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        address.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        address.svm_cid = libc::VMADDR_CID_HOST;
        address.svm_port = VSOCK_PORT;
        // SAFETY: address is a valid sockaddr_vm of the given length.
        let result = unsafe {
            libc::connect(
                fd,
                std::ptr::addr_of!(address).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if result == 0 {
            return Ok(file);
        }

        let error = io::Error::last_os_error();
        if Instant::now() > deadline {
            return Err(SysError {
                what: describe(),
                source: error,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
