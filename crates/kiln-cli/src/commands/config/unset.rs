//! `kiln config unset NAME...`.

use kiln_api::{ConfigVars, UpdateConfig, routes};

use super::check_var_name;
use crate::commands::EnvTarget;
use crate::error::{CliError, CliResult};
use crate::exit::ExitKind;
use crate::session::Session;

/// Arguments of `kiln config unset`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  kiln config unset LOG_LEVEL --env prod")]
pub(crate) struct Args {
    /// Names of the variables to remove
    #[arg(required = true, value_name = "NAME")]
    names: Vec<String>,
}

/// Removes the variables in one change.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    for name in &args.names {
        check_var_name("variable", name)?;
    }
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;

    // Removing a variable that does not exist is almost always a typo, and would still bump
    // the config version on the server.
    let current: ConfigVars = api.get(&target.route(routes::CONFIG)).await?;
    let missing: Vec<&str> = args
        .names
        .iter()
        .filter(|name| !current.vars.contains_key(*name))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        let noun = if missing.len() == 1 {
            "variable"
        } else {
            "variables"
        };
        return Err(CliError::new(
            ExitKind::NotFound,
            format!(
                "config {noun} {} not found on {}",
                missing.join(", "),
                target.label()
            ),
        )
        .with_hint(format!(
            "see the variables with: kiln config list --env {}",
            target.env
        )));
    }

    let update = UpdateConfig {
        unset: args.names.clone(),
        ..UpdateConfig::default()
    };

    let config: ConfigVars = api.patch(&target.route(routes::CONFIG), &update).await?;

    if session.out.is_json() {
        return session.out.json(&config);
    }
    session.out.line(&format!(
        "Unset {} on {} (config version {})",
        args.names.join(", "),
        target.label(),
        config.version
    ))
}
