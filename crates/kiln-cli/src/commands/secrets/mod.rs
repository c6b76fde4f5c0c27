//! `kiln secrets`: secret values of an environment. Values go to the API and never come back:
//! every command prints names, versions and digests only.

pub(crate) mod list;
pub(crate) mod set;
pub(crate) mod unset;

use clap::Subcommand;

use crate::error::CliResult;
use crate::session::Session;

/// `kiln secrets` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Set a secret from NAME=VALUE, a file, or stdin
    Set(set::Args),
    /// List secret names, versions and digests (never values)
    List(list::Args),
    /// Remove a secret
    Unset(unset::Args),
}

/// Runs a `kiln secrets` subcommand.
pub(crate) async fn run(session: &mut Session, command: Command) -> CliResult {
    match command {
        Command::Set(args) => set::run(session, args).await,
        Command::List(args) => list::run(session, args).await,
        Command::Unset(args) => unset::run(session, args).await,
    }
}
