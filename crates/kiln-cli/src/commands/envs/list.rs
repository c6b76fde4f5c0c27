//! `kiln envs list`.

use kiln_api::{Env, List, routes};

use crate::commands::{format_time, route};
use crate::error::CliResult;
use crate::output::Table;
use crate::session::Session;

/// Arguments of `kiln envs list`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  kiln envs list\n  kiln envs list --app web --json")]
pub(crate) struct Args {}

/// Lists the app's environments.
pub(crate) async fn run(session: &mut Session, _args: Args) -> CliResult {
    let org = session.org()?;
    let app = session.app()?;
    let api = session.api()?;

    let envs: List<Env> = api
        .get(&route(
            routes::ENVS,
            &[("org", org.as_str()), ("app", app.as_str())],
        ))
        .await?;

    if session.out.is_json() {
        return session.out.json(&envs);
    }
    if envs.items.is_empty() {
        session
            .out
            .line(&format!("No environments in app {app}."))?;
        session.out.note(&format!(
            "Create one with: kiln envs create prod --app {app}"
        ));
        return Ok(());
    }
    let mut table = Table::new(&["NAME", "HOSTNAME", "ADDRESS", "CREATED"]);
    for env in &envs.items {
        table.row([
            env.name.to_string(),
            env.hostname.to_string(),
            env.ipv6_address.to_string(),
            format_time(env.created_at),
        ]);
    }
    session.out.table(&table)
}
