//! `kiln secrets unset NAME`.

use kiln_api::routes;
use serde_json::json;

use crate::commands::EnvTarget;
use crate::commands::config::check_var_name;
use crate::error::CliResult;
use crate::session::Session;

/// Arguments of `kiln secrets unset`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  kiln secrets unset API_TOKEN --env prod")]
pub(crate) struct Args {
    /// Name of the secret to remove
    name: String,
}

/// Removes the secret.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    check_var_name("secret", &args.name)?;
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;

    api.delete(&target.route_with(routes::SECRET, &[("name", args.name.as_str())]))
        .await?;

    if session.out.is_json() {
        return session
            .out
            .json(&json!({ "name": args.name, "unset": true }));
    }
    session
        .out
        .line(&format!("Unset secret {} on {}", args.name, target.label()))?;
    session.out.note(
        "Releases made before keep the secret, for their restarts, scale-ups and rollbacks; \
             the next deploy drops it: kiln deploy",
    );
    Ok(())
}
