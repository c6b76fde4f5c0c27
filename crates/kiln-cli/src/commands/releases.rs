//! `kiln releases`: an environment's releases, newest first.

use kiln_api::{Env, List, Release, routes};

use crate::commands::{EnvTarget, format_time};
use crate::error::CliResult;
use crate::output::{Style, Table};
use crate::session::Session;

/// Arguments of `kiln releases`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  kiln releases --env prod\n  kiln rollback 3 --env prod    # go back to v3"
)]
pub(crate) struct Args {}

/// Lists the releases; the current one is marked with `*`.
pub(crate) async fn run(session: &mut Session, _args: Args) -> CliResult {
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;

    let releases: List<Release> = api.get(&target.route(routes::RELEASES)).await?;

    if session.out.is_json() {
        return session.out.json(&releases);
    }
    if releases.items.is_empty() {
        session
            .out
            .line(&format!("No releases of {} yet.", target.label()))?;
        session.out.note(&format!(
            "Create one with: kiln deploy --env {}",
            target.env
        ));
        return Ok(());
    }
    let env: Env = api.get(&target.route(routes::ENV)).await?;
    let mut table = Table::new(&[
        "",
        "VERSION",
        "IMAGE",
        "DIGEST",
        "CONFIG",
        "CREATED",
        "DESCRIPTION",
    ]);
    for release in &releases.items {
        let current = Some(release.id) == env.current_release_id;
        let description = match (release.rollback_of, release.description.is_empty()) {
            (Some(_), true) => "rollback".to_owned(),
            _ => release.description.clone(),
        };
        table.styled_row(vec![
            (if current { "*" } else { "" }.to_owned(), Style::Good),
            (format!("v{}", release.version), Style::Bold),
            (release.image.reference.clone(), Style::Plain),
            (short_digest(&release.image.digest), Style::Dim),
            (format!("v{}", release.config_version), Style::Plain),
            (format_time(release.created_at), Style::Plain),
            (description, Style::Plain),
        ]);
    }
    session.out.table(&table)
}

/// `sha256:` and the first 12 hex digits, as `docker images` shows digests.
pub(crate) fn short_digest(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    format!("sha256:{}", hex.get(..12).unwrap_or(hex))
}
