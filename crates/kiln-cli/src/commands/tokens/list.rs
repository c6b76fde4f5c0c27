//! `kiln tokens list`.

use kiln_api::{List, Token, routes};

use crate::commands::{format_time, route};
use crate::error::CliResult;
use crate::output::{Style, Table};
use crate::session::Session;

/// Arguments of `kiln tokens list`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  kiln tokens list")]
pub(crate) struct Args {}

/// Lists the org's tokens.
pub(crate) async fn run(session: &mut Session, _args: Args) -> CliResult {
    let org = session.org()?;
    let api = session.api()?;

    let tokens: List<Token> = api
        .get(&route(routes::TOKENS, &[("org", org.as_str())]))
        .await?;

    if session.out.is_json() {
        return session.out.json(&tokens);
    }
    let mut table = Table::new(&["ID", "NAME", "CREATED", "EXPIRES", "STATUS"]);
    for token in &tokens.items {
        let status = match token.revoked_at {
            Some(_) => ("revoked".to_owned(), Style::Bad),
            None => ("active".to_owned(), Style::Good),
        };
        table.styled_row(vec![
            (token.id.to_string(), Style::Plain),
            (token.name.clone(), Style::Plain),
            (format_time(token.created_at), Style::Plain),
            (
                token
                    .expires_at
                    .map_or_else(|| "never".to_owned(), format_time),
                Style::Plain,
            ),
            status,
        ]);
    }
    session.out.table(&table)
}
