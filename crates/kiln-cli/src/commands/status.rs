//! `kiln status`: an environment's current release, its instances and its routes.

use kiln_api::{Env, Instance, InstanceState, List, Release, Route, RouteMatch, routes};
use serde::Serialize;

use crate::commands::{EnvTarget, format_time};
use crate::error::CliResult;
use crate::output::{Style, Table};
use crate::session::Session;

/// Arguments of `kiln status`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  kiln status --env prod\n  kiln status --env prod --json | jq '.instances[].state'"
)]
pub(crate) struct Args {}

/// `--json` output: the environment, its current release, instances and routes.
#[derive(Debug, Serialize)]
struct Status {
    env: Env,
    release: Option<Release>,
    instances: Vec<Instance>,
    routes: Vec<Route>,
}

/// Prints the environment's state.
pub(crate) async fn run(session: &mut Session, _args: Args) -> CliResult {
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;

    let env: Env = api.get(&target.route(routes::ENV)).await?;
    let releases: List<Release> = api.get(&target.route(routes::RELEASES)).await?;
    let instances: List<Instance> = api.get(&target.route(routes::INSTANCES)).await?;
    let env_routes: List<Route> = api.get(&target.route(routes::ENV_ROUTES)).await?;
    let release = releases
        .items
        .into_iter()
        .find(|r| Some(r.id) == env.current_release_id);
    let status = Status {
        env,
        release,
        instances: instances.items,
        routes: env_routes.items,
    };

    if session.out.is_json() {
        return session.out.json(&status);
    }
    print_human(session, &target, &status)
}

fn print_human(session: &Session, target: &EnvTarget, status: &Status) -> CliResult {
    let out = &session.out;
    let release = match &status.release {
        Some(release) => format!(
            "v{} {} ({}), created {}",
            release.version,
            release.image.reference,
            release.image.digest,
            format_time(release.created_at)
        ),
        None => "none (never deployed)".to_owned(),
    };
    out.line(&format!(
        "Environment {}\nHostname:  {}\nAddress:   {}\nRelease:   {release}\n",
        target.label(),
        status.env.hostname,
        status.env.ipv6_address
    ))?;

    if status.instances.is_empty() {
        out.line("No instances.")?;
    } else {
        let mut table = Table::new(&["INSTANCE", "PROCESS", "STATE", "HOST", "ADDRESS", "DETAIL"]);
        for instance in &status.instances {
            table.styled_row(vec![
                (instance.id.to_string(), Style::Plain),
                (instance.process.to_string(), Style::Plain),
                instance_state_cell(instance.state),
                (instance.host_id.to_string(), Style::Dim),
                (instance.ipv6.to_string(), Style::Plain),
                (instance.detail.clone().unwrap_or_default(), Style::Plain),
            ]);
        }
        out.table(&table)?;
    }

    if !status.routes.is_empty() {
        out.line("")?;
        let mut table = Table::new(&["SERVICE", "MATCH", "BACKENDS"]);
        for route in &status.routes {
            let matcher = match &route.matcher {
                RouteMatch::Sni { hostname } => format!("tls {hostname}"),
                RouteMatch::Tcp { address, port } => format!("tcp [{address}]:{port}"),
            };
            table.row([
                route.service.clone(),
                matcher,
                route.backends.len().to_string(),
            ]);
        }
        out.table(&table)?;
    }
    Ok(())
}

/// The instance state as a word and its style.
pub(crate) fn instance_state_cell(state: InstanceState) -> (String, Style) {
    let (word, style) = match state {
        InstanceState::Pending => ("pending", Style::Warn),
        InstanceState::Preparing => ("preparing", Style::Warn),
        InstanceState::Booting => ("booting", Style::Warn),
        InstanceState::Running => ("running", Style::Warn),
        InstanceState::Healthy => ("healthy", Style::Good),
        InstanceState::Unhealthy => ("unhealthy", Style::Bad),
        InstanceState::Stopping => ("stopping", Style::Dim),
        InstanceState::Exited => ("exited", Style::Dim),
        InstanceState::Failed => ("failed", Style::Bad),
    };
    (word.to_owned(), style)
}
