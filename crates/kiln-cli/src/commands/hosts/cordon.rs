//! `kiln hosts cordon HOST`.

use kiln_api::{Host, routes};

use super::print_changed;
use crate::commands::route;
use crate::error::CliResult;
use crate::session::Session;

/// Arguments of `kiln hosts cordon`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  kiln hosts cordon host-3")]
pub(crate) struct Args {
    /// Name of the host, as `kiln hosts list` shows it
    host: String,
}

/// Stops placing new instances on the host.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let api = session.api()?;

    let host: Host = api
        .post_empty(&route(routes::HOST_CORDON, &[("host", args.host.as_str())]))
        .await?;

    print_changed(session, "Cordoned", &host)
}
