//! `kiln restart [PROCESS]`: replace the running instances with fresh ones of the same release.

use kiln_api::{CreatedDeploy, RestartEnv, routes};
use kiln_core::ProcessName;

use crate::commands::EnvTarget;
use crate::commands::deploy::follow;
use crate::error::{CliError, CliResult};
use crate::session::Session;

/// Arguments of `kiln restart`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  kiln restart --env prod\n  kiln restart worker --env prod --detach"
)]
pub(crate) struct Args {
    /// Restart only this process type [default: all]
    process: Option<String>,

    /// Return once the restart is requested instead of following it
    #[arg(long)]
    detach: bool,
}

/// Requests a rolling restart and follows it like a deploy.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let process = args
        .process
        .map(ProcessName::new)
        .transpose()
        .map_err(|error| CliError::usage(error.to_string()))?;
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;
    let path = target.route(routes::ENV_RESTART);

    let created: CreatedDeploy = api.post(&path, &RestartEnv { process }).await?;

    follow::after_create(session, &api, &target, &created, args.detach).await
}
