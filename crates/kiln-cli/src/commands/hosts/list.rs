//! `kiln hosts list`.

use kiln_api::{Host, List, routes};

use super::state_cell;
use crate::commands::format_time;
use crate::error::CliResult;
use crate::output::{Style, Table};
use crate::session::Session;

/// Arguments of `kiln hosts list`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  kiln hosts list\n  kiln hosts list --json")]
pub(crate) struct Args {}

/// Lists the hosts.
pub(crate) async fn run(session: &mut Session, _args: Args) -> CliResult {
    let api = session.api()?;

    let hosts: List<Host> = api.get(routes::HOSTS).await?;

    if session.out.is_json() {
        return session.out.json(&hosts);
    }
    if hosts.items.is_empty() {
        return session.out.line("No hosts.");
    }
    let mut table = Table::new(&[
        "NAME",
        "STATE",
        "VCPUS",
        "MEMORY",
        "PREFIX",
        "LEASE EXPIRES",
    ]);
    for host in &hosts.items {
        let dash = || "-".to_owned();
        table.styled_row(vec![
            (host.name.clone(), Style::Plain),
            state_cell(host.state),
            (
                host.capacity.map_or_else(dash, |c| c.vcpus.to_string()),
                Style::Plain,
            ),
            (
                host.capacity
                    .map_or_else(dash, |c| format!("{} MiB", c.memory_mib)),
                Style::Plain,
            ),
            (host.ipv6_prefix.clone().unwrap_or_else(dash), Style::Plain),
            (
                host.lease_expires_at.map_or_else(dash, format_time),
                Style::Plain,
            ),
        ]);
    }
    session.out.table(&table)
}
