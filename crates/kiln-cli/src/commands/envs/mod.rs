//! `kiln envs`: environments of an app.

pub(crate) mod create;
pub(crate) mod destroy;
pub(crate) mod list;

use clap::Subcommand;

use crate::error::CliResult;
use crate::session::Session;

/// `kiln envs` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create an environment of the app
    Create(create::Args),
    /// List the app's environments
    List(list::Args),
    /// Destroy an environment and stop its instances
    Destroy(destroy::Args),
}

/// Runs a `kiln envs` subcommand.
pub(crate) async fn run(session: &mut Session, command: Command) -> CliResult {
    match command {
        Command::Create(args) => create::run(session, args).await,
        Command::List(args) => list::run(session, args).await,
        Command::Destroy(args) => destroy::run(session, args).await,
    }
}
