//! `kiln-agent vm ...`: operator commands for microVMs outside the control plane.
//!
//! `vm run` boots one instance from an image reference (through the image store) or a root
//! filesystem file, streams its output (and, with
//! `--console`, its serial console), forwards Ctrl-C as a graceful stop and exits with the
//! workload's exit code. Secrets given on the command line go to the guest over the
//! host-guest channel from memory; they are never written to disk.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_core::InstanceId;
use kiln_vmm::channel::GuestEvents;
use kiln_vmm::firecracker::{FirecrackerConfig, FirecrackerDriver};
use kiln_vmm::proto::{GuestMessage, InstanceConfig, Secret, Stream};
use kiln_vmm::qemu::{QemuConfig, QemuDriver};
use kiln_vmm::{Driver, DriverKind, GuestAssets, VmSpec};

/// Exit code when the VM could not run the workload (boot failure, startup script failure),
/// as distinct from any exit code of the workload itself.
const EXIT_VM_FAILED: u8 = 125;

/// `kiln-agent vm` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum VmCommand {
    /// Boot one microVM, stream its output and exit with the workload's exit code.
    Run(Box<RunArgs>),
}

/// Arguments of `kiln-agent vm run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// Image to run: a registry reference, `oci-layout:DIR[:TAG]` or
    /// `oci-archive:FILE[:TAG]`. It is pulled into the image store and its root filesystem
    /// built (or reused); its entrypoint, cmd, env, working directory and user apply unless
    /// overridden here.
    image_ref: Option<String>,

    /// Image store directory, for IMAGE_REF.
    #[arg(long, env = "KILN_IMAGE_STORE", default_value = "/var/lib/kiln/images")]
    store: PathBuf,

    /// TOML file with the image store settings (registries, credentials), for IMAGE_REF.
    #[arg(long, env = "KILN_IMAGE_CONFIG")]
    image_config: Option<PathBuf>,

    /// Read-only root filesystem image (ext4) to boot, instead of an image reference.
    #[arg(long, value_name = "FILE.ext4")]
    rootfs: Option<PathBuf>,

    /// Environment variable for the workload (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,

    /// Secret written to /run/kiln/secrets/NAME in the guest (repeatable). The value is
    /// visible in the host's process list; prefer --secret-env for real secrets.
    #[arg(long = "secret", value_name = "NAME=VALUE")]
    secrets: Vec<String>,

    /// Secret whose value is read from this process's environment variable NAME (repeatable).
    #[arg(long = "secret-env", value_name = "NAME")]
    secret_env: Vec<String>,

    /// Also pass every secret to the workload as an environment variable.
    #[arg(long)]
    secrets_as_env: bool,

    /// VMM driver.
    #[arg(long, default_value = "qemu", value_parser = parse_driver)]
    driver: DriverKind,

    /// Permit QEMU's TCG software emulation when hardware virtualization is not usable.
    #[arg(long)]
    allow_software_virtualization: bool,

    /// Directory with bzImage, vmlinux and initramfs.cpio from scripts/guest-kernel.
    /// Default: $KILN_GUEST_DIR/current, else target/guest/current.
    #[arg(long, value_name = "DIR")]
    guest_dir: Option<PathBuf>,

    /// Directory for the VM's sockets, console log and state file. Default: a new
    /// temporary directory, removed at exit.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Host TAP device for the guest's network interface (prepared by the caller).
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,

    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,

    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,

    /// Working directory of the workload. Default: the image's, else `/`.
    #[arg(long)]
    workdir: Option<String>,

    /// User of the workload as UID[:GID]. Default: the image's user, else root.
    #[arg(long, value_name = "UID[:GID]")]
    user: Option<String>,

    /// Guest hostname.
    #[arg(long, default_value = "kiln")]
    hostname: String,

    /// Seconds a graceful stop (Ctrl-C) waits before the VM is killed.
    #[arg(long, default_value_t = 10)]
    stop_timeout: u64,

    /// Seconds to wait for kiln-init to start before giving up (one retry).
    #[arg(long, default_value_t = 60)]
    boot_timeout: u64,

    /// Also print the guest's serial console (kernel messages) on stderr when the VM ends.
    #[arg(long)]
    console: bool,

    /// Firecracker binary for --driver firecracker.
    #[arg(long, default_value = "/usr/local/bin/firecracker")]
    firecracker_binary: PathBuf,

    /// Command of the workload. With IMAGE_REF it replaces the image's CMD and keeps its
    /// ENTRYPOINT (as `docker run` does); with --rootfs it is the whole argv and required.
    #[arg(last = true, value_name = "ARGV")]
    argv: Vec<String>,
}

fn parse_driver(value: &str) -> Result<DriverKind, String> {
    value
        .parse()
        .map_err(|error: kiln_vmm::VmmError| error.to_string())
}

/// Runs a `kiln-agent vm` subcommand.
pub(crate) async fn run(command: VmCommand) -> anyhow::Result<ExitCode> {
    match command {
        VmCommand::Run(args) => run_vm(*args).await,
    }
}

async fn run_vm(args: RunArgs) -> anyhow::Result<ExitCode> {
    let (rootfs, image) = match (&args.rootfs, &args.image_ref) {
        (Some(rootfs), None) => (rootfs.clone(), None),
        (Some(_), Some(image_ref)) => {
            bail!("give either IMAGE_REF ({image_ref:?}) or --rootfs, not both")
        }
        (None, Some(image_ref)) => {
            let rootfs = pull_rootfs(&args, image_ref).await?;
            (rootfs.path.clone(), Some(rootfs.image_config))
        }
        (None, None) => bail!("nothing to run: give an IMAGE_REF or --rootfs FILE.ext4"),
    };
    let config = instance_config(&args, image.as_ref())?;

    let temporary_dir;
    let state_dir = match &args.state_dir {
        Some(dir) => dir.clone(),
        None => {
            temporary_dir = tempfile::Builder::new().prefix("kiln-vm-").tempdir()?;
            temporary_dir.path().to_owned()
        }
    };
    let guest_dir = args.guest_dir.clone().unwrap_or_else(default_guest_dir);

    let mut spec = VmSpec::new(
        InstanceId::new(),
        state_dir,
        GuestAssets::in_dir(&guest_dir),
        rootfs,
    );
    spec.tap = args.tap.clone();
    spec.memory_mib = args.memory_mib;
    spec.vcpus = args.vcpus;
    spec.boot_timeout = Duration::from_secs(args.boot_timeout);

    let stop_timeout = Duration::from_secs(args.stop_timeout);
    match args.driver {
        DriverKind::Qemu => {
            let driver = QemuDriver::new(QemuConfig {
                allow_software_virtualization: args.allow_software_virtualization,
                ..QemuConfig::default()
            })?;
            eprintln!("kiln-agent: qemu with {}", driver.accelerator());
            supervise(&driver, spec, config, stop_timeout, args.console).await
        }
        DriverKind::Firecracker => {
            let driver = FirecrackerDriver::new(FirecrackerConfig {
                binary: args.firecracker_binary.clone(),
                jailer: None,
            })?;
            supervise(&driver, spec, config, stop_timeout, args.console).await
        }
    }
}

/// Pulls the image into the store and builds (or reuses) its root filesystem.
async fn pull_rootfs(args: &RunArgs, image_ref: &str) -> anyhow::Result<kiln_image::Rootfs> {
    let mut store_config = match &args.image_config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {} failed", path.display()))?;
            toml::from_str::<kiln_image::StoreConfig>(&text)
                .with_context(|| format!("invalid image store config {}", path.display()))?
        }
        None => kiln_image::StoreConfig::default(),
    };
    store_config
        .validate()
        .context("invalid image store config")?;
    let root = std::path::absolute(&args.store)
        .with_context(|| format!("invalid store path {}", args.store.display()))?;
    let store = kiln_image::ImageStore::open(&root, store_config)
        .with_context(|| format!("opening image store {} failed", root.display()))?;

    let reference: kiln_image::ImageRef = image_ref.parse()?;
    eprintln!("kiln-agent: pulling {image_ref}");
    let rootfs = store.pull_rootfs(&reference).await?;
    eprintln!(
        "kiln-agent: image {} ({} bytes)",
        rootfs.digest, rootfs.size_bytes
    );
    Ok(rootfs)
}

fn default_guest_dir() -> PathBuf {
    match std::env::var_os("KILN_GUEST_DIR") {
        Some(dir) => Path::new(&dir).join("current"),
        None => PathBuf::from("target/guest/current"),
    }
}

fn instance_config(
    args: &RunArgs,
    image: Option<&kiln_image::ImageConfig>,
) -> anyhow::Result<InstanceConfig> {
    let argv = match image {
        Some(image) => {
            let command = (!args.argv.is_empty()).then_some(args.argv.as_slice());
            kiln_image::effective_argv(image, None, command)?
        }
        None if args.argv.is_empty() => bail!("--rootfs needs the workload's argv after `--`"),
        None => args.argv.clone(),
    };
    let (uid, gid) = match (&args.user, image) {
        (Some(user), _) => parse_user(user)?,
        (None, Some(image)) => (image.user.uid, image.user.gid),
        (None, None) => (0, 0),
    };
    let workdir = match (&args.workdir, image) {
        (Some(workdir), _) => workdir.clone(),
        (None, Some(image)) => image.working_dir.clone(),
        (None, None) => "/".to_owned(),
    };
    let kill_signal = match image.and_then(|image| image.stop_signal.as_deref()) {
        Some(name) => parse_signal(name)?,
        None => libc::SIGTERM,
    };

    let mut env = Vec::new();
    for pair in image.map(|image| image.env.as_slice()).unwrap_or_default() {
        env.push(split_pair(pair, "image ENV")?);
    }
    for pair in &args.env {
        let (name, value) = split_pair(pair, "--env")?;
        env.retain(|(existing, _)| *existing != name);
        env.push((name, value));
    }

    let mut secrets = Vec::new();
    for pair in &args.secrets {
        let (name, value) = split_pair(pair, "--secret")?;
        secrets.push(Secret {
            name,
            value: value.into_bytes(),
        });
    }
    for name in &args.secret_env {
        let value = std::env::var(name).with_context(|| {
            format!("--secret-env {name}: environment variable {name} is not set")
        })?;
        secrets.push(Secret {
            name: name.clone(),
            value: value.into_bytes(),
        });
    }

    let mut seed = [0u8; 64];
    rand::Rng::fill(&mut rand::thread_rng(), &mut seed[..]);
    Ok(InstanceConfig {
        argv,
        workdir,
        uid,
        gid,
        env,
        secrets,
        secrets_as_env: args.secrets_as_env,
        hostname: args.hostname.clone(),
        network: None,
        startup_scripts: Vec::new(),
        kill_signal,
        entropy_seed: seed.to_vec(),
    })
}

fn split_pair(pair: &str, flag: &str) -> anyhow::Result<(String, String)> {
    match pair.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => bail!("{flag} {pair:?} is invalid: expected NAME=VALUE"),
    }
}

/// Parses an image's STOPSIGNAL: a number, or a name with or without `SIG`.
fn parse_signal(value: &str) -> anyhow::Result<i32> {
    if let Ok(number) = value.parse::<i32>() {
        return Ok(number);
    }
    let name = value.trim_start_matches("SIG").to_ascii_uppercase();
    let signal = match name.as_str() {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "WINCH" => libc::SIGWINCH,
        _ => bail!("image STOPSIGNAL {value:?} is not a known signal"),
    };
    Ok(signal)
}

fn parse_user(user: &str) -> anyhow::Result<(u32, u32)> {
    let invalid = || format!("--user {user:?} is invalid: expected UID or UID:GID (numbers)");
    let (uid, gid) = user.split_once(':').unwrap_or((user, user));
    let uid = uid.parse().with_context(invalid)?;
    let gid = gid.parse().with_context(invalid)?;
    Ok((uid, gid))
}

/// Boots the VM, streams its output until it ends and returns the workload's exit code.
async fn supervise<D: Driver>(
    driver: &D,
    spec: VmSpec,
    config: InstanceConfig,
    stop_timeout: Duration,
    print_console: bool,
) -> anyhow::Result<ExitCode> {
    let mut vm = driver.create(spec).await?;
    let mut events = driver.start(&mut vm, config).await?;

    let code = tokio::select! {
        code = stream_output(&mut events) => code,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("kiln-agent: stopping the VM (up to {stop_timeout:?})");
            driver.stop(&mut vm, stop_timeout).await?;
            drain_exit(&mut events).await
        }
    };

    // After the workload's exit, kiln-init powers the VM off; make sure the VMM is gone.
    driver.stop(&mut vm, stop_timeout).await?;
    if print_console {
        let console = std::fs::read_to_string(driver.console_path(&vm)).unwrap_or_default();
        eprint!("{console}");
    }
    Ok(ExitCode::from(code))
}

/// Prints guest output until the workload's exit; returns the exit code for this process.
async fn stream_output(events: &mut GuestEvents) -> u8 {
    while let Some(message) = events.recv().await {
        if let Some(code) = handle_message(message) {
            return code;
        }
    }
    eprintln!("kiln-agent: the VM ended without reporting an exit status");
    EXIT_VM_FAILED
}

/// After a stop request: prints what is left and returns the exit code, if one comes.
async fn drain_exit(events: &mut GuestEvents) -> u8 {
    stream_output(events).await
}

fn handle_message(message: GuestMessage) -> Option<u8> {
    match message {
        GuestMessage::Log {
            stream: Stream::Stdout,
            line,
        } => println!("{line}"),
        GuestMessage::Log {
            stream: Stream::Stderr,
            line,
        } => eprintln!("{line}"),
        GuestMessage::Exited(status) => {
            let code = u8::try_from(status.shell_code()).unwrap_or(EXIT_VM_FAILED);
            return Some(code);
        }
        GuestMessage::StartupScriptFailed {
            index,
            code,
            timed_out,
            output,
        } => {
            let how = if timed_out {
                "timed out".to_owned()
            } else {
                format!("failed (exit {code:?})")
            };
            eprintln!("kiln-agent: startup script {index} {how}:\n{output}");
        }
        GuestMessage::BootFailed { message } => {
            eprintln!("kiln-agent: the guest failed to boot: {message}");
            return Some(EXIT_VM_FAILED);
        }
        GuestMessage::Hello { .. }
        | GuestMessage::Started { .. }
        | GuestMessage::ListeningSockets { .. } => {}
    }
    None
}
