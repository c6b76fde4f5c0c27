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
    /// Run the host daemon: register, watch assignments, run and supervise microVMs.
    Run(run::RunArgs),
    /// List this host's instances with state, addresses and uptime.
    Status(status::StatusArgs),
}

mod image;
mod run;
mod status;
mod vm;

/// Runs one subcommand and returns the process exit code.
pub(crate) async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Image(command) => image::run(command).await,
        Command::Vm(command) => vm::run(command).await,
        Command::Run(args) => run::run(args).await,
        Command::Status(args) => status::run(args).await,
    }
}
