//! `kiln whoami`: the token in use, its org and the context it came from.

use kiln_api::{WhoAmI, routes};

use crate::error::CliResult;
use crate::output::Table;
use crate::session::Session;

/// Arguments of `kiln whoami`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  kiln whoami\n  kiln whoami --context staging --json")]
pub(crate) struct Args {}

/// Prints the caller's token and org.
pub(crate) async fn run(session: &mut Session, _args: Args) -> CliResult {
    let api = session.api()?;

    let whoami: WhoAmI = api.get(routes::WHOAMI).await?;

    if session.out.is_json() {
        return session.out.json(&whoami);
    }
    let mut table = Table::new(&["FIELD", "VALUE"]);
    table.row(["context", session.resolved().context.as_str()]);
    table.row(["api url", api.base_url()]);
    table.row(["token", whoami.token.name.as_str()]);
    table.row(["token id", &whoami.token.id.to_string()]);
    table.row(["kind", whoami.token.kind.as_str()]);
    table.row(["org", whoami.org_name.as_deref().unwrap_or("-")]);
    session.out.table(&table)
}
