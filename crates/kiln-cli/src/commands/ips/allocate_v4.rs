//! `kiln ips allocate-v4`.

use kiln_api::{AllocateIp, DedicatedIp, IpVersion, routes};

use crate::commands::EnvTarget;
use crate::error::CliResult;
use crate::session::Session;

/// Arguments of `kiln ips allocate-v4`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  kiln ips allocate-v4 --env prod")]
pub(crate) struct Args {}

/// Allocates a dedicated IPv4 address from the cluster's pool.
pub(crate) async fn run(session: &mut Session, _args: Args) -> CliResult {
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;

    let request = AllocateIp {
        version: IpVersion::Ipv4,
    };
    let allocated: DedicatedIp = api.post(&target.route(routes::IPS), &request).await?;

    if session.out.is_json() {
        return session.out.json(&allocated);
    }
    session.out.line(&format!(
        "Allocated {} to {}; it is billed until `kiln ips release {}`",
        allocated.address,
        target.label(),
        allocated.address
    ))
}
