//! `kiln-control serve`: the HTTP API plus the leader's singleton work.

use std::sync::Arc;

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::routing::get;
use tokio::sync::watch;

use crate::api::{self, ApiLimits, AppState};
use crate::config::Config;
use crate::leader::{self, Leadership};
use crate::secrets::Keyring;
use crate::store::Store;
use crate::store::watch::Notifier;

/// Path of the health endpoint (outside `/v1`, unauthenticated, no tenant data).
pub const HEALTH_PATH: &str = "/healthz";

/// Runs the server until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let url = config
        .database_url
        .clone()
        .context("database URL missing")?;
    let key_file = config
        .master_key_file
        .clone()
        .context("master key file missing")?;

    let keyring = Keyring::load(&key_file)?;
    let store = Store::connect(&url, config.database_max_connections).await?;
    store
        .migrate()
        .await
        .context("failed to apply database migrations")?;
    let settings = crate::bootstrap::load_settings(&store)
        .await?
        .context("the cluster is not bootstrapped; run `kiln-control bootstrap` first")?;
    api::ips::configure_pool(store.pool(), &config.dedicated_ipv4_pool)
        .await
        .context("failed to store the dedicated IPv4 pool")?;
    let notifier = Notifier::start(&store).await?;

    let interval = std::time::Duration::from_secs(config.leader_interval_secs);
    let leadership = leader::spawn_elector(url, interval);
    tokio::spawn(leader::run_singleton_work(
        store.clone(),
        leadership.clone(),
        notifier.subscribe(),
        interval,
        std::time::Duration::from_secs(config.route_drain_deadline_secs),
    ));

    let state = AppState {
        store,
        keyring: Arc::new(keyring),
        notifier,
        settings: Arc::new(settings),
        limits: Arc::new(ApiLimits {
            host_lease: config.host_lease(),
            log_window_lines: config.log_window_lines,
        }),
        release_specs: Arc::default(),
    };
    let app = api::router(state).merge(
        axum::Router::new()
            .route(HEALTH_PATH, get(health))
            .with_state(leadership),
    );

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("failed to listen on {}", config.listen))?;
    let address = listener
        .local_addr()
        .context("failed to read the bound address")?;
    tracing::info!(%address, "listening");
    println!("listening on {address}");

    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("server failed")?;
    tracing::info!("stopped");
    Ok(())
}

async fn health(State(leadership): State<watch::Receiver<Leadership>>) -> Json<serde_json::Value> {
    let state = *leadership.borrow();
    let (leader, term) = match state {
        Leadership::Leader { term } => (true, term),
        Leadership::Follower => (false, 0),
    };
    Json(serde_json::json!({ "status": "ok", "leader": leader, "term": term }))
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "failed to install the SIGTERM handler");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = interrupt => {}
        () = terminate => {}
    }
}
