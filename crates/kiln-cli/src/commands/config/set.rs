//! `kiln config set NAME=VALUE...`.

use kiln_api::{ConfigVars, UpdateConfig, routes};

use super::check_var_name;
use crate::commands::EnvTarget;
use crate::error::{CliError, CliResult};
use crate::session::Session;

/// Arguments of `kiln config set`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  kiln config set LOG_LEVEL=debug PORT=8080 --env prod")]
pub(crate) struct Args {
    /// Variables as NAME=VALUE
    #[arg(required = true, value_name = "NAME=VALUE")]
    vars: Vec<String>,
}

/// Sets the variables in one change (one new config version).
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let mut update = UpdateConfig::default();
    for pair in &args.vars {
        let Some((name, value)) = pair.split_once('=') else {
            return Err(
                CliError::usage(format!("invalid variable {pair:?}: expected NAME=VALUE"))
                    .with_hint("write it as NAME=VALUE, for example LOG_LEVEL=debug"),
            );
        };
        check_var_name("variable", name)?;
        update.set.insert(name.to_owned(), value.to_owned());
    }
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;

    let config: ConfigVars = api.patch(&target.route(routes::CONFIG), &update).await?;

    if session.out.is_json() {
        return session.out.json(&config);
    }
    let names: Vec<&str> = update.set.keys().map(String::as_str).collect();
    session.out.line(&format!(
        "Set {} on {} (config version {})",
        names.join(", "),
        target.label(),
        config.version
    ))?;
    session
        .out
        .note("Running instances keep their config until the next deploy: kiln deploy");
    Ok(())
}
