//! Process helpers: waiting for a VMM process to exit (whether this process started it or
//! adopted it) and waiting for a Unix socket to accept, each with a named timeout.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::net::UnixStream;

use crate::VmmError;

/// Interval between checks in the bounded waits below.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Returns whether a process with this pid exists (a zombie counts as gone).
pub fn is_alive(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state is the first field after the parenthesised command name.
    let state = status
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) };
}

/// Waits until `pid` exits or `timeout` passes; returns whether it exited.
pub async fn wait_exit(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Connects to a Unix socket, retrying while it does not exist or refuses, up to `timeout`.
/// `alive` is checked between tries so a VMM that died is reported at once.
pub async fn connect_unix(
    path: &Path,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), VmmError>,
) -> Result<UnixStream, VmmError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(stream) = UnixStream::connect(path).await {
            return Ok(stream);
        }
        alive()?;
        if Instant::now() >= deadline {
            return Err(VmmError::ConnectTimeout {
                path: path.to_owned(),
                timeout,
            });
        }
        tokio::time::sleep(POLL_INTERVAL / 4).await;
    }
}

/// Returns the resident set size of `pid` in KiB, from `/proc/PID/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// Returns the state of a VMM process: `Created` before it started, otherwise whether the
/// child (when this process started it) or the pid (when adopted) is still alive.
pub fn vm_state(pid: Option<u32>, child: Option<&mut tokio::process::Child>) -> crate::VmState {
    let Some(pid) = pid else {
        return crate::VmState::Created;
    };
    let running = match child {
        Some(child) => matches!(child.try_wait(), Ok(None)),
        None => is_alive(pid),
    };
    if running {
        crate::VmState::Running
    } else {
        crate::VmState::Stopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive() {
        assert!(is_alive(std::process::id()));
        assert!(rss_kib(std::process::id()).is_some());
    }

    #[test]
    fn missing_process_is_not_alive() {
        // Pids above the kernel's pid_max (at most 2^22) never exist.
        assert!(!is_alive(u32::MAX - 1));
    }
}
