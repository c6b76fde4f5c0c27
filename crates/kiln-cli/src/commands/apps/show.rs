//! `kiln apps show [NAME]`.

use kiln_api::{App, Env, List, routes};
use kiln_core::AppName;
use serde::Serialize;

use crate::commands::{format_time, route};
use crate::error::{CliError, CliResult};
use crate::output::Table;
use crate::session::Session;

/// Arguments of `kiln apps show`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  kiln apps show web\n  kiln apps show          # the app named in ./kiln.toml"
)]
pub(crate) struct Args {
    /// The app [default: --app, KILN_APP or `app` in ./kiln.toml]
    name: Option<String>,
}

/// `--json` output: the app and its environments.
#[derive(Debug, Serialize)]
struct AppDetail {
    app: App,
    envs: Vec<Env>,
}

/// Shows the app and its environments.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let name = match args.name {
        Some(name) => AppName::new(name).map_err(|error| CliError::usage(error.to_string()))?,
        None => session.app()?,
    };
    let org = session.org()?;
    let api = session.api()?;
    let params = [("org", org.as_str()), ("app", name.as_str())];

    let app: App = api.get(&route(routes::APP, &params)).await?;
    let envs: List<Env> = api.get(&route(routes::ENVS, &params)).await?;

    if session.out.is_json() {
        return session.out.json(&AppDetail {
            app,
            envs: envs.items,
        });
    }
    session.out.line(&format!(
        "App {} ({})\nCreated {}\n",
        app.name,
        app.id,
        format_time(app.created_at)
    ))?;
    if envs.items.is_empty() {
        session.out.line("No environments.")?;
        session.out.note(&format!(
            "Create one with: kiln envs create prod --app {}",
            app.name
        ));
        return Ok(());
    }
    let mut table = Table::new(&["ENV", "HOSTNAME", "RELEASE"]);
    for env in &envs.items {
        table.row([
            env.name.to_string(),
            env.hostname.to_string(),
            env.current_release_id
                .map_or_else(|| "-".to_owned(), |id| id.to_string()),
        ]);
    }
    session.out.table(&table)
}
