//! `kiln envs destroy NAME`.

use kiln_api::routes;
use kiln_core::EnvName;
use serde_json::json;

use crate::commands::route;
use crate::error::{CliError, CliResult};
use crate::session::Session;
use crate::terminal;

/// Arguments of `kiln envs destroy`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  kiln envs destroy staging\n  kiln envs destroy staging --app web --yes"
)]
pub(crate) struct Args {
    /// The environment to destroy; its instances are stopped and its addresses freed
    name: String,

    /// Do not ask for confirmation (required when stdin is not a terminal)
    #[arg(long)]
    yes: bool,
}

/// Destroys the environment after confirmation.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let name = EnvName::new(args.name).map_err(|error| CliError::usage(error.to_string()))?;
    let org = session.org()?;
    let app = session.app()?;
    let api = session.api()?;

    terminal::confirm_by_typing(
        &format!("destroy environment {app}/{name} and stop its instances"),
        name.as_str(),
        args.yes,
    )?;
    api.delete(&route(
        routes::ENV,
        &[
            ("org", org.as_str()),
            ("app", app.as_str()),
            ("env", name.as_str()),
        ],
    ))
    .await?;

    if session.out.is_json() {
        return session
            .out
            .json(&json!({ "app": app, "env": name, "destroyed": true }));
    }
    session
        .out
        .line(&format!("Destroyed environment {app}/{name}"))
}
