//! `kiln-agent vm ...`.

use std::process::ExitCode;

/// `kiln-agent vm` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum VmCommand {
    /// Placeholder until the vm commands land.
    Placeholder,
}

/// Runs a `kiln-agent vm` subcommand.
pub(crate) async fn run(command: VmCommand) -> anyhow::Result<ExitCode> {
    match command {
        VmCommand::Placeholder => anyhow::bail!("kiln-agent vm is not built yet"),
    }
}
