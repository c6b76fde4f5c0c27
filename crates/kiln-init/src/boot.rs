//! The boot steps before the workload starts: mounts, modules, channel, root switch,
//! network, hostname, secrets and startup scripts.

use std::io::Read;
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kiln_guest_proto::{
    ExitStatus, GuestMessage, HostMessage, InstanceConfig, MAX_LOG_LINE_BYTES, PROTOCOL_VERSION,
    StartupScript,
};

use crate::channel::{self, Channel, Transport};
use crate::sys::{self, SysError, SysResult, context};
use crate::{network, supervise};

/// File in the initramfs listing the modules to load, one file name per line, dependencies
/// first. scripts/guest-kernel writes it.
const MODULE_ORDER: &str = "/lib/modules/kiln/order";
const MODULE_DIR: &str = "/lib/modules/kiln";

/// Read-only image disk and writable instance disk, in the order the drivers attach them.
const IMAGE_DISK: &str = "/dev/vda";
const DATA_DISK: &str = "/dev/vdb";

/// How long to wait for the image disk to appear after virtio_blk loads.
const DISK_APPEAR_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the secrets go: a tmpfs of its own, readable only by the workload user.
const SECRETS_DIR: &str = "/run/kiln/secrets";

/// Mounts the early filesystems, loads modules and opens the channel.
pub(crate) fn early() -> SysResult<Channel> {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    sys::mount("proc", Path::new("/proc"), "proc", nosuid_nodev_noexec, "")?;
    sys::mount("sysfs", Path::new("/sys"), "sysfs", nosuid_nodev_noexec, "")?;
    sys::mount(
        "devtmpfs",
        Path::new("/dev"),
        "devtmpfs",
        libc::MS_NOSUID,
        "mode=0755",
    )?;
    sys::mount(
        "tmpfs",
        Path::new("/run"),
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    )?;

    load_modules()?;

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    channel::open(Transport::from_cmdline(&cmdline))
}

fn load_modules() -> SysResult<()> {
    let order = context(std::fs::read_to_string(MODULE_ORDER), || {
        format!("read {MODULE_ORDER}")
    })?;
    for name in order.lines().map(str::trim).filter(|line| !line.is_empty()) {
        let path = Path::new(MODULE_DIR).join(name);
        sys::load_module(&path)?;
        // The initramfs stays in memory for the VM's life; free what is no longer needed.
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}

/// Receives the config, prepares the guest, runs the startup scripts and the workload, and
/// returns the workload's exit status.
pub(crate) fn run(mut channel: Channel) -> SysResult<ExitStatus> {
    channel.writer.send(&GuestMessage::Hello {
        version: PROTOCOL_VERSION,
    });
    let config = receive_config(&mut channel)?;

    // A failed seed only slows down early getrandom callers; it must not stop the boot.
    if let Err(error) = sys::add_entropy(&config.entropy_seed) {
        eprintln!("kiln-init: seeding entropy failed: {error}");
    }

    mount_root()?;
    network::loopback_up()?;
    if let Some(network_config) = &config.network {
        let interface = network::find_interface()?;
        network::configure(&interface, network_config)?;
    }
    if !config.hostname.is_empty() {
        sys::set_hostname(&config.hostname)?;
    }
    write_secrets(&config)?;

    for (index, script) in config.startup_scripts.iter().enumerate() {
        if let Some(failure) = run_startup_script(index, script)? {
            channel.writer.send(&failure);
            return Err(SysError {
                what: format!("startup script {index}"),
                source: std::io::Error::other("exited unsuccessfully"),
            });
        }
    }

    supervise::run_workload(&config, channel)
}

fn receive_config(channel: &mut Channel) -> SysResult<InstanceConfig> {
    let message = kiln_guest_proto::read_frame::<HostMessage>(&mut channel.reader);
    match message {
        Ok(Some(HostMessage::Config(config))) => {
            validate(&config)?;
            Ok(*config)
        }
        Ok(Some(other)) => Err(SysError {
            what: "receive the instance config".to_owned(),
            source: std::io::Error::other(format!("expected a config, got {other:?}")),
        }),
        Ok(None) => Err(SysError {
            what: "receive the instance config".to_owned(),
            source: std::io::Error::other("the host closed the channel"),
        }),
        Err(error) => Err(SysError {
            what: "receive the instance config".to_owned(),
            source: std::io::Error::other(error.to_string()),
        }),
    }
}

fn validate(config: &InstanceConfig) -> SysResult<()> {
    let invalid = |message: String| SysError {
        what: "validate the instance config".to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, message),
    };
    if config.argv.is_empty() {
        return Err(invalid("argv is empty".to_owned()));
    }
    for secret in &config.secrets {
        let valid = !secret.name.is_empty()
            && secret.name != "."
            && secret.name != ".."
            && secret
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
        if !valid {
            return Err(invalid(format!(
                "secret name {:?} must be letters, digits, '_', '-' or '.'",
                secret.name
            )));
        }
    }
    Ok(())
}

/// Mounts the image disk read-only and the instance disk (or a tmpfs when there is none) as
/// an overlay, moves the early mounts into it and makes it the root.
fn mount_root() -> SysResult<()> {
    wait_for_device(IMAGE_DISK)?;
    let read_only = libc::MS_RDONLY;
    sys::mount(IMAGE_DISK, Path::new("/mnt/image"), "ext4", read_only, "")?;

    if Path::new(DATA_DISK).exists() {
        sys::mount(DATA_DISK, Path::new("/mnt/data"), "ext4", 0, "")?;
    } else {
        sys::mount("tmpfs", Path::new("/mnt/data"), "tmpfs", 0, "mode=0755")?;
    }
    for dir in ["/mnt/data/upper", "/mnt/data/work"] {
        context(std::fs::create_dir_all(dir), || format!("create {dir}"))?;
    }
    let options = "lowerdir=/mnt/image,upperdir=/mnt/data/upper,workdir=/mnt/data/work";
    sys::mount("overlay", Path::new("/mnt/root"), "overlay", 0, options)?;

    for early in ["/proc", "/sys", "/dev", "/run"] {
        sys::move_mount(Path::new(early), &Path::new("/mnt/root").join(&early[1..]))?;
    }
    sys::switch_root(Path::new("/mnt/root"))?;

    let tmp = Path::new("/tmp");
    if !tmp.exists() {
        context(std::fs::create_dir_all(tmp), || "create /tmp".to_owned())?;
        let _ = std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o1777));
    }
    Ok(())
}

fn wait_for_device(path: &str) -> SysResult<()> {
    let deadline = Instant::now() + DISK_APPEAR_TIMEOUT;
    while !Path::new(path).exists() {
        if Instant::now() > deadline {
            return Err(SysError {
                what: format!("find disk {path}"),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("not present after {DISK_APPEAR_TIMEOUT:?}"),
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Writes each secret to `/run/kiln/secrets/NAME` on a fresh tmpfs, mode 0400, owned by the
/// workload user; the directory is 0500 and owned by the same user.
fn write_secrets(config: &InstanceConfig) -> SysResult<()> {
    let dir = Path::new(SECRETS_DIR);
    let options = format!("mode=0500,uid={},gid={}", config.uid, config.gid);
    sys::mount(
        "tmpfs",
        dir,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        &options,
    )?;

    for secret in &config.secrets {
        let path = dir.join(&secret.name);
        let describe = || format!("write secret {}", path.display());
        context(std::fs::write(&path, &secret.value), describe)?;
        context(
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)),
            describe,
        )?;
        context(chown(&path, Some(config.uid), Some(config.gid)), describe)?;
    }
    Ok(())
}

/// Runs one startup script as root; returns the failure report when it exits unsuccessfully
/// or runs past its timeout.
fn run_startup_script(index: usize, script: &StartupScript) -> SysResult<Option<GuestMessage>> {
    let describe = || format!("start startup script {index} with /bin/sh");

    // Stdout and stderr share one pipe so the report shows the output in order. The script
    // gets a process group of its own, so a timeout kills what it started in the background
    // too (which would otherwise hold the pipe open).
    let (mut reader, writer) = context(std::io::pipe(), describe)?;
    let writer_copy = context(writer.try_clone(), describe)?;
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(&script.command)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer_copy)
        .process_group(0);
    let child = context(command.spawn(), describe)?;
    // The command holds the pipe's write ends; dropping it lets the read end see EOF.
    drop(command);

    let timed_out = Arc::new(AtomicBool::new(false));
    let (finished, watchdog) = std::sync::mpsc::channel::<()>();
    if let Some(secs) = script.timeout_secs {
        let group = libc::pid_t::try_from(child.id()).unwrap_or(0);
        let timed_out = Arc::clone(&timed_out);
        std::thread::spawn(move || {
            let timeout = Duration::from_secs(u64::from(secs));
            if watchdog.recv_timeout(timeout) == Err(RecvTimeoutError::Timeout) && group > 0 {
                timed_out.store(true, Ordering::SeqCst);
                sys::kill(-group, libc::SIGKILL);
            }
        });
    }

    // The output is read on a thread of its own, so a process that left the group (setsid)
    // and keeps the pipe open cannot hold the boot past the script's own end.
    let output = Arc::new(Mutex::new(Vec::new()));
    let (read_all, output_done) = std::sync::mpsc::channel::<()>();
    {
        let output = Arc::clone(&output);
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(read) = reader.read(&mut chunk) {
                if read == 0 {
                    break;
                }
                output
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend_from_slice(&chunk[..read]);
            }
            let _ = read_all.send(());
        });
    }
    let status = supervise::wait_child(child.id());
    drop(finished);
    let _ = output_done.recv_timeout(supervise::OUTPUT_DRAIN_TIMEOUT);
    let mut output = std::mem::take(&mut *output.lock().unwrap_or_else(PoisonError::into_inner));

    // A script that exited 0 just as the watchdog fired still succeeded.
    let timed_out = timed_out.load(Ordering::SeqCst) && status.code != Some(0);
    if status.code == Some(0) {
        return Ok(None);
    }

    if timed_out {
        let note = format!(
            "\nkilled after {} s, the script's timeout",
            script.timeout_secs.unwrap_or(0)
        );
        output.extend_from_slice(note.as_bytes());
    }
    // Keep the end, because the last lines show why the script failed.
    if output.len() > MAX_LOG_LINE_BYTES {
        output.drain(..output.len() - MAX_LOG_LINE_BYTES);
    }
    Ok(Some(GuestMessage::StartupScriptFailed {
        index,
        code: status.code,
        timed_out,
        output: String::from_utf8_lossy(&output).into_owned(),
    }))
}
