//! `kiln plan`: ask the control plane what a deploy of the current kiln.toml and image would
//! do, without doing it.

use std::path::PathBuf;

use kiln_api::{CreatePlan, DeployTarget, Plan, PlanStep, routes};

use crate::commands::EnvTarget;
use crate::commands::deploy::{Strategy, manifest};
use crate::error::{CliError, CliResult};
use crate::output::{Style, Table};
use crate::registry::{self, ImageRef};
use crate::session::{MANIFEST_FILE, Session};

/// Arguments of `kiln plan`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  kiln plan --env prod --image registry.example.com/web:1.5
  kiln apply PLAN_ID --env prod")]
pub(crate) struct Args {
    /// Image to plan for; a tag is resolved to its digest
    #[arg(long, value_name = "REF")]
    image: String,

    /// Path of the manifest
    #[arg(long, value_name = "PATH", default_value = MANIFEST_FILE)]
    config: PathBuf,

    /// Override the manifest's deploy strategy
    #[arg(long, value_enum)]
    strategy: Option<Strategy>,

    /// Description stored with the release if the plan is applied
    #[arg(long, short = 'm', value_name = "TEXT", default_value = "")]
    message: String,
}

/// Requests the plan and prints its steps.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let env = session.env()?;
    let loaded = manifest::load(&args.config, &env)?;
    let target = EnvTarget {
        org: session.org()?,
        app: loaded.app.clone(),
        env,
    };
    let api = session.api()?;
    let image = ImageRef::parse(&args.image).map_err(|error| {
        CliError::usage(format!("invalid --image {:?}", args.image)).with_source(error)
    })?;
    let pinned = registry::resolve(api.client(), &image).await?;
    let digest = pinned
        .rsplit_once('@')
        .map(|(_, d)| d.to_owned())
        .unwrap_or_default();

    let plan: Plan = api
        .post(
            &target.route(routes::PLANS),
            &CreatePlan {
                target: DeployTarget::NewRelease(Box::new(kiln_api::CreateRelease {
                    image: kiln_api::ImageRef {
                        reference: args.image.clone(),
                        digest,
                    },
                    spec: loaded.spec,
                    description: args.message,
                })),
                strategy: args.strategy.map(Into::into),
            },
        )
        .await?;

    if session.out.is_json() {
        return session.out.json(&plan);
    }
    print_plan(session, &plan)
}

/// Prints the steps and problems of a plan.
pub(crate) fn print_plan(session: &Session, plan: &Plan) -> CliResult {
    let mut table = Table::new(&["STEP", "ACTION", "DETAIL"]);
    for (i, step) in plan.steps.iter().enumerate() {
        let (action, detail) = match step {
            PlanStep::StartInstance { process, host } => ("start", format!("{process} on {host}")),
            PlanStep::WaitHealthy => ("wait", "until new instances are healthy".to_owned()),
            PlanStep::ShiftRoutes => ("routes", "move routes to new instances".to_owned()),
            PlanStep::StopInstance { instance_id } => ("stop", instance_id.to_string()),
        };
        table.row([(i + 1).to_string(), action.to_owned(), detail]);
    }
    session.out.table(&table)?;
    for problem in &plan.problems {
        session.out.line(&format!(
            "{} {problem}",
            session.out.paint(Style::Bad, "problem:")
        ))?;
    }
    Ok(())
}
