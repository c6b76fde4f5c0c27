//! `kiln events`: the audit trail of an org, app or environment (the event log, which records
//! every change with its actor).

use std::time::Duration;

use kiln_api::{Event, EventEnvelope, EventPage, routes};

use crate::commands::{format_time, route};
use crate::error::{CliError, CliResult};
use crate::exit::ExitKind;
use crate::output::Table;
use crate::session::Session;

/// Seconds one long poll waits on the server while following.
const FOLLOW_WAIT_SECS: u64 = 30;

/// Arguments of `kiln events`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
The scope is the org, narrowed to an app by --app (or KILN_APP) and to an environment by
--env. With --env the app is --app, KILN_APP or `app` in ./kiln.toml, as for other commands;
without --env or --app, `kiln events` shows the whole org even in a project directory.

Examples:
  kiln events
  kiln events --app web --env prod --limit 20
  kiln events -f --json          # one event per line as it happens")]
pub(crate) struct Args {
    /// Show events after this sequence number
    #[arg(long, value_name = "SEQ")]
    after: Option<u64>,

    /// Show at most this many events
    #[arg(long, default_value_t = 100)]
    limit: u32,

    /// Keep waiting for new events (NDJSON with --json)
    #[arg(long, short = 'f')]
    follow: bool,
}

/// Prints events, then follows new ones with `-f`.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let org = session.org()?;
    let app = match (&session.global.app, &session.global.env) {
        (None, None) => None,
        _ => Some(session.app()?.to_string()),
    };
    let env = match &session.global.env {
        Some(_) => Some(session.env()?.to_string()),
        None => None,
    };
    let api = session.api()?;
    let path = route(routes::ORG_EVENTS, &[("org", org.as_str())]);

    let mut cursor = args.after.unwrap_or(0);
    let mut first = true;
    let mut interrupt = crate::terminal::interrupt_signal()?;
    loop {
        let wait = if first || !args.follow {
            0
        } else {
            FOLLOW_WAIT_SECS
        };
        let mut query = vec![
            ("after", cursor.to_string()),
            ("limit", args.limit.to_string()),
            ("wait", wait.to_string()),
        ];
        if let Some(app) = &app {
            query.push(("app", app.clone()));
        }
        if let Some(env) = &env {
            query.push(("env", env.clone()));
        }

        let page: EventPage = tokio::select! {
            page = api.get_query(&path, &query, Duration::from_secs(wait)) => page?,
            _ = interrupt.recv() => {
                return Err(CliError::new(ExitKind::Interrupted, "stopped following events")
                    .with_hint(format!("continue from here with: kiln events -f --after {cursor}")));
            }
        };

        if !args.follow {
            if session.out.is_json() {
                return session.out.json(&page);
            }
            return print_table(session, &page.events);
        }
        for envelope in &page.events {
            if session.out.is_json() {
                session.out.json_line(envelope)?;
            } else {
                session.out.line(&format_line(envelope))?;
            }
        }
        cursor = page.cursor.max(cursor);
        first = false;
    }
}

fn print_table(session: &Session, events: &[EventEnvelope]) -> CliResult {
    if events.is_empty() {
        return session.out.line("No events.");
    }
    let mut table = Table::new(&["SEQ", "TIME", "ACTOR", "EVENT", "SUMMARY"]);
    for envelope in events {
        table.row([
            envelope.seq.to_string(),
            format_time(envelope.time),
            envelope.actor.clone(),
            envelope.event.type_name().to_owned(),
            summarize(&envelope.event),
        ]);
    }
    session.out.table(&table)
}

fn format_line(envelope: &EventEnvelope) -> String {
    format!(
        "{}  {}  {}  {}  {}",
        envelope.seq,
        format_time(envelope.time),
        envelope.actor,
        envelope.event.type_name(),
        summarize(&envelope.event)
    )
}

/// A short description of the event's data for the table (ids are in `--json`).
pub(crate) fn summarize(event: &Event) -> String {
    match event {
        Event::OrgCreated { name, .. } => format!("org {name}"),
        Event::TokenCreated { name, kind, .. } => format!("{} token {name}", kind.as_str()),
        Event::TokenRevoked { token_id } => format!("token {token_id}"),
        Event::AppCreated { name, .. } => format!("app {name}"),
        Event::AppDeleted { app_id } => format!("app {app_id}"),
        Event::EnvCreated { name, hostname, .. } => format!("env {name} at {hostname}"),
        Event::EnvDeleted { env_id } => format!("env {env_id}"),
        Event::EnvScaled { counts, .. } => counts
            .iter()
            .map(|(process, count)| format!("{process}={count}"))
            .collect::<Vec<_>>()
            .join(" "),
        Event::ConfigChanged {
            version,
            set,
            unset,
            ..
        } => {
            let mut names: Vec<String> = set.keys().map(|k| format!("+{k}")).collect();
            names.extend(unset.iter().map(|k| format!("-{k}")));
            format!("config v{version}: {}", names.join(" "))
        }
        Event::SecretSet { name, version, .. } => format!("secret {name} v{version}"),
        Event::SecretUnset { name, .. } => format!("secret {name} removed"),
        Event::ReleaseCreated { release } => {
            format!("v{} {}", release.version, release.image.reference)
        }
        Event::DeployRequested { deploy_id, .. } => format!("deploy {deploy_id}"),
        Event::DeployStateChanged {
            deploy_id,
            state,
            failure,
            ..
        } => match failure {
            Some(failure) => format!("deploy {deploy_id} {state:?}: {failure}"),
            None => format!("deploy {deploy_id} {state:?}"),
        },
        Event::DeployStepCompleted { step, detail, .. } => format!("{step}: {detail}"),
        Event::EnvReleaseChanged { release_id, .. } => format!("release {release_id}"),
        Event::InstancePlaced {
            instance_id,
            process,
            host_id,
            ..
        } => format!("{process} {instance_id} on {host_id}"),
        Event::InstanceStateChanged {
            instance_id,
            state,
            detail,
            ..
        } => match detail {
            Some(detail) => format!("{instance_id} {state:?}: {detail}"),
            None => format!("{instance_id} {state:?}"),
        },
        Event::InstanceStopRequested {
            instance_id,
            reason,
            ..
        } => format!("{instance_id}: {reason}"),
        Event::InstanceRemoved { instance_id, .. } => format!("{instance_id}"),
        Event::RoutesChanged { routes, .. } => format!("{} routes", routes.len()),
        Event::HostCreated { name, .. } => format!("host {name}"),
        Event::HostRegistered { host_id, .. }
        | Event::HostCordoned { host_id }
        | Event::HostUncordoned { host_id }
        | Event::HostDrainRequested { host_id }
        | Event::HostLost { host_id } => format!("host {host_id}"),
        Event::Ipv4AddressAllocated { address, pool, .. } => {
            format!("IPv4 {address} allocated from {pool} (billed)")
        }
        Event::Ipv4AddressReleased { address, .. } => format!("IPv4 {address} released"),
    }
}
