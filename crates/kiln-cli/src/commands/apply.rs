//! `kiln apply PLAN_ID`: carry out exactly a plan made by `kiln plan`, and follow it.

use kiln_api::{ApplyPlan, CreatedDeploy, PlanId, routes};

use crate::commands::EnvTarget;
use crate::commands::deploy::follow;
use crate::error::{CliError, CliResult};
use crate::exit::ExitKind;
use crate::session::Session;

/// Arguments of `kiln apply`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Fails with exit code 4 (conflict) when the environment changed since the plan was made (a
config or secret change, a scale, another deploy), when the plan was applied already, or when
it expired; make a new plan then.

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
    let plan: PlanId = args
        .plan_id
        .parse()
        .map_err(|error: kiln_api::PlanIdError| {
            CliError::usage(error.to_string()).with_hint("copy the id printed by `kiln plan`")
        })?;
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;
    let path = target.route_with(routes::PLAN_APPLY, &[("plan", &plan.to_string())]);

    let created: CreatedDeploy = api
        .post(&path, &ApplyPlan::default())
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
