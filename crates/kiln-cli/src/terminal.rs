//! Interaction with the person at the terminal, and the rule that there is none otherwise.
//!
//! When stdin is not a terminal (CI, a pipe, a script), `kiln` never prompts: it fails with a
//! usage error that names the flag to pass instead, so a script never hangs on a question.

use std::io::{BufRead, IsTerminal, Write};

use crate::error::{CliError, CliResult};

/// Whether stdin is a terminal, so prompting is allowed.
pub(crate) fn stdin_is_terminal() -> bool {
    std::io::stdin().is_terminal()
}

/// Reads a secret (a token or a secret value) from the terminal without echo.
///
/// `flag` names the non-interactive alternative, used in the error when stdin is not a
/// terminal.
pub(crate) fn prompt_hidden(prompt: &str, flag: &str) -> CliResult<String> {
    if !stdin_is_terminal() {
        return Err(CliError::usage(format!(
            "cannot prompt for {prompt}: stdin is not a terminal"
        ))
        .with_hint(format!("pass {flag}")));
    }
    let value = rpassword::prompt_password(format!("{prompt}: ")).map_err(|error| {
        CliError::failure(format!("cannot read {prompt} from the terminal")).with_source(error)
    })?;
    Ok(value.trim_end_matches(['\r', '\n']).to_owned())
}

/// Asks the person to type `expected` to confirm a destructive action.
///
/// Returns `Ok(())` when `assume_yes` is set (`--yes`) or the typed text matches; fails with a
/// usage error naming `--yes` when stdin is not a terminal.
pub(crate) fn confirm_by_typing(action: &str, expected: &str, assume_yes: bool) -> CliResult {
    if assume_yes {
        return Ok(());
    }
    if !stdin_is_terminal() {
        return Err(CliError::usage(format!(
            "refusing to {action} without confirmation: stdin is not a terminal"
        ))
        .with_hint("pass --yes to confirm"));
    }

    eprint!("This will {action}. Type {expected:?} to confirm: ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|error| CliError::failure("cannot read the confirmation").with_source(error))?;
    if answer.trim() != expected {
        return Err(CliError::usage(format!(
            "confirmation did not match {expected:?}; nothing was changed"
        )));
    }
    Ok(())
}

/// Registers for SIGINT (Ctrl-C) at once, so from now on it is delivered to the returned
/// stream instead of ending the process. Commands that follow server-side work use it to
/// stop following with exit code 130 and say how to resume.
pub(crate) fn interrupt_signal() -> CliResult<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|error| CliError::failure("cannot install the Ctrl-C handler").with_source(error))
}
