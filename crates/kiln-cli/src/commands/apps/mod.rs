//! `kiln apps`: apps of the org.

pub(crate) mod create;
pub(crate) mod destroy;
pub(crate) mod list;
pub(crate) mod show;

use clap::Subcommand;

use crate::error::CliResult;
use crate::session::Session;

/// `kiln apps` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create an app in the org
    Create(create::Args),
    /// List the org's apps
    List(list::Args),
    /// Show one app and its environments
    Show(show::Args),
    /// Destroy an app that has no environments left
    Destroy(destroy::Args),
}

/// Runs a `kiln apps` subcommand.
pub(crate) async fn run(session: &mut Session, command: Command) -> CliResult {
    match command {
        Command::Create(args) => create::run(session, args).await,
        Command::List(args) => list::run(session, args).await,
        Command::Show(args) => show::run(session, args).await,
        Command::Destroy(args) => destroy::run(session, args).await,
    }
}
