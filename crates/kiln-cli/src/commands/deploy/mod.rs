//! `kiln deploy`: validate kiln.toml locally, pin the image by digest, create the release and
//! the deploy in one call, then follow the rollout until it succeeds or fails.

pub(crate) mod follow;
pub(crate) mod manifest;

use std::path::PathBuf;

use kiln_api::{
    CreateDeploy, CreateRelease, CreatedDeploy, DeployStrategy, DeployTarget, Env,
    ImageRef as ApiImageRef, List, Release, routes,
};
use kiln_core::DeployId;

use crate::commands::EnvTarget;
use crate::error::{CliError, CliResult};
use crate::http::Http;
use crate::registry::{self, ImageRef};
use crate::session::{MANIFEST_FILE, Session};

/// Arguments of `kiln deploy`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Without --image, the new release keeps the image digest of the current release, so a changed
kiln.toml or config is deployed on the same image.

Exit status: 0 when the deploy succeeded, 6 when it failed or was rolled back. Ctrl-C stops
following (exit 130) and never cancels the deploy.

Examples:
  kiln deploy --env prod --image registry.example.com/web:1.4
  kiln deploy --env staging --config deploy/kiln.toml
  kiln deploy --env prod --image web:1.4 --detach --json
  kiln deploy --env prod --attach dep_0190f3c2...    # follow a running deploy again")]
pub(crate) struct Args {
    /// Image to deploy; a tag is resolved to its digest through the registry, a reference
    /// with @sha256: is used as it is
    #[arg(long, value_name = "REF")]
    image: Option<String>,

    /// Path of the manifest
    #[arg(long, value_name = "PATH", default_value = MANIFEST_FILE)]
    config: PathBuf,

    /// Return once the deploy is accepted instead of following it
    #[arg(long)]
    detach: bool,

    /// Override the manifest's deploy strategy
    #[arg(long, value_enum)]
    strategy: Option<Strategy>,

    /// Description stored with the release, such as a commit subject
    #[arg(long, short = 'm', value_name = "TEXT", default_value = "")]
    message: String,

    /// Follow an existing deploy instead of starting one
    #[arg(long, value_name = "DEPLOY_ID", conflicts_with_all = ["image", "detach", "strategy"])]
    attach: Option<String>,
}

/// Deploy strategies on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Strategy {
    /// Start new instances, wait until healthy, move routes, drain old ones
    Rolling,
    /// Stop old instances, then start new ones
    Immediate,
}

impl From<Strategy> for DeployStrategy {
    fn from(strategy: Strategy) -> Self {
        match strategy {
            Strategy::Rolling => DeployStrategy::Rolling,
            Strategy::Immediate => DeployStrategy::Immediate,
        }
    }
}

/// Runs the deploy.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    if let Some(deploy) = &args.attach {
        return attach(session, deploy).await;
    }

    let env = session.env()?;
    let loaded = manifest::load(&args.config, &env)?;
    let app = match &session.global.app {
        Some(_) => session.app()?,
        None => loaded.app.clone(),
    };
    if app != loaded.app {
        return Err(CliError::usage(format!(
            "--app {app} differs from app {} in {}",
            loaded.app,
            args.config.display()
        ))
        .with_hint("deploy the app the manifest describes, or pass --config for the other app"));
    }
    let target = EnvTarget {
        org: session.org()?,
        app,
        env,
    };
    let api = session.api()?;

    let image = match &args.image {
        Some(reference) => resolve_image(session, &api, reference).await?,
        None => current_image(&api, &target).await?,
    };
    let request = CreateDeploy {
        target: DeployTarget::NewRelease(Box::new(CreateRelease {
            image,
            spec: loaded.spec,
            description: args.message.clone(),
        })),
        strategy: args.strategy.map(DeployStrategy::from),
    };

    let created: CreatedDeploy = api.post(&target.route(routes::DEPLOYS), &request).await?;

    follow::after_create(session, &api, &target, &created, args.detach).await
}

/// Resolves `reference` to a digest, through its registry unless it names one.
pub(crate) async fn resolve_image(
    session: &Session,
    api: &Http,
    reference: &str,
) -> CliResult<ApiImageRef> {
    let image = ImageRef::parse(reference).map_err(|error| {
        CliError::usage(format!("invalid --image {reference:?}"))
            .with_source(error)
            .with_hint("write it as [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]")
    })?;
    let spinner = session.out.spinner(&format!("Resolving {image}"));
    let pinned = registry::resolve(api.client(), &image).await;
    spinner.finish_and_clear();
    let pinned = pinned?;
    let digest = pinned
        .rsplit_once('@')
        .map(|(_, digest)| digest.to_owned())
        .unwrap_or_default();
    Ok(ApiImageRef {
        reference: reference.to_owned(),
        digest,
    })
}

/// The image of the environment's current release, for a deploy without `--image`.
pub(crate) async fn current_image(api: &Http, target: &EnvTarget) -> CliResult<ApiImageRef> {
    let env: Env = api.get(&target.route(routes::ENV)).await?;
    let no_image = || {
        CliError::usage(format!(
            "no --image given and {} has no release to take the image from",
            target.label()
        ))
        .with_hint("pass --image REF for the first deploy")
    };
    let current = env.current_release_id.ok_or_else(no_image)?;
    let releases: List<Release> = api.get(&target.route(routes::RELEASES)).await?;
    releases
        .items
        .into_iter()
        .find(|release| release.id == current)
        .map(|release| release.image)
        .ok_or_else(no_image)
}

/// Follows a deploy that is already running.
async fn attach(session: &Session, deploy: &str) -> CliResult {
    let id: DeployId = deploy.parse().map_err(|error: kiln_core::ids::IdError| {
        CliError::usage(error.to_string()).with_hint("copy the id printed by `kiln deploy`")
    })?;
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;
    let deploy: kiln_api::Deploy = api
        .get(&target.route_with(routes::DEPLOY, &[("deploy", &id.to_string())]))
        .await?;
    let releases: List<Release> = api.get(&target.route(routes::RELEASES)).await?;
    let release = releases
        .items
        .into_iter()
        .find(|release| release.id == deploy.release_id)
        .ok_or_else(|| {
            CliError::failure(format!(
                "release {} of deploy {id} not found",
                deploy.release_id
            ))
        })?;
    let created = CreatedDeploy {
        deploy,
        release,
        cursor: 0,
    };
    follow::after_create(session, &api, &target, &created, false).await
}
