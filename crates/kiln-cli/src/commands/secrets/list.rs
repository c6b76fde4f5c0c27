//! `kiln secrets list`.

use kiln_api::{List, SecretMeta, routes};

use crate::commands::{EnvTarget, format_time};
use crate::error::CliResult;
use crate::output::Table;
use crate::session::Session;

/// Arguments of `kiln secrets list`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  kiln secrets list --env prod")]
pub(crate) struct Args {}

/// Lists secret names, versions and digests.
pub(crate) async fn run(session: &mut Session, _args: Args) -> CliResult {
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;

    let secrets: List<SecretMeta> = api.get(&target.route(routes::SECRETS)).await?;

    if session.out.is_json() {
        return session.out.json(&secrets);
    }
    if secrets.items.is_empty() {
        return session
            .out
            .line(&format!("No secrets on {}.", target.label()));
    }
    let mut table = Table::new(&["NAME", "VERSION", "DIGEST", "UPDATED"]);
    for secret in &secrets.items {
        table.row([
            secret.name.clone(),
            secret.version.to_string(),
            secret.digest.clone(),
            format_time(secret.updated_at),
        ]);
    }
    session.out.table(&table)
}
