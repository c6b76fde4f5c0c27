//! Bounded waits with named timeouts, and commands that may not run forever.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Time between two polls of a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Polls `poll` until it returns `Ok`, and panics naming `what`, the timeout and the last
/// error once `timeout` has passed.
pub(crate) fn until<T>(
    what: &str,
    timeout: Duration,
    mut poll: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match poll() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last observation: {last}")
            }
            Err(_) => thread::sleep(POLL_INTERVAL),
        }
    }
}

/// Runs `command` with `stdin` as its input, killing it once `timeout` has passed.
pub(crate) fn run(mut command: Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    let line = format!("{command:?}");
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|error| panic!("failed to start {line}: {error}"));

    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(bytes)
            .unwrap_or_else(|error| panic!("failed to write the stdin of {line}: {error}"));
    }

    // Read the pipes on their own threads so a chatty child never blocks on a full pipe.
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let stdout = thread::spawn(move || read_all(stdout));
    let stderr = thread::spawn(move || read_all(stderr));

    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{line} did not exit within {timeout:?}; it was killed");
            }
            Ok(None) => thread::sleep(POLL_INTERVAL),
            Err(error) => panic!("failed to wait for {line}: {error}"),
        }
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn read_all(mut reader: impl std::io::Read) -> Vec<u8> {
    let mut bytes = Vec::new();
    let _ = reader.read_to_end(&mut bytes);
    bytes
}

/// Returns the last `lines` lines of the file at `path`, for failure messages.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
