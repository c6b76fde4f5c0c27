//! `kiln ips release ADDRESS`.

use std::net::IpAddr;

use kiln_api::routes;
use serde_json::json;

use crate::commands::EnvTarget;
use crate::error::{CliError, CliResult};
use crate::session::Session;
use crate::terminal;

/// Arguments of `kiln ips release`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  kiln ips release 203.0.113.7 --env prod\n  kiln ips release 203.0.113.7 --env prod --yes"
)]
pub(crate) struct Args {
    /// The dedicated IPv4 address to release, such as 203.0.113.7
    address: String,

    /// Do not ask for confirmation (required when stdin is not a terminal)
    #[arg(long)]
    yes: bool,
}

/// Releases the address after confirmation.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let address: IpAddr = args.address.parse().map_err(|_| {
        CliError::usage(format!("invalid IP address {:?}", args.address)).with_hint(
            "give a dedicated IPv4 address as `kiln ips list` shows it, such as 203.0.113.7",
        )
    })?;
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;

    terminal::confirm_by_typing(
        &format!(
            "release {address} from {}; clients using it lose their connections and the address may go to another org",
            target.label()
        ),
        &address.to_string(),
        args.yes,
    )?;
    let address_text = address.to_string();
    api.delete(&target.route_with(routes::IP, &[("address", address_text.as_str())]))
        .await?;

    if session.out.is_json() {
        return session
            .out
            .json(&json!({ "address": address, "released": true }));
    }
    session
        .out
        .line(&format!("Released {address} from {}", target.label()))
}
