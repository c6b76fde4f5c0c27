//! `kiln apps destroy NAME`.

use kiln_api::routes;
use kiln_core::AppName;
use serde_json::json;

use crate::commands::route;
use crate::error::{CliError, CliResult};
use crate::session::Session;
use crate::terminal;

/// Arguments of `kiln apps destroy`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  kiln apps destroy web          # asks to type the name\n  kiln apps destroy web --yes    # in scripts"
)]
pub(crate) struct Args {
    /// The app to destroy; destroy its environments first
    name: String,

    /// Do not ask for confirmation (required when stdin is not a terminal)
    #[arg(long)]
    yes: bool,
}

/// Destroys the app after confirmation.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let name = AppName::new(args.name).map_err(|error| CliError::usage(error.to_string()))?;
    let org = session.org()?;
    let api = session.api()?;

    terminal::confirm_by_typing(
        &format!("destroy app {name} in org {org}"),
        name.as_str(),
        args.yes,
    )?;
    api.delete(&route(
        routes::APP,
        &[("org", org.as_str()), ("app", name.as_str())],
    ))
    .await
    .map_err(|error| {
        if error.kind() == crate::exit::ExitKind::Conflict {
            error.with_hint(format!(
                "destroy its environments first: kiln envs list --app {name}"
            ))
        } else {
            error
        }
    })?;

    if session.out.is_json() {
        return session.out.json(&json!({ "app": name, "destroyed": true }));
    }
    session.out.line(&format!("Destroyed app {name}"))
}
