//! `kiln plan`: ask the control plane what a deploy of the current kiln.toml and image (or a
//! rollback to an earlier release) would do, without doing it. The control plane stores the
//! plan; `kiln apply PLAN_ID` carries it out exactly.

use std::path::PathBuf;

use kiln_api::{
    CreatePlan, CreateRelease, DeployStrategy, DeployTarget, Plan, PlanAction, PlanRelease, routes,
};

use crate::commands::deploy::{Strategy, current_image, manifest, resolve_image};
use crate::commands::releases::short_digest;
use crate::commands::{EnvTarget, format_time};
use crate::error::CliResult;
use crate::output::{Style, Table};
use crate::session::{MANIFEST_FILE, Session};

/// Arguments of `kiln plan`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Without --image, the new release keeps the image digest of the current release. With
--release, the plan is a rollback to that release (or a redeploy of the current one).

Examples:
  kiln plan --env prod --image registry.example.com/web:1.5
  kiln plan --env prod --release 3
  kiln apply PLAN_ID --env prod")]
pub(crate) struct Args {
    /// Image to plan for; a tag is resolved to its digest [default: the current release's]
    #[arg(long, value_name = "REF", conflicts_with = "release")]
    image: Option<String>,

    /// Plan a rollback to this release version (see `kiln releases`) instead of a new release
    #[arg(long, value_name = "VERSION")]
    release: Option<String>,

    /// Path of the manifest
    #[arg(long, value_name = "PATH", default_value = MANIFEST_FILE)]
    config: PathBuf,

    /// Override the manifest's deploy strategy
    #[arg(long, value_enum)]
    strategy: Option<Strategy>,

    /// Description stored with the release if the plan is applied
    #[arg(
        long,
        short = 'm',
        value_name = "TEXT",
        default_value = "",
        conflicts_with = "release"
    )]
    message: String,
}

/// Requests the plan and prints it.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let (target, request) = match &args.release {
        Some(version) => {
            let version = crate::commands::rollback::parse_version(version)?;
            let target = EnvTarget::from_session(session)?;
            let request = CreatePlan {
                target: DeployTarget::ReleaseVersion(version),
                strategy: args.strategy.map(DeployStrategy::from),
            };
            (target, request)
        }
        None => new_release_plan(session, &args).await?,
    };
    let api = session.api()?;
    let plan: Plan = api.post(&target.route(routes::PLANS), &request).await?;

    if session.out.is_json() {
        return session.out.json(&plan);
    }
    print_plan(session, &target, &plan)?;
    session.out.note(&format!(
        "Apply it with: kiln apply {} --env {} (before {})",
        plan.id,
        target.env,
        format_time(plan.expires_at)
    ));
    Ok(())
}

/// Builds the target and request of a plan for a new release from the manifest.
async fn new_release_plan(session: &Session, args: &Args) -> CliResult<(EnvTarget, CreatePlan)> {
    let env = session.env()?;
    let loaded = manifest::load(&args.config, &env)?;
    let target = EnvTarget {
        org: session.org()?,
        app: loaded.app.clone(),
        env,
    };
    let api = session.api()?;
    let image = match &args.image {
        Some(reference) => resolve_image(session, &api, reference).await?,
        None => current_image(&api, &target).await?,
    };
    let request = CreatePlan {
        target: DeployTarget::NewRelease(Box::new(CreateRelease {
            image,
            spec: loaded.spec,
            description: args.message.clone(),
        })),
        strategy: args.strategy.map(DeployStrategy::from),
    };
    Ok((target, request))
}

/// Prints the release change and the steps of a plan.
pub(crate) fn print_plan(session: &Session, target: &EnvTarget, plan: &Plan) -> CliResult {
    let out = &session.out;
    let change = &plan.release;
    out.line(&format!(
        "Plan {} for {} (event stream version {})",
        out.paint(Style::Bold, &plan.id.to_string()),
        target.label(),
        plan.base_version
    ))?;

    let to = release_label(&change.to, change.creates_release);
    let from = change
        .from
        .as_ref()
        .map_or("no release".to_owned(), |from| format!("v{}", from.version));
    out.line(&format!("Release  {from} -> {to}"))?;
    out.line(&format!(
        "Image    {} {}{}",
        change.to.image.reference,
        short_digest(&change.to.image.digest),
        if change.image_changed {
            ""
        } else {
            " (unchanged)"
        }
    ))?;
    out.line(&format!(
        "Config   v{}{}",
        change.to.config_version,
        config_detail(&change.config_set, &change.config_unset)
    ))?;
    out.line(&format!(
        "Secrets  v{}{}",
        change.to.secrets_version,
        if change.secrets_changed {
            ""
        } else {
            " (unchanged)"
        }
    ))?;
    out.line("")?;

    let mut table = Table::new(&["STEP", "ACTION", "DETAIL"]);
    for step in &plan.steps {
        for (position, action) in step.actions.iter().enumerate() {
            let name = if position == 0 {
                step.name.clone()
            } else {
                String::new()
            };
            let (verb, detail) = describe(action);
            table.row([name, verb.to_owned(), detail]);
        }
    }
    out.table(&table)
}

fn release_label(release: &PlanRelease, created: bool) -> String {
    match (created, release.rollback_of) {
        (true, Some(_)) => format!("v{} (new, a rollback)", release.version),
        (true, None) => format!("v{} (new)", release.version),
        (false, _) => format!("v{} (again)", release.version),
    }
}

fn config_detail(set: &[String], unset: &[String]) -> String {
    let mut parts = Vec::new();
    if !set.is_empty() {
        parts.push(format!("set {}", set.join(", ")));
    }
    if !unset.is_empty() {
        parts.push(format!("unset {}", unset.join(", ")));
    }
    if parts.is_empty() {
        return " (unchanged)".to_owned();
    }
    format!(" ({})", parts.join("; "))
}

fn describe(action: &PlanAction) -> (&'static str, String) {
    match action {
        PlanAction::RunReleaseCommand {
            instance_id,
            host,
            timeout_secs,
        } => (
            "release-command",
            format!("{instance_id} on {host}, exit 0 within {timeout_secs}s"),
        ),
        PlanAction::StartInstance {
            instance_id,
            process,
            host,
            ..
        } => ("start", format!("{process} {instance_id} on {host}")),
        PlanAction::WaitHealthy {
            instances,
            deadline_secs,
        } => (
            "wait",
            format!(
                "{} instance(s) healthy within {deadline_secs}s",
                instances.len()
            ),
        ),
        PlanAction::UpdateRoutes {
            process,
            add,
            remove,
        } => (
            "routes",
            format!("{process}: add {}, remove {}", add.len(), remove.len()),
        ),
        PlanAction::StopInstance {
            instance_id,
            host,
            grace_secs,
        } => (
            "stop",
            format!("{instance_id} on {host}, {grace_secs}s grace"),
        ),
        PlanAction::SetRelease { release_id } => (
            "release",
            release_id.map_or("none".to_owned(), |id| id.to_string()),
        ),
        PlanAction::SetScale { counts } => (
            "scale",
            counts
                .iter()
                .map(|(process, count)| format!("{process}={count}"))
                .collect::<Vec<_>>()
                .join(" "),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_detail_lists_names() {
        assert_eq!(config_detail(&[], &[]), " (unchanged)");
        assert_eq!(
            config_detail(&["A".to_owned(), "B".to_owned()], &["C".to_owned()]),
            " (set A, B; unset C)"
        );
    }
}
