//! Following a deploy through the org's event feed until it reaches a final state.
//!
//! The feed is read after a cursor with long polls, so a dropped connection or a slow client
//! loses nothing: the next poll starts where the last one ended. On a terminal the rollout is
//! drawn as lines on stderr under a spinner; with `--json` each relevant event is one line of
//! NDJSON on stdout, and the final line is the deploy object.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use kiln_api::{
    CreatedDeploy, Deploy, DeployState, Event, EventEnvelope, EventPage, InstanceState, LogPage,
    routes,
};
use kiln_core::{InstanceId, ProcessName};

use crate::commands::{EnvTarget, route};

/// Process type name of the instance that runs a release command, as the control plane
/// places it.
const RELEASE_COMMAND_PROCESS: &str = "release-command";

/// Name of the deploy step that runs the release command.
const RELEASE_COMMAND_STEP: &str = "release-command";
use crate::error::{CliError, CliResult};
use crate::exit::ExitKind;
use crate::http::Http;
use crate::session::Session;

/// Seconds one long poll waits on the server for new events.
const POLL_WAIT_SECS: u64 = 20;

/// Log lines shown for the instance that failed a deploy.
const FAILURE_LOG_LINES: u32 = 20;

/// Seconds without an event of the deploy's environment before `kiln deploy` says so on
/// stderr; `KILN_QUIET_NOTICE_SECS` overrides it (tests set it low).
const QUIET_NOTICE_SECS: u64 = 30;

/// Returns how long the rollout may be quiet before the CLI prints a notice.
fn quiet_notice_after() -> Duration {
    let secs = std::env::var("KILN_QUIET_NOTICE_SECS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(QUIET_NOTICE_SECS);
    Duration::from_secs(secs)
}

/// Prints the created deploy and, unless `detach`, follows it.
pub(crate) async fn after_create(
    session: &Session,
    api: &Http,
    target: &EnvTarget,
    created: &CreatedDeploy,
    detach: bool,
) -> CliResult {
    let deploy = &created.deploy;
    let again = format!(
        "kiln deploy --attach {} --app {} --env {}",
        deploy.id, target.app, target.env
    );

    if detach {
        if session.out.is_json() {
            return session.out.json(created);
        }
        session.out.line(&format!(
            "Deploy {} of {} v{} started",
            deploy.id,
            target.label(),
            created.release.version
        ))?;
        session.out.note(&format!("Follow it with: {again}"));
        return Ok(());
    }

    // Registered before anything is printed, so a Ctrl-C from someone who saw the first line
    // always detaches instead of killing the process with the default action.
    let mut interrupt = crate::terminal::interrupt_signal()?;
    if !session.out.is_json() {
        session.out.note(&format!(
            "Deploying {} v{} ({}) as {}",
            target.label(),
            created.release.version,
            created.release.image.digest,
            deploy.id
        ));
    }
    follow(session, api, target, created, &again, &mut interrupt).await
}

/// Progress of one deploy, built from events.
#[derive(Debug, Default)]
struct View {
    /// Instances of the new release: process type and last known state.
    new_instances: BTreeMap<InstanceId, (ProcessName, InstanceState)>,
    /// The most recent instance of the new release that failed, with the reason.
    failed_instance: Option<(InstanceId, String)>,
    /// The instance that runs the release command, once placed.
    release_command: Option<InstanceId>,
    /// The release command's step, once recorded: whether it failed, and its last output lines.
    release_command_result: Option<(bool, Vec<String>)>,
}

impl View {
    /// Records `event` and returns a progress line for people, if it is one.
    fn apply(&mut self, created: &CreatedDeploy, event: &Event) -> Option<String> {
        match event {
            Event::InstancePlaced {
                instance_id,
                release_id,
                process,
                host_id,
                ..
            } if *release_id == created.release.id => {
                if process.as_str() == RELEASE_COMMAND_PROCESS {
                    self.release_command = Some(*instance_id);
                    return Some(format!(
                        "running the release command in {instance_id} on host {host_id}"
                    ));
                }
                self.new_instances
                    .insert(*instance_id, (process.clone(), InstanceState::Pending));
                Some(format!("placed {process} {instance_id} on host {host_id}"))
            }
            Event::InstanceStateChanged {
                instance_id,
                state,
                detail,
                ..
            } if self.release_command == Some(*instance_id) => {
                if *state == InstanceState::Failed {
                    let reason = detail.clone().unwrap_or_default();
                    self.failed_instance = Some((*instance_id, reason));
                }
                let state = state_name(*state);
                Some(match detail {
                    Some(detail) => format!("release command {state}: {detail}"),
                    None => format!("release command {state}"),
                })
            }
            Event::InstanceStateChanged {
                instance_id,
                state,
                detail,
                exit_code,
                ..
            } => {
                let (process, known) = self.new_instances.get_mut(instance_id)?;
                *known = *state;
                let mut reason = detail.clone().unwrap_or_default();
                if let Some(code) = exit_code {
                    reason = format!("{reason} (exit code {code})").trim().to_owned();
                }
                if matches!(state, InstanceState::Failed | InstanceState::Unhealthy) {
                    self.failed_instance = Some((*instance_id, reason.clone()));
                }
                let state = state_name(*state);
                let line = format!("{process} {instance_id} {state}");
                Some(if reason.is_empty() {
                    line
                } else {
                    format!("{line}: {reason}")
                })
            }
            Event::InstanceStopRequested { instance_id, .. }
            | Event::InstanceRemoved { instance_id, .. }
                if self.release_command == Some(*instance_id) =>
            {
                None
            }
            Event::InstanceStopRequested {
                instance_id,
                reason,
                ..
            } if !self.new_instances.contains_key(instance_id) => {
                Some(format!("draining old instance {instance_id}: {reason}"))
            }
            Event::InstanceRemoved { instance_id, .. }
                if !self.new_instances.contains_key(instance_id) =>
            {
                Some(format!("old instance {instance_id} stopped"))
            }
            Event::RoutesChanged { routes, .. } => {
                let backends: usize = routes.iter().map(|r| r.backends.len()).sum();
                Some(format!(
                    "routes moved: {} routes to {backends} backends",
                    routes.len()
                ))
            }
            Event::DeployStepCompleted {
                deploy_id,
                step,
                detail,
                output,
                ..
            } if *deploy_id == created.deploy.id => {
                let mut text = format!("{step}: {detail}");
                let outcome = step.split_once(':');
                if let Some((outcome @ ("completed" | "failed"), RELEASE_COMMAND_STEP)) = outcome {
                    let failed = outcome == "failed";
                    self.release_command_result = Some((failed, output.clone()));
                    text = if failed {
                        format!("release command failed: {detail}")
                    } else {
                        "release command succeeded".to_owned()
                    };
                    for line in output {
                        text.push_str(&format!("\n    | {line}"));
                    }
                }
                Some(text)
            }
            _ => None,
        }
    }

    /// The current phase for the spinner: waiting for placement, the release command, then
    /// `healthy/total` of the new instances.
    fn summary(&self) -> String {
        if self.new_instances.is_empty()
            && self.release_command.is_some()
            && self.release_command_result.is_none()
        {
            return "running the release command".to_owned();
        }
        if self.new_instances.is_empty() {
            return "waiting for placement".to_owned();
        }
        let healthy = self
            .new_instances
            .values()
            .filter(|(_, state)| *state == InstanceState::Healthy)
            .count();
        format!(
            "{healthy}/{} new instances healthy",
            self.new_instances.len()
        )
    }

    /// The notice printed when nothing has happened for `quiet`.
    fn quiet_notice(&self, quiet: Duration, env: &str) -> String {
        let secs = quiet.as_secs();
        if self.new_instances.is_empty() {
            format!(
                "no instance placed yet after {secs}s; is a host registered and schedulable? \
                 see `kiln hosts list`"
            )
        } else {
            format!(
                "no progress for {secs}s ({}); see `kiln status --env {env}`",
                self.summary()
            )
        }
    }
}

/// Returns the API's name of an instance state, such as `exited`.
fn state_name(state: InstanceState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Whether `event` belongs to the deploy's environment and so to its output.
fn concerns(created: &CreatedDeploy, event: &Event) -> bool {
    event.env_id() == Some(created.deploy.env_id)
}

async fn follow(
    session: &Session,
    api: &Http,
    target: &EnvTarget,
    created: &CreatedDeploy,
    again: &str,
    interrupt: &mut tokio::signal::unix::Signal,
) -> CliResult {
    let started = Instant::now();
    let path = route(routes::ORG_EVENTS, &[("org", target.org.as_str())]);
    let deploy_path = target.route_with(
        routes::DEPLOY,
        &[("deploy", &created.deploy.id.to_string())],
    );
    let mut view = View::default();
    let spinner = session.out.spinner(&format!(
        "Deploying v{}: {}",
        created.release.version,
        view.summary()
    ));
    let mut cursor = created.cursor;
    let quiet_limit = quiet_notice_after();
    let mut last_event = Instant::now();
    let mut noticed = false;

    let deploy = loop {
        let query = [
            ("after", cursor.to_string()),
            ("wait", POLL_WAIT_SECS.to_string()),
            ("app", target.app.to_string()),
            ("env", target.env.to_string()),
        ];
        let notice_at = tokio::time::Instant::from_std(last_event + quiet_limit);
        let page: EventPage = tokio::select! {
            page = api.get_query(&path, &query, Duration::from_secs(POLL_WAIT_SECS)) => page?,
            // The notice never fails the deploy: the poll restarts from the same cursor, so
            // dropping the one in flight loses nothing.
            () = tokio::time::sleep_until(notice_at), if !noticed => {
                noticed = true;
                let notice = view.quiet_notice(quiet_limit, target.env.as_str());
                spinner.suspend(|| session.out.note(&notice));
                continue;
            }
            _ = interrupt.recv() => {
                spinner.finish_and_clear();
                return Err(CliError::new(
                    ExitKind::Interrupted,
                    format!("stopped following deploy {}; it continues on the server", created.deploy.id),
                )
                .with_hint(format!("follow it again with: {again}")));
            }
        };

        let mut finished = None;
        for envelope in &page.events {
            if concerns(created, &envelope.event) {
                last_event = Instant::now();
                noticed = false;
            }
            if let Some(deploy) = handle(session, &spinner, &mut view, created, envelope)? {
                finished = Some(deploy);
            }
        }
        cursor = page.cursor.max(cursor);
        spinner.set_message(format!(
            "Deploying v{}: {}",
            created.release.version,
            view.summary()
        ));

        // The deploy's own record is the authority on its state: it is read when the feed
        // goes quiet or reports the end, so a missed event can never leave the CLI waiting.
        if page.events.is_empty() || finished.is_some() {
            let deploy: Deploy = api.get(&deploy_path).await?;
            if deploy.state.is_terminal() {
                break deploy;
            }
        }
    };
    spinner.finish_and_clear();

    if session.out.is_json() {
        session.out.json_line(&deploy)?;
    }
    finish(session, api, target, created, &view, &deploy, started).await
}

/// Prints one event; returns the deploy's final state when the event carries it.
fn handle(
    session: &Session,
    spinner: &ProgressBar,
    view: &mut View,
    created: &CreatedDeploy,
    envelope: &EventEnvelope,
) -> CliResult<Option<DeployState>> {
    if !concerns(created, &envelope.event) {
        return Ok(None);
    }
    if session.out.is_json() {
        session.out.json_line(envelope)?;
    }
    if let Some(line) = view.apply(created, &envelope.event) {
        spinner.println(format!("  {line}"));
    }
    match &envelope.event {
        Event::DeployStateChanged {
            deploy_id, state, ..
        } if *deploy_id == created.deploy.id && state.is_terminal() => Ok(Some(*state)),
        _ => Ok(None),
    }
}

async fn finish(
    session: &Session,
    api: &Http,
    target: &EnvTarget,
    created: &CreatedDeploy,
    view: &View,
    deploy: &Deploy,
    started: Instant,
) -> CliResult {
    let version = created.release.version;
    match deploy.state {
        DeployState::Succeeded => {
            if !session.out.is_json() {
                session.out.line(&format!(
                    "Deployed {} v{version} in {}s",
                    target.label(),
                    started.elapsed().as_secs()
                ))?;
            }
            Ok(())
        }
        DeployState::Superseded => Err(CliError::new(
            ExitKind::DeployFailed,
            format!(
                "deploy {} of {} v{version} was superseded by a newer deploy",
                deploy.id,
                target.label()
            ),
        )
        .with_hint(format!(
            "see the newer deploy with: kiln status --env {}",
            target.env
        ))),
        _ => Err(failure(api, target, created, view, deploy).await),
    }
}

/// Builds the error for a failed deploy: the reason, the instance that failed and its last
/// log lines.
async fn failure(
    api: &Http,
    target: &EnvTarget,
    created: &CreatedDeploy,
    view: &View,
    deploy: &Deploy,
) -> CliError {
    let reason = deploy
        .failure
        .clone()
        .unwrap_or_else(|| "no reason given".to_owned());
    let mut error = CliError::new(
        ExitKind::DeployFailed,
        format!(
            "deploy {} of {} v{} failed: {reason}",
            deploy.id,
            target.label(),
            created.release.version
        ),
    );

    if let Some((true, output)) = &view.release_command_result {
        let mut detail = "the release command failed before any instance was replaced".to_owned();
        if !output.is_empty() {
            detail.push_str("\nlast output lines:");
            for line in output {
                detail.push_str(&format!("\n  | {line}"));
            }
        }
        error = error.with_detail(detail);
        return match view.release_command {
            Some(instance) => error.with_hint(format!(
                "fix the release command, then deploy again; see its logs with: \
                 kiln logs --env {} --instance {instance}",
                target.env
            )),
            None => error.with_hint("fix the release command, then deploy again"),
        };
    }

    let Some((instance, why)) = &view.failed_instance else {
        return error.with_hint(format!(
            "see what happened with: kiln events --app {} --env {}",
            target.app, target.env
        ));
    };
    let mut detail = format!("instance {instance} failed: {why}");
    let query = [
        ("instance", instance.to_string()),
        ("limit", FAILURE_LOG_LINES.to_string()),
    ];
    if let Ok(page) = api
        .get_query::<LogPage>(&target.route(routes::LOGS), &query, Duration::ZERO)
        .await
        && !page.entries.is_empty()
    {
        detail.push_str("\nlast log lines:");
        for entry in &page.entries {
            detail.push_str(&format!("\n  | {}", entry.line));
        }
    }
    error = error.with_detail(detail);
    error.with_hint(format!(
        "see more with: kiln logs --env {} --instance {instance}",
        target.env
    ))
}

#[cfg(test)]
mod tests {
    use kiln_api::{DeployStrategy, ImageRef, Release, ReleaseSpec};
    use kiln_core::{DeployId, EnvId, HostId, ReleaseId};
    use time::OffsetDateTime;

    use super::*;

    fn created() -> CreatedDeploy {
        let env_id = EnvId::new();
        let release = Release {
            id: ReleaseId::new(),
            env_id,
            version: 2,
            image: ImageRef {
                reference: "registry.test/app:2".to_owned(),
                digest: format!("sha256:{}", "a".repeat(64)),
            },
            spec: ReleaseSpec {
                processes: BTreeMap::new(),
                services: Vec::new(),
                env: BTreeMap::new(),
                volumes: Vec::new(),
                strategy: DeployStrategy::Rolling,
                max_surge: 1,
                kill_signal: "SIGTERM".to_owned(),
                kill_timeout_secs: 30,
                startup_scripts: Vec::new(),
                release_command: Some(vec!["/app/migrate".to_owned()]),
                release_command_limits: None,
            },
            config_version: 1,
            rollback_of: None,
            description: String::new(),
            created_at: OffsetDateTime::UNIX_EPOCH,
        };
        CreatedDeploy {
            deploy: Deploy {
                id: DeployId::new(),
                env_id,
                release_id: release.id,
                previous_release_id: None,
                strategy: DeployStrategy::Rolling,
                state: DeployState::InProgress,
                failure: None,
                created_at: OffsetDateTime::UNIX_EPOCH,
                updated_at: OffsetDateTime::UNIX_EPOCH,
            },
            release,
            cursor: 0,
        }
    }

    fn step(created: &CreatedDeploy, step: &str, output: &[&str]) -> Event {
        Event::DeployStepCompleted {
            deploy_id: created.deploy.id,
            env_id: created.deploy.env_id,
            step: step.to_owned(),
            detail: "release command in instance x failed (exited with code 3)".to_owned(),
            output: output.iter().map(|line| (*line).to_owned()).collect(),
        }
    }

    #[test]
    fn release_command_failure_kept_after_undo() {
        let created = created();
        let mut view = View::default();
        let instance = InstanceId::new();
        let placed = Event::InstancePlaced {
            instance_id: instance,
            env_id: created.deploy.env_id,
            release_id: created.release.id,
            process: ProcessName::new(RELEASE_COMMAND_PROCESS).unwrap(),
            host_id: HostId::new(),
            ipv6: "fd00::2".parse().unwrap(),
            ipv4: "100.64.0.2".parse().unwrap(),
        };
        let line = view.apply(&created, &placed).unwrap();
        assert!(line.starts_with("running the release command"), "{line}");
        assert_eq!(view.summary(), "running the release command");

        let failed = step(
            &created,
            "failed:release-command",
            &["schema v7 is missing"],
        );
        let line = view.apply(&created, &failed).unwrap();
        assert!(line.starts_with("release command failed"), "{line}");
        assert!(line.ends_with("| schema v7 is missing"), "{line}");

        let stop = Event::InstanceStopRequested {
            instance_id: instance,
            env_id: created.deploy.env_id,
            host_id: HostId::new(),
            reason: "deploy".to_owned(),
        };
        assert_eq!(view.apply(&created, &stop), None);
        view.apply(&created, &step(&created, "undone:release-command", &[]));

        assert_eq!(
            view.release_command_result,
            Some((true, vec!["schema v7 is missing".to_owned()]))
        );
        assert!(view.new_instances.is_empty());
    }

    #[test]
    fn quiet_notice_names_missing_placement_then_progress() {
        let created = created();
        let mut view = View::default();
        let quiet = Duration::from_secs(30);

        let notice = view.quiet_notice(quiet, "staging");
        assert!(
            notice.starts_with("no instance placed yet after 30s"),
            "{notice}"
        );
        assert!(notice.contains("kiln hosts list"), "{notice}");

        let placed = Event::InstancePlaced {
            instance_id: InstanceId::new(),
            env_id: created.deploy.env_id,
            release_id: created.release.id,
            process: ProcessName::new("web").unwrap(),
            host_id: HostId::new(),
            ipv6: "fd00::3".parse().unwrap(),
            ipv4: "100.64.0.3".parse().unwrap(),
        };
        view.apply(&created, &placed);
        let notice = view.quiet_notice(quiet, "staging");
        assert_eq!(
            notice,
            "no progress for 30s (0/1 new instances healthy); see `kiln status --env staging`"
        );
    }
}
