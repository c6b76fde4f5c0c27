//! `kiln tokens revoke ID`.

use kiln_api::{Token, routes};
use kiln_core::TokenId;

use crate::commands::route;
use crate::error::{CliError, CliResult};
use crate::session::Session;

/// Arguments of `kiln tokens revoke`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  kiln tokens revoke tok_0190f3c2...")]
pub(crate) struct Args {
    /// Id of the token, as `kiln tokens list` shows it
    id: String,
}

/// Revokes the token.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let id: TokenId = args.id.parse().map_err(|error: kiln_core::ids::IdError| {
        CliError::usage(error.to_string()).with_hint("copy the id from `kiln tokens list`")
    })?;
    let org = session.org()?;
    let api = session.api()?;

    let token: Token = api
        .delete_json(&route(
            routes::TOKEN,
            &[("org", org.as_str()), ("token", &id.to_string())],
        ))
        .await?;

    if session.out.is_json() {
        return session.out.json(&token);
    }
    session
        .out
        .line(&format!("Revoked token {} ({})", token.name, token.id))
}
