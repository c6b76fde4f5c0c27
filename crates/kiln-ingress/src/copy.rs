//! Bidirectional byte copy between client and backend with half-close and an idle timeout.
//!
//! Each direction runs until its reader sees end of stream, then shuts down the write side
//! of the other socket, so a client that half-closes (sends FIN after its request) still
//! receives the whole response. The connection ends when both directions have ended, when
//! either side fails (a reset), or when no byte moved in either direction for the idle
//! timeout.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::metrics::RouteMetrics;

/// Size of each direction's copy buffer.
const BUFFER_LEN: usize = 64 * 1024;

/// How a copied connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyEnd {
    /// Both sides closed their sending direction.
    Closed,
    /// A read or write failed, typically a reset by one side.
    Reset,
    /// No byte moved for the idle timeout.
    IdleTimeout,
}

/// Time of the last byte moved, in milliseconds since `start`; shared by both directions
/// of a connection for its idle timeout.
pub(crate) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub(crate) fn touch(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(now, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Completes once no byte has moved for `idle_timeout`.
    pub(crate) async fn idle(&self, idle_timeout: Duration) {
        loop {
            let idle_for = self.idle_for();
            if idle_for >= idle_timeout {
                return;
            }
            tokio::time::sleep(idle_timeout - idle_for).await;
        }
    }
}

/// Copies between `client` and `backend` until the connection ends, counting bytes in
/// `metrics` as they move.
pub async fn copy_bidirectional(
    client: TcpStream,
    backend: TcpStream,
    idle_timeout: Duration,
    metrics: &RouteMetrics,
) -> CopyEnd {
    let activity = Activity::new();
    let (client_read, client_write) = client.into_split();
    let (backend_read, backend_write) = backend.into_split();

    let upstream = pump(
        client_read,
        backend_write,
        &metrics.bytes_from_client,
        &activity,
    );
    let downstream = pump(
        backend_read,
        client_write,
        &metrics.bytes_to_client,
        &activity,
    );
    tokio::select! {
        result = async { tokio::try_join!(upstream, downstream) } => match result {
            Ok(_) => CopyEnd::Closed,
            Err(_) => CopyEnd::Reset,
        },
        () = activity.idle(idle_timeout) => CopyEnd::IdleTimeout,
    }
}

/// Copies one direction until end of stream, then half-closes the destination.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    counter: &AtomicU64,
    activity: &Activity,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER_LEN];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
}
