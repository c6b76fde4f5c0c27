//! The `kiln-ingress` binary: parses flags, loads config and routes, runs the proxy, and
//! turns SIGHUP into a route reload and SIGTERM or SIGINT into a graceful drain.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kiln_ingress::{Ingress, IngressConfig, RouteSet, control};
use tokio::signal::unix::{SignalKind, signal};

/// L4 ingress: routes TLS connections by SNI to backends without terminating TLS.
#[derive(Debug, Parser)]
#[command(name = "kiln-ingress", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the ingress until SIGTERM or SIGINT.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Config file (TOML); flags below override its fields.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to accept TLS on, such as `[::]:443` or `0.0.0.0:443`; repeat for more.
    #[arg(long = "listen", value_name = "ADDR:PORT")]
    listen: Vec<SocketAddr>,
    /// Static route file (TOML `[[routes]]`), reloaded on SIGHUP.
    #[arg(long = "routes", value_name = "FILE", conflicts_with = "control_url")]
    routes: Option<PathBuf>,
    /// Base URL of kiln-control, such as `https://control.example.com`; the ingress follows
    /// its route watch instead of a route file.
    #[arg(long, value_name = "URL", requires = "token_file")]
    control_url: Option<String>,
    /// File containing the ingress token for `--control-url`.
    #[arg(long, value_name = "FILE", requires = "control_url")]
    token_file: Option<PathBuf>,
    /// Address of the Prometheus metrics endpoint, such as `127.0.0.1:9443`.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<SocketAddr>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => load_config(&args).and_then(|config| {
            let runtime = build_runtime(&config)?;
            runtime.block_on(run(args, config))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Merges defaults, the config file and flags, in that order of precedence.
fn load_config(args: &RunArgs) -> anyhow::Result<IngressConfig> {
    let mut config = match &args.config {
        Some(path) => IngressConfig::from_file(path)?,
        None => IngressConfig::default(),
    };
    config.listen.extend(&args.listen);
    if args.routes.is_some() {
        config.routes_file.clone_from(&args.routes);
    }
    if args.metrics_listen.is_some() {
        config.metrics_listen = args.metrics_listen;
    }
    config.validate()?;
    Ok(config)
}

/// Builds the multi-threaded runtime with the configured number of worker threads.
fn build_runtime(config: &IngressConfig) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = config.worker_threads {
        builder.worker_threads(threads);
    }
    builder.build().context("failed to start the async runtime")
}

async fn run(args: RunArgs, config: IngressConfig) -> anyhow::Result<()> {
    let mut hangup =
        signal(SignalKind::hangup()).context("failed to install the SIGHUP handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("failed to install the SIGTERM handler")?;
    let mut interrupt =
        signal(SignalKind::interrupt()).context("failed to install the SIGINT handler")?;

    if let (Some(url), Some(token_file)) = (&args.control_url, &args.token_file) {
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("failed to read the token file {}", token_file.display()))?;
        let client = kiln_api::Client::new(url, token.trim()).with_context(|| {
            format!("invalid control URL {url}: use http://HOST:PORT or https://HOST")
        })?;
        let initial = tokio::select! {
            initial = control::fetch_initial_routes(&client) => initial?,
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        };
        let ingress = Ingress::start(config, &control::route_set_from_table(&initial)).await?;
        tracing::info!(
            cursor = initial.cursor,
            "following routes from the control plane"
        );

        let result = tokio::select! {
            result = control::follow_routes(&client, &ingress, initial.cursor) => result,
            _ = terminate.recv() => Ok(()),
            _ = interrupt.recv() => Ok(()),
        };
        drain(ingress).await;
        return Ok(result?);
    }

    let routes_file = config.routes_file.clone().context(
        "no route source: pass --routes FILE, --control-url URL, or set routes_file in the config",
    )?;
    let routes = RouteSet::from_file(&routes_file)?;
    let ingress = Ingress::start(config, &routes).await?;
    if let Some(addr) = ingress.metrics_addr() {
        tracing::info!(%addr, "serving metrics");
    }

    loop {
        tokio::select! {
            _ = hangup.recv() => reload(&ingress, &routes_file),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    drain(ingress).await;
    Ok(())
}

async fn drain(ingress: Ingress) {
    let report = ingress.shutdown().await;
    if report.closed_at_deadline > 0 {
        tracing::warn!(
            closed = report.closed_at_deadline,
            "connections closed at the drain deadline"
        );
    }
}

/// Rereads the route file; on any error the old routes stay in place.
fn reload(ingress: &Ingress, path: &std::path::Path) {
    let routes = match RouteSet::from_file(path) {
        Ok(routes) => routes,
        Err(error) => {
            ingress.count_failed_reload();
            tracing::error!(%error, "route reload failed, keeping the old routes");
            return;
        }
    };
    if let Err(error) = ingress.apply_routes(&routes) {
        tracing::error!(%error, path = %path.display(), "route reload failed, keeping the old routes");
    }
}
