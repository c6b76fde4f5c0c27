//! Subcommands of `kiln-agent`, one module each.

use std::process::ExitCode;

/// A `kiln-agent` subcommand.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// Work with OCI images: pull, unpack, build root filesystems, inspect, collect garbage.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Boot one microVM outside the control plane.
    #[command(subcommand)]
    Vm(vm::VmCommand),
}

mod image;
mod vm;

/// Runs one subcommand and returns the process exit code.
pub(crate) async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Image(command) => image::run(command).await,
        Command::Vm(command) => vm::run(command).await,
    }
}
