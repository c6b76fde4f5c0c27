//! `kiln rollback [VERSION]`: deploy an earlier release's image and config again, as a new
//! release.

use kiln_api::{CreateDeploy, CreatedDeploy, DeployTarget, Env, List, Release, routes};

use crate::commands::EnvTarget;
use crate::commands::deploy::follow;
use crate::error::{CliError, CliResult};
use crate::exit::ExitKind;
use crate::session::Session;

/// Arguments of `kiln rollback`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  kiln rollback --env prod        # to the release before the current one
  kiln rollback 3 --env prod      # to v3 (see `kiln releases`)")]
pub(crate) struct Args {
    /// Release version to go back to, with or without the v [default: the one before the
    /// current release]
    #[arg(value_name = "VERSION")]
    release: Option<String>,

    /// Return once the deploy is accepted instead of following it
    #[arg(long)]
    detach: bool,
}

/// Deploys the chosen release and follows it.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let requested = args.release.as_deref().map(parse_version).transpose()?;
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;

    let version = match requested {
        Some(version) => version,
        None => {
            let env: Env = api.get(&target.route(routes::ENV)).await?;
            let releases: List<Release> = api.get(&target.route(routes::RELEASES)).await?;
            previous_version(&env, &releases.items).ok_or_else(|| {
                CliError::new(
                    ExitKind::NotFound,
                    format!("{} has no release before the current one", target.label()),
                )
                .with_hint("name a version: kiln releases, then kiln rollback VERSION")
            })?
        }
    };

    let created: CreatedDeploy = api
        .post(
            &target.route(routes::DEPLOYS),
            &CreateDeploy {
                target: DeployTarget::ReleaseVersion(version),
                strategy: None,
            },
        )
        .await?;

    if !session.out.is_json() && !args.detach {
        session.out.note(&format!(
            "Rolling {} back to v{version} as the new release v{}",
            target.label(),
            created.release.version
        ));
    }
    follow::after_create(session, &api, &target, &created, args.detach).await
}

pub(crate) fn parse_version(text: &str) -> CliResult<u64> {
    text.strip_prefix('v')
        .unwrap_or(text)
        .parse::<u64>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| {
            CliError::usage(format!("invalid release version {text:?}"))
                .with_hint("use a number from `kiln releases`, such as 3 or v3")
        })
}

/// The newest release older than the current one.
fn previous_version(env: &Env, releases: &[Release]) -> Option<u64> {
    let current = releases
        .iter()
        .find(|r| Some(r.id) == env.current_release_id)?
        .version;
    releases
        .iter()
        .map(|r| r.version)
        .filter(|v| *v < current)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("3").unwrap(), 3);
        assert_eq!(parse_version("v12").unwrap(), 12);
        assert!(parse_version("0").is_err());
        assert!(parse_version("latest").is_err());
    }
}
