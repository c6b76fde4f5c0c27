//! `kiln apply PLAN_ID`: carry out exactly a plan made by `kiln plan`, and follow it.

use kiln_api::{CreatedDeploy, routes};

use crate::commands::EnvTarget;
use crate::commands::deploy::follow;
use crate::error::{CliError, CliResult};
use crate::exit::ExitKind;
use crate::session::Session;

/// Arguments of `kiln apply`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Fails with exit code 4 (conflict) when the environment changed since the plan was made;
make a new plan then.

Examples:
  kiln apply pln_0190f3c2... --env prod")]
pub(crate) struct Args {
    /// Id of the plan, as `kiln plan` printed it
    plan_id: String,

    /// Return once the deploy is accepted instead of following it
    #[arg(long)]
    detach: bool,
}

/// Applies the plan.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    if args.plan_id.is_empty()
        || !args
            .plan_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(
            CliError::usage(format!("invalid plan id {:?}", args.plan_id))
                .with_hint("copy the id printed by `kiln plan`"),
        );
    }
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;
    // TODO(correctness): kiln_api::routes has no apply route yet; this path is what the CLI
    // expects the deploy orchestrator to serve, and it is untested against a server.
    let path = format!("{}/{}/apply", target.route(routes::PLANS), args.plan_id);

    let created: CreatedDeploy =
        api.post(&path, &serde_json::json!({}))
            .await
            .map_err(|error| {
                if error.kind() == ExitKind::Conflict {
                    error.with_hint(format!(
                    "the environment changed since the plan; make a new one: kiln plan --env {}",
                    target.env
                ))
                } else {
                    error
                }
            })?;

    follow::after_create(session, &api, &target, &created, args.detach).await
}
