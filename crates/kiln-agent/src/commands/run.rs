//! `kiln-agent run --config FILE`: the host daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_agent::agent::{Agent, Shared};
use kiln_agent::config::AgentConfig;
use kiln_agent::images::StoreImages;
use kiln_agent::network::KilnNetwork;
use kiln_agent::records::StateDir;
use kiln_agent::runtime::Vms;
use kiln_agent::vmm::{VmmSettings, VmmVms};
use kiln_agent::{overlay_key, tasks};
use kiln_api::types::{HostCapacity, RegisterHost, VmmDriver};
use kiln_vmm::GuestAssets;
use kiln_vmm::firecracker::{FirecrackerConfig, FirecrackerDriver};
use kiln_vmm::qemu::{QemuConfig, QemuDriver};
use tokio::sync::watch;
use tracing::info;

/// Interval of the reconcile loop when nothing wakes it earlier.
const RECONCILE_TICK: Duration = Duration::from_millis(500);

/// Interval between log batches.
const LOG_SHIP_INTERVAL: Duration = Duration::from_secs(1);

/// Arguments of `kiln-agent run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// The agent's config file (TOML; see docs/agent.md).
    #[arg(long, default_value = "/etc/kiln/agent.toml")]
    config: PathBuf,
}

/// Runs the agent until SIGTERM or SIGINT. Running microVMs keep running after it exits.
pub(crate) async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,netlink_packet_route=error")
            }),
        )
        .with_writer(std::io::stderr)
        .init();

    let config = AgentConfig::load(&args.config)?;
    let token = std::fs::read_to_string(&config.host_token_file).with_context(|| {
        format!(
            "failed to read host token file {}",
            config.host_token_file.display()
        )
    })?;
    let token = token.trim();
    if token.is_empty() {
        bail!(
            "host token file {} is empty; write the token `POST /v1/hosts` returned into it",
            config.host_token_file.display()
        );
    }
    let client = kiln_api::Client::new(&config.control_url, token)?;
    let state = StateDir::new(&config.state_dir)?;

    let store =
        kiln_image::ImageStore::open(&config.state_dir.join("images"), config.images.clone())?;
    let images = StoreImages::new(store);
    let network = KilnNetwork::new(kiln_net::HostNetworkConfig {
        tap_prefix: kiln_net::TapPrefix::new(config.network.tap_prefix.clone())?,
        egress_interface: config.network.egress_interface.clone(),
        ..kiln_net::HostNetworkConfig::default()
    })?;

    let registration = RegisterHost {
        capacity: host_capacity(&config)?,
        driver: config.driver,
        overlay_public_key: overlay_key::load_or_generate(&config.state_dir.join("overlay.key"))?,
        overlay_endpoint: config.overlay_endpoint,
    };
    info!(
        control = %config.control_url,
        state_dir = %config.state_dir.display(),
        vcpus = registration.capacity.vcpus,
        memory_mib = registration.capacity.memory_mib,
        "agent starting"
    );

    let settings = VmmSettings {
        assets: GuestAssets::in_dir(&config.guest_assets_dir),
        boot_timeout: Duration::from_secs(config.boot_timeout_secs),
        console_limit_bytes: config.logs.max_file_bytes,
    };
    settings.assets.check()?;
    match config.driver {
        VmmDriver::Qemu => {
            let driver = QemuDriver::new(QemuConfig {
                allow_software_virtualization: config.allow_software_virtualization,
                ..QemuConfig::default()
            })?;
            let vms = VmmVms::new(driver, settings);
            serve(config, client, registration, state, images, network, vms).await
        }
        VmmDriver::Firecracker => {
            let binary = config
                .firecracker_binary
                .clone()
                .context("firecracker_binary is not set")?;
            let driver = FirecrackerDriver::new(FirecrackerConfig {
                binary,
                jailer: None,
            })?;
            let vms = VmmVms::new(driver, settings);
            serve(config, client, registration, state, images, network, vms).await
        }
    }
}

/// Runs the agent's tasks and loop with the chosen VMM driver.
async fn serve<V: Vms>(
    config: AgentConfig,
    client: kiln_api::Client,
    registration: RegisterHost,
    state: StateDir,
    images: StoreImages,
    network: KilnNetwork,
    vms: V,
) -> anyhow::Result<ExitCode> {
    let shared = Arc::new(Shared::default());
    let (mut agent, outbox) = Agent::new(
        client.clone(),
        images,
        vms,
        network,
        state,
        config.logs.clone(),
        Arc::clone(&shared),
    );
    let cursor = agent.readopt().await;
    let (assignments_tx, assignments_rx) = watch::channel(None);
    tokio::spawn(tasks::run_session(
        client.clone(),
        registration,
        config.heartbeat_interval(),
        Arc::clone(&shared),
    ));
    tokio::spawn(tasks::run_watcher(
        client.clone(),
        cursor,
        Arc::clone(&shared),
        assignments_tx,
    ));
    tokio::spawn(tasks::run_reporter(
        client.clone(),
        outbox,
        Arc::clone(&shared),
    ));
    tokio::spawn(tasks::run_log_shipper(
        client,
        Arc::clone(&shared),
        LOG_SHIP_INTERVAL,
    ));

    agent
        .run(assignments_rx, shutdown_signal(), RECONCILE_TICK)
        .await;
    Ok(ExitCode::SUCCESS)
}

/// Capacity offered to microVMs: the configured or available CPUs, and the host's memory
/// minus the reserve.
fn host_capacity(config: &AgentConfig) -> anyhow::Result<HostCapacity> {
    let vcpus = match config.vcpus {
        Some(vcpus) => vcpus,
        None => std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1),
    };
    let meminfo =
        std::fs::read_to_string("/proc/meminfo").context("failed to read /proc/meminfo")?;
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no MemTotal in /proc/meminfo")?;
    let total_mib = total_kib / 1024;
    let Some(memory_mib) = total_mib
        .checked_sub(config.memory_reserve_mib)
        .filter(|m| *m > 0)
    else {
        bail!(
            "memory_reserve_mib {} leaves no memory for microVMs on this host ({total_mib} MiB); lower it",
            config.memory_reserve_mib
        );
    };
    Ok(HostCapacity { vcpus, memory_mib })
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
