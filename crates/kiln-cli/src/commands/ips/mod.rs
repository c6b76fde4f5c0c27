//! `kiln ips`: dedicated IP addresses of an environment, on which its `tcp` services are
//! served. The dedicated IPv6 address is free; each dedicated IPv4 address is billed from
//! its allocation until its release.

pub(crate) mod allocate_v4;
pub(crate) mod list;
pub(crate) mod release;

use clap::Subcommand;

use crate::error::CliResult;
use crate::session::Session;

/// `kiln ips` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Allocate a dedicated IPv4 address (billed until released)
    #[command(name = "allocate-v4")]
    AllocateV4(allocate_v4::Args),
    /// List the dedicated IPv6 and IPv4 addresses
    List(list::Args),
    /// Release a dedicated IPv4 address (billing stops)
    Release(release::Args),
}

/// Runs a `kiln ips` subcommand.
pub(crate) async fn run(session: &mut Session, command: Command) -> CliResult {
    match command {
        Command::AllocateV4(args) => allocate_v4::run(session, args).await,
        Command::List(args) => list::run(session, args).await,
        Command::Release(args) => release::run(session, args).await,
    }
}
