//! `kiln tokens`: API tokens of the org.

pub(crate) mod create;
pub(crate) mod list;
pub(crate) mod revoke;

use clap::Subcommand;

use crate::error::CliResult;
use crate::session::Session;

/// `kiln tokens` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create an API token; its secret is printed once
    Create(create::Args),
    /// List the org's tokens (never their secrets)
    List(list::Args),
    /// Revoke a token by id
    Revoke(revoke::Args),
}

/// Runs a `kiln tokens` subcommand.
pub(crate) async fn run(session: &mut Session, command: Command) -> CliResult {
    match command {
        Command::Create(args) => create::run(session, args).await,
        Command::List(args) => list::run(session, args).await,
        Command::Revoke(args) => revoke::run(session, args).await,
    }
}
