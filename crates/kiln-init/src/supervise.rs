//! Runs the workload and supervises it as PID 1: streams its output to the host, forwards
//! SIGTERM and SIGINT (and the host's stop requests), reaps every orphaned process, answers
//! listening-socket requests and returns the workload's exit status.
//!
//! Signals are blocked in every thread and taken synchronously with `sigwait` on the main
//! thread, so there are no async signal handlers. The workload gets an empty signal mask
//! in `pre_exec`, because a blocked mask survives exec.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_guest_proto::{
    ExitStatus, GuestMessage, HostMessage, InstanceConfig, MAX_LOG_LINE_BYTES, Stream,
};

use crate::channel::{Channel, Writer};
use crate::sockets;
use crate::sys::{self, SysResult, context};

/// How long to keep forwarding output after the workload exited, for output still buffered
/// in its pipes or held open by a process it left behind.
pub(crate) const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// `PATH` given to a workload whose image sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Blocks the signals PID 1 handles, disables the kernel's immediate reboot on
/// Ctrl-Alt-Del (the kernel then sends SIGINT to PID 1, which becomes a graceful stop).
pub(crate) fn prepare_signals() -> libc::sigset_t {
    // SAFETY: reboot with RB_DISABLE_CAD has no memory-safety preconditions.
    unsafe { libc::reboot(libc::RB_DISABLE_CAD) };
    sys::block_signals(&[libc::SIGCHLD, libc::SIGTERM, libc::SIGINT])
}

/// Starts the workload as the config's user and supervises it until it exits.
pub(crate) fn run_workload(config: &InstanceConfig, channel: Channel) -> SysResult<ExitStatus> {
    let signals = prepare_signals();

    let mut command = workload_command(config);
    let mut child = context(command.spawn(), || {
        format!("start workload {:?}", config.argv)
    })?;
    drop(command);
    let pid = libc::pid_t::try_from(child.id()).unwrap_or(libc::pid_t::MAX);
    channel
        .writer
        .send(&GuestMessage::Started { pid: child.id() });

    let (drained_tx, drained_rx) = mpsc::channel();
    let mut streams = 0;
    if let Some(stdout) = child.stdout.take() {
        spawn_forwarder(
            stdout,
            Stream::Stdout,
            channel.writer.clone(),
            drained_tx.clone(),
        );
        streams += 1;
    }
    if let Some(stderr) = child.stderr.take() {
        spawn_forwarder(
            stderr,
            Stream::Stderr,
            channel.writer.clone(),
            drained_tx.clone(),
        );
        streams += 1;
    }
    drop(drained_tx);
    spawn_host_listener(channel, pid);

    let status = wait_workload(pid, config.kill_signal, &signals);

    let deadline = Instant::now() + OUTPUT_DRAIN_TIMEOUT;
    for _ in 0..streams {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if drained_rx.recv_timeout(remaining).is_err() {
            break;
        }
    }
    Ok(status)
}

fn workload_command(config: &InstanceConfig) -> Command {
    let mut command = Command::new(&config.argv[0]);
    command.args(&config.argv[1..]).env_clear();
    if !config.env.iter().any(|(name, _)| name == "PATH") {
        command.env("PATH", DEFAULT_PATH);
    }
    command.envs(config.env.iter().map(|(name, value)| (name, value)));
    if config.secrets_as_env {
        for secret in &config.secrets {
            command.env(
                &secret.name,
                String::from_utf8_lossy(&secret.value).as_ref(),
            );
        }
    }

    let workdir = if config.workdir.is_empty() {
        "/"
    } else {
        &config.workdir
    };
    command
        .current_dir(workdir)
        .uid(config.uid)
        .gid(config.gid)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    // SAFETY: setsid, sigemptyset and pthread_sigmask are async-signal-safe, and the
    // closure allocates nothing.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            // kiln-init blocks the signals it takes with sigwait, and a blocked mask survives
            // exec: the workload must start with every signal deliverable.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
    command
}

/// Forwards one output stream line by line (long lines in chunks) until it closes.
fn spawn_forwarder(
    mut pipe: impl Read + Send + 'static,
    stream: Stream,
    writer: Writer,
    drained: mpsc::Sender<()>,
) {
    std::thread::spawn(move || {
        let mut buffer = [0u8; 8192];
        let mut line = Vec::new();
        loop {
            let read = match pipe.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            for &byte in &buffer[..read] {
                if byte == b'\n' {
                    send_line(&writer, stream, &mut line);
                    continue;
                }
                line.push(byte);
                if line.len() >= MAX_LOG_LINE_BYTES {
                    send_line(&writer, stream, &mut line);
                }
            }
        }
        if !line.is_empty() {
            send_line(&writer, stream, &mut line);
        }
        let _ = drained.send(());
    });
}

fn send_line(writer: &Writer, stream: Stream, line: &mut Vec<u8>) {
    writer.send(&GuestMessage::Log {
        stream,
        line: String::from_utf8_lossy(line).into_owned(),
    });
    line.clear();
}

/// Serves the host's requests for the rest of the VM's life.
fn spawn_host_listener(mut channel: Channel, pid: libc::pid_t) {
    std::thread::spawn(move || {
        loop {
            match kiln_guest_proto::read_frame::<HostMessage>(&mut channel.reader) {
                Ok(Some(HostMessage::Signal { signal })) => sys::kill(pid, signal),
                Ok(Some(HostMessage::ListSockets)) => {
                    channel.writer.send(&GuestMessage::ListeningSockets {
                        sockets: sockets::listening(),
                    });
                }
                Ok(Some(HostMessage::Config(_))) => {
                    eprintln!("kiln-init: ignoring a second config from the host");
                }
                Ok(None) => return,
                Err(error) => {
                    eprintln!("kiln-init: reading from the host failed: {error}");
                    return;
                }
            }
        }
    });
}

/// Waits for the workload to exit, reaping every other child on the way and forwarding
/// SIGTERM and SIGINT to the workload.
fn wait_workload(pid: libc::pid_t, kill_signal: i32, signals: &libc::sigset_t) -> ExitStatus {
    loop {
        if let Some(status) = reap(pid) {
            return status;
        }
        match sys::wait_signal(signals) {
            libc::SIGTERM => sys::kill(pid, kill_signal),
            libc::SIGINT => sys::kill(pid, libc::SIGINT),
            _ => {}
        }
    }
}

/// Reaps every exited child; returns the workload's status if it was among them.
fn reap(workload: libc::pid_t) -> Option<ExitStatus> {
    let mut workload_status = None;
    loop {
        let mut raw = 0;
        // SAFETY: raw is a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
        if pid <= 0 {
            return workload_status;
        }
        if pid == workload {
            workload_status = Some(decode_status(raw));
        }
    }
}

/// Waits for one child and returns its status.
pub(crate) fn wait_child(pid: u32) -> ExitStatus {
    let pid = libc::pid_t::try_from(pid).unwrap_or(libc::pid_t::MAX);
    let mut raw = 0;
    // SAFETY: raw is a valid out pointer.
    let result = unsafe { libc::waitpid(pid, &mut raw, 0) };
    if result != pid {
        return ExitStatus {
            code: None,
            signal: None,
        };
    }
    decode_status(raw)
}

fn decode_status(raw: libc::c_int) -> ExitStatus {
    if libc::WIFEXITED(raw) {
        return ExitStatus {
            code: Some(libc::WEXITSTATUS(raw)),
            signal: None,
        };
    }
    ExitStatus {
        code: None,
        signal: libc::WIFSIGNALED(raw).then(|| libc::WTERMSIG(raw)),
    }
}

/// Kills every process left in the guest before power-off so filesystems sync cleanly.
pub(crate) fn kill_everything() {
    sys::kill(-1, libc::SIGKILL);
    let _ = reap(0);
}
