//! `kiln apps list`.

use kiln_api::{App, List, routes};

use crate::commands::{format_time, route};
use crate::error::CliResult;
use crate::output::Table;
use crate::session::Session;

/// Arguments of `kiln apps list`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  kiln apps list\n  kiln apps list --json | jq '.items[].name'")]
pub(crate) struct Args {}

/// Lists the org's apps.
pub(crate) async fn run(session: &mut Session, _args: Args) -> CliResult {
    let org = session.org()?;
    let api = session.api()?;

    let apps: List<App> = api
        .get(&route(routes::APPS, &[("org", org.as_str())]))
        .await?;

    if session.out.is_json() {
        return session.out.json(&apps);
    }
    if apps.items.is_empty() {
        session.out.line(&format!("No apps in org {org}."))?;
        session.out.note("Create one with: kiln apps create NAME");
        return Ok(());
    }
    let mut table = Table::new(&["NAME", "ID", "CREATED"]);
    for app in &apps.items {
        table.row([
            app.name.to_string(),
            app.id.to_string(),
            format_time(app.created_at),
        ]);
    }
    session.out.table(&table)
}
