//! `kiln`, the command-line interface: the product's primary surface.
//!
//! The binary is thin: parse the command line ([`cli`]), load the config and resolve the
//! target ([`session`]), run one command ([`commands`]), and turn its result into an exit
//! code ([`exit`]) after printing any error once ([`error`]).

mod cli;
mod commands;
mod config;
mod error;
mod exit;
mod http;
mod output;
mod redact;
mod registry;
mod session;
mod terminal;

use std::process::ExitCode;

use clap::FromArgMatches;

use crate::cli::Cli;
use crate::error::CliError;
use crate::exit::ExitKind;
use crate::session::Session;

fn main() -> ExitCode {
    let parsed = cli::command()
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(error) => {
            // `--help` and `--version` arrive here too, and are not failures.
            let kind = if error.use_stderr() {
                ExitKind::Usage
            } else {
                ExitKind::Success
            };
            let _ = error.print();
            return kind.into();
        }
    };

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!(
                "{}",
                CliError::failure("cannot start the async runtime").with_source(error)
            );
            return ExitKind::Failure.into();
        }
    };

    match runtime.block_on(run(cli)) {
        Ok(()) => ExitKind::Success.into(),
        Err(error) => {
            eprintln!("{error}");
            error.kind().into()
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let mut session = Session::new(cli.global)?;
    commands::run(&mut session, cli.command).await
}
