//! `kiln apps create NAME`.

use kiln_api::{App, CreateApp, routes};
use kiln_core::AppName;

use crate::commands::route;
use crate::error::{CliError, CliResult};
use crate::session::Session;

/// Arguments of `kiln apps create`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  kiln apps create web\n  kiln apps create web --org acme --json"
)]
pub(crate) struct Args {
    /// Name of the new app: 1 to 63 of a-z, 0-9 and '-', starting with a letter
    name: String,
}

/// Creates the app and prints it.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let name = AppName::new(args.name).map_err(|error| {
        CliError::usage(error.to_string()).with_hint("choose another name for the app")
    })?;
    let org = session.org()?;
    let api = session.api()?;

    let app: App = api
        .post(
            &route(routes::APPS, &[("org", org.as_str())]),
            &CreateApp { name: name.clone() },
        )
        .await?;

    if session.out.is_json() {
        return session.out.json(&app);
    }
    session.out.line(&format!(
        "Created app {} in org {org} ({})",
        app.name, app.id
    ))?;
    session
        .out
        .note(&format!("Next: kiln envs create prod --app {}", app.name));
    Ok(())
}
