//! `kiln-agent image ...`.

use std::process::ExitCode;

/// `kiln-agent image` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ImageCommand {
    /// Placeholder until the image commands land.
    Placeholder,
}

/// Runs a `kiln-agent image` subcommand.
pub(crate) async fn run(command: ImageCommand) -> anyhow::Result<ExitCode> {
    match command {
        ImageCommand::Placeholder => anyhow::bail!("kiln-agent image is not built yet"),
    }
}
