//! `kiln ips list`.

use kiln_api::{DedicatedIp, IpVersion, List, routes};

use crate::commands::EnvTarget;
use crate::error::CliResult;
use crate::output::Table;
use crate::session::Session;

/// Arguments of `kiln ips list`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  kiln ips list --env prod")]
pub(crate) struct Args {}

/// Lists the environment's dedicated addresses.
pub(crate) async fn run(session: &mut Session, _args: Args) -> CliResult {
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;

    let ips: List<DedicatedIp> = api.get(&target.route(routes::IPS)).await?;

    if session.out.is_json() {
        return session.out.json(&ips);
    }
    let mut table = Table::new(&["ADDRESS", "VERSION", "BILLED", "POOL"]);
    for ip in &ips.items {
        let version = match ip.version {
            IpVersion::Ipv4 => "ipv4",
            IpVersion::Ipv6 => "ipv6",
        };
        table.row([
            ip.address.to_string(),
            version.to_owned(),
            if ip.billed { "yes" } else { "no" }.to_owned(),
            ip.pool.clone().unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    session.out.table(&table)
}
