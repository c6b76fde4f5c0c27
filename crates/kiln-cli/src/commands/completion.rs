//! `kiln completion SHELL`: print a completion script generated from the command grammar.

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;
use crate::error::CliResult;

/// Arguments of `kiln completion`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  kiln completion bash > ~/.local/share/bash-completion/completions/kiln
  kiln completion zsh > \"${fpath[1]}/_kiln\"
  kiln completion fish > ~/.config/fish/completions/kiln.fish")]
pub(crate) struct Args {
    /// The shell to generate for
    #[arg(value_enum)]
    shell: CompletionShell,
}

/// Shells with completion support.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// Writes the script to stdout.
pub(crate) fn run(args: Args) -> CliResult {
    let shell = match args.shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "kiln", &mut std::io::stdout());
    Ok(())
}
