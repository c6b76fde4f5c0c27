//! `kiln hosts`: the fleet, for operators (these calls need an operator token).

pub(crate) mod cordon;
pub(crate) mod drain;
pub(crate) mod list;
pub(crate) mod uncordon;

use clap::Subcommand;
use kiln_api::{Host, HostState};

use crate::error::CliResult;
use crate::output::Style;
use crate::session::Session;

/// `kiln hosts` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// List hosts with their state, capacity and lease
    List(list::Args),
    /// Stop placing new instances on a host; running ones stay
    Cordon(cordon::Args),
    /// Place instances on a cordoned host again
    Uncordon(uncordon::Args),
    /// Cordon a host and move its instances to other hosts
    Drain(drain::Args),
}

/// Runs a `kiln hosts` subcommand.
pub(crate) async fn run(session: &mut Session, command: Command) -> CliResult {
    match command {
        Command::List(args) => list::run(session, args).await,
        Command::Cordon(args) => cordon::run(session, args).await,
        Command::Uncordon(args) => uncordon::run(session, args).await,
        Command::Drain(args) => drain::run(session, args).await,
    }
}

/// The state as a word and its style.
pub(crate) fn state_cell(state: HostState) -> (String, Style) {
    let (word, style) = match state {
        HostState::Pending => ("pending", Style::Warn),
        HostState::Ready => ("ready", Style::Good),
        HostState::Cordoned => ("cordoned", Style::Warn),
        HostState::Draining => ("draining", Style::Warn),
        HostState::Lost => ("lost", Style::Bad),
    };
    (word.to_owned(), style)
}

/// Prints the host after a state change.
pub(crate) fn print_changed(session: &Session, verb: &str, host: &Host) -> CliResult {
    if session.out.is_json() {
        return session.out.json(host);
    }
    let (state, style) = state_cell(host.state);
    session.out.line(&format!(
        "{verb} host {} (state {})",
        host.name,
        session.out.paint(style, &state)
    ))
}
