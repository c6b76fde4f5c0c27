//! The `kiln-agent` binary: the host daemon and its operator commands.
//!
//! Each subcommand lives in its own module under `commands/`.

mod commands;

use clap::Parser;

/// Kiln's host agent: runs microVMs for the control plane, plus operator tools.
#[derive(Debug, Parser)]
#[command(name = "kiln-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: commands::Command,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match Box::pin(commands::run(cli.command)).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
