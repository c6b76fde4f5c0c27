//! Zero-copy data path on Linux: splice(2) from one socket into a pipe and from the pipe into
//! the other socket, so payload bytes stay in the kernel instead of crossing into a user
//! buffer and back.
//!
//! A direction switches to splice once a read fills its small copy buffer, and then owns one
//! pipe. Both sockets stay registered with tokio, and every splice call runs inside
//! [`TcpStream::try_io`], so an `EAGAIN` clears tokio's readiness and the task sleeps until
//! the socket is ready again. `SPLICE_F_NONBLOCK` keeps the pipe side from blocking too. Half-close, idle timeout and byte counters behave as in [`crate::copy`]:
//! a direction ends at end of stream and half-closes the destination, and bytes are counted
//! once they have been written to the destination socket.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::copy::{Activity, CopyEnd};
use crate::metrics::RouteMetrics;

/// Maximum bytes moved by one splice call. A pipe's default capacity is 16 pages (64 KiB
/// with 4 KiB pages), so one call never requests more than an empty pipe accepts.
const SPLICE_CHUNK: usize = 64 * 1024;

/// A pipe whose two ends close when it is dropped.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds: [libc::c_int; 2] = [-1, -1];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        let result = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by no one else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Self { read, write })
    }
}

/// Moves up to `len` bytes from `from` to `to` with one splice(2) call.
fn splice_once(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (their owners are
    // borrowed by the caller), and null offsets are valid for sockets and pipes.
    let moved = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if moved < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(moved.unsigned_abs())
}

/// Bytes of each direction's user-space buffer, used until a read fills it.
const COPY_BUFFER_LEN: usize = 16 * 1024;

/// Splices between `client` and `backend` until the connection ends, counting bytes in
/// `metrics` as they move.
///
/// Each direction starts by copying through a small user-space buffer and switches to
/// splice(2) once one read fills that buffer, because that shows a bulk transfer, where
/// splice saves the copies. Short exchanges such as TLS handshakes and small requests never
/// pay for creating a pipe. A direction whose pipe cannot be created (such as at the
/// descriptor limit) keeps copying.
pub async fn splice_bidirectional(
    client: TcpStream,
    backend: TcpStream,
    idle_timeout: Duration,
    metrics: &RouteMetrics,
) -> CopyEnd {
    let activity = Activity::new();
    let upstream = pump(&client, &backend, &metrics.bytes_from_client, &activity);
    let downstream = pump(&backend, &client, &metrics.bytes_to_client, &activity);

    tokio::select! {
        result = async { tokio::try_join!(upstream, downstream) } => match result {
            Ok(_) => CopyEnd::Closed,
            Err(_) => CopyEnd::Reset,
        },
        () = activity.idle(idle_timeout) => CopyEnd::IdleTimeout,
    }
}

/// Current mechanism of one direction.
enum Mode {
    Copy(Vec<u8>),
    Splice(Pipe),
}

/// Moves one direction until end of stream, then half-closes the destination.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    counter: &AtomicU64,
    activity: &Activity,
) -> io::Result<()> {
    let mut mode = Mode::Copy(vec![0u8; COPY_BUFFER_LEN]);
    loop {
        let (moved, filled) = match &mut mode {
            Mode::Copy(buf) => {
                let moved = copy_chunk(from, to, buf, counter, activity).await?;
                (moved, moved == buf.len())
            }
            Mode::Splice(pipe) => (
                splice_chunk(from, to, pipe, counter, activity).await?,
                false,
            ),
        };
        if moved == 0 {
            socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
            return Ok(());
        }
        if filled {
            match Pipe::new() {
                Ok(pipe) => mode = Mode::Splice(pipe),
                Err(error) => {
                    tracing::warn!(%error, "pipe creation failed, copying instead of splicing");
                }
            }
        }
    }
}

/// Reads once into `buf` and writes it all to `to`; returns the byte count, 0 at end of
/// stream.
async fn copy_chunk(
    from: &TcpStream,
    to: &TcpStream,
    buf: &mut [u8],
    counter: &AtomicU64,
    activity: &Activity,
) -> io::Result<usize> {
    let read = loop {
        from.readable().await?;
        match from.try_read(buf) {
            Ok(n) => break n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        }
    };

    let mut written = 0;
    while written < read {
        to.writable().await?;
        match to.try_write(&buf[written..read]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written += n;
                counter.fetch_add(n as u64, Ordering::Relaxed);
                activity.touch();
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(read)
}

/// Splices once from `from` into the pipe and then all of it into `to`; returns the byte
/// count, 0 at end of stream.
async fn splice_chunk(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    counter: &AtomicU64,
    activity: &Activity,
) -> io::Result<usize> {
    let from_fd = from.as_raw_fd();
    let to_fd = to.as_raw_fd();
    let pipe_read = pipe.read.as_raw_fd();
    let pipe_write = pipe.write.as_raw_fd();

    let filled = loop {
        from.readable().await?;
        match from.try_io(Interest::READABLE, || {
            splice_once(from_fd, pipe_write, SPLICE_CHUNK)
        }) {
            Ok(n) => break n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        }
    };

    // The pipe is drained completely before the next read, so it never contains bytes of
    // two reads and a full pipe cannot stall the source.
    let mut pending = filled;
    while pending > 0 {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || {
            splice_once(pipe_read, to_fd, pending)
        }) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                pending -= n;
                counter.fetch_add(n as u64, Ordering::Relaxed);
                activity.touch();
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}
