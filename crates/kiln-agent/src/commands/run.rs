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
use kiln_agent::runtime::{ListeningSocket, RuntimeError, VmHandle, VmSpec, VmStatus, Vms};
use kiln_agent::{overlay_key, tasks};
use kiln_api::types::{HostCapacity, RegisterHost};
use kiln_core::InstanceId;
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
    let vms = NoDriver {
        driver: config.driver,
    };

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

/// The driver slot until kiln-vmm's drivers are wired in: every VM operation fails with a
/// clear error, so assignments end up `failed` with that reason instead of hanging.
// TODO(correctness): replace with kiln-vmm's Firecracker and QEMU drivers.
struct NoDriver {
    driver: kiln_api::types::VmmDriver,
}

#[derive(Debug, thiserror::Error)]
#[error("the {driver:?} VMM driver is not built into this kiln-agent")]
struct DriverMissing {
    driver: kiln_api::types::VmmDriver,
}

impl NoDriver {
    fn missing(&self) -> RuntimeError {
        Box::new(DriverMissing {
            driver: self.driver,
        })
    }
}

impl Vms for NoDriver {
    async fn boot(&self, _spec: VmSpec) -> Result<VmHandle, RuntimeError> {
        Err(self.missing())
    }

    async fn adopt(
        &self,
        _instance: InstanceId,
        _run_dir: &std::path::Path,
        _logs: kiln_agent::logs::LogSink,
    ) -> Result<Option<VmHandle>, RuntimeError> {
        Ok(None)
    }

    async fn status(&self, _handle: &VmHandle) -> Result<VmStatus, RuntimeError> {
        Err(self.missing())
    }

    async fn stop(&self, _handle: &VmHandle, _signal: &str) -> Result<(), RuntimeError> {
        Err(self.missing())
    }

    async fn kill(&self, _handle: &VmHandle) -> Result<(), RuntimeError> {
        Err(self.missing())
    }

    async fn listening_sockets(
        &self,
        _handle: &VmHandle,
    ) -> Result<Vec<ListeningSocket>, RuntimeError> {
        Err(self.missing())
    }
}
