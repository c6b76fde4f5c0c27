//! `kiln config list`.

use kiln_api::{ConfigVars, routes};

use crate::commands::EnvTarget;
use crate::error::CliResult;
use crate::output::Table;
use crate::session::Session;

/// Arguments of `kiln config list`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  kiln config list --env prod\n  kiln config list --env prod --json"
)]
pub(crate) struct Args {}

/// Lists the variables.
pub(crate) async fn run(session: &mut Session, _args: Args) -> CliResult {
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;

    let config: ConfigVars = api.get(&target.route(routes::CONFIG)).await?;

    if session.out.is_json() {
        return session.out.json(&config);
    }
    if config.vars.is_empty() {
        return session
            .out
            .line(&format!("No config variables on {}.", target.label()));
    }
    let mut table = Table::new(&["NAME", "VALUE"]);
    for (name, value) in &config.vars {
        table.row([name.clone(), value.clone()]);
    }
    session.out.table(&table)?;
    session
        .out
        .note(&format!("config version {}", config.version));
    Ok(())
}
