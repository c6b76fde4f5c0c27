//! `kiln config`: plain (non-secret) environment variables of an environment.

pub(crate) mod list;
pub(crate) mod set;
pub(crate) mod unset;

use clap::Subcommand;

use crate::error::{CliError, CliResult};
use crate::session::Session;

/// `kiln config` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Set one or more variables (NAME=VALUE); values are visible, use `kiln secrets` for secrets
    Set(set::Args),
    /// Remove one or more variables
    Unset(unset::Args),
    /// List the variables and the config version
    List(list::Args),
}

/// Runs a `kiln config` subcommand.
pub(crate) async fn run(session: &mut Session, command: Command) -> CliResult {
    match command {
        Command::Set(args) => set::run(session, args).await,
        Command::Unset(args) => unset::run(session, args).await,
        Command::List(args) => list::run(session, args).await,
    }
}

/// Checks a variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most 255 bytes, as the API requires.
pub(crate) fn check_var_name(kind: &str, name: &str) -> CliResult {
    let valid = !name.is_empty()
        && name.len() <= 255
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        return Ok(());
    }
    Err(CliError::usage(format!("invalid {kind} name {name:?}"))
        .with_hint("use letters, digits and '_', not starting with a digit, such as DATABASE_URL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn var_names() {
        assert!(check_var_name("variable", "DATABASE_URL").is_ok());
        assert!(check_var_name("variable", "_x1").is_ok());
        assert!(check_var_name("variable", "").is_err());
        assert!(check_var_name("variable", "1X").is_err());
        assert!(check_var_name("variable", "A-B").is_err());
        assert!(check_var_name("variable", &"A".repeat(256)).is_err());
    }
}
