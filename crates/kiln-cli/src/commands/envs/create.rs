//! `kiln envs create NAME`.

use kiln_api::{CreateEnv, Env, routes};
use kiln_core::EnvName;

use crate::commands::route;
use crate::error::{CliError, CliResult};
use crate::session::Session;

/// Arguments of `kiln envs create`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  kiln envs create prod\n  kiln envs create staging --app web")]
pub(crate) struct Args {
    /// Name of the new environment, such as prod or staging
    name: String,
}

/// Creates the environment and prints it.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let name = EnvName::new(args.name).map_err(|error| CliError::usage(error.to_string()))?;
    let org = session.org()?;
    let app = session.app()?;
    let api = session.api()?;

    let env: Env = api
        .post(
            &route(
                routes::ENVS,
                &[("org", org.as_str()), ("app", app.as_str())],
            ),
            &CreateEnv { name: name.clone() },
        )
        .await?;

    if session.out.is_json() {
        return session.out.json(&env);
    }
    session.out.line(&format!(
        "Created environment {app}/{} ({})\nHostname: {}\nAddress:  {}",
        env.name, env.id, env.hostname, env.ipv6_address
    ))?;
    session
        .out
        .note(&format!("Next: kiln deploy --app {app} --env {}", env.name));
    Ok(())
}
