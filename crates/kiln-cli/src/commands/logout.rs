//! `kiln logout`: forget a context's token (its API URL and org stay).

use serde_json::json;

use crate::error::{CliError, CliResult};
use crate::exit::ExitKind;
use crate::session::Session;

/// Arguments of `kiln logout`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  kiln logout\n  kiln logout --context staging")]
pub(crate) struct Args {}

/// Removes the token from the context and saves the file. The token stays valid on the
/// server; revoke it with `kiln tokens revoke` to end it.
pub(crate) fn run(session: &mut Session, _args: Args) -> CliResult {
    let name = session.resolved().context.clone();
    let mut config = session.config().clone();
    let Some(context) = config.contexts.get_mut(&name) else {
        return Err(
            CliError::new(ExitKind::NotFound, format!("context {name:?} not found"))
                .with_hint("see the contexts in the config file, or pass --context NAME"),
        );
    };
    let had_token = context.token.take().is_some();
    config.save(session.config_path())?;

    if session.out.is_json() {
        return session
            .out
            .json(&json!({ "context": name, "logged_out": had_token }));
    }
    if had_token {
        session
            .out
            .line(&format!("Removed the token of context {name:?}"))?;
        session
            .out
            .note("The token itself still works until revoked: kiln tokens revoke ID");
        return Ok(());
    }
    session
        .out
        .line(&format!("Context {name:?} had no token; nothing to do"))
}
