//! `kiln logs`: recent log lines of an environment, or a live tail with `-f`.

use std::time::Duration;

use kiln_api::{LogEntry, LogPage, LogStream, routes};
use kiln_core::{InstanceId, ProcessName};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::commands::{EnvTarget, format_time};
use crate::error::{CliError, CliResult};
use crate::exit::ExitKind;
use crate::output::Style;
use crate::session::Session;

/// Seconds one long poll waits on the server while following.
const FOLLOW_WAIT_SECS: u64 = 30;

/// Arguments of `kiln logs`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  kiln logs --env prod
  kiln logs -f --env prod --process web
  kiln logs --env prod --since 15m --json     # one JSON object per line")]
pub(crate) struct Args {
    /// Keep waiting for new lines
    #[arg(long, short = 'f')]
    follow: bool,

    /// Only lines of this process type
    #[arg(long, value_name = "PROCESS")]
    process: Option<String>,

    /// Only lines of this instance (an id from `kiln status`)
    #[arg(long, value_name = "ID")]
    instance: Option<String>,

    /// Only lines newer than this: a duration (90s, 15m, 2h, 1d) or an RFC 3339 time
    #[arg(long, value_name = "WHEN")]
    since: Option<String>,

    /// At most this many lines before following
    #[arg(long, default_value_t = 200)]
    limit: u32,
}

/// Prints recent lines, then follows with `-f`.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let mut query = Vec::new();
    if let Some(process) = &args.process {
        let process = ProcessName::new(process.clone())
            .map_err(|error| CliError::usage(error.to_string()))?;
        query.push(("process", process.to_string()));
    }
    if let Some(instance) = &args.instance {
        let instance: InstanceId = instance.parse().map_err(|error: kiln_core::ids::IdError| {
            CliError::usage(error.to_string()).with_hint("copy the id from `kiln status`")
        })?;
        query.push(("instance", instance.to_string()));
    }
    if let Some(since) = &args.since {
        let since = parse_since(since, OffsetDateTime::now_utc())?;
        let text = since
            .format(&Rfc3339)
            .map_err(|error| CliError::failure("cannot format --since").with_source(error))?;
        query.push(("since", text));
    }
    query.push(("limit", args.limit.to_string()));
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;
    let path = target.route(routes::LOGS);

    let page: LogPage = api.get_query(&path, &query, Duration::ZERO).await?;
    if !args.follow {
        if session.out.is_json() {
            return session.out.json(&page);
        }
        return print_entries(session, &page.entries);
    }
    print_stream(session, &page.entries)?;

    let mut cursor = page.cursor;
    let mut interrupt = crate::terminal::interrupt_signal()?;
    loop {
        let mut follow_query: Vec<(&str, String)> = query
            .iter()
            .filter(|(key, _)| *key != "since")
            .cloned()
            .collect();
        follow_query.push(("after", cursor.to_string()));
        follow_query.push(("wait", FOLLOW_WAIT_SECS.to_string()));

        let page: LogPage = tokio::select! {
            page = api.get_query(&path, &follow_query, Duration::from_secs(FOLLOW_WAIT_SECS)) => page?,
            _ = interrupt.recv() => {
                return Err(CliError::new(ExitKind::Interrupted, "stopped following logs")
                    .with_hint(format!("follow again with: kiln logs -f --env {}", target.env)));
            }
        };
        print_stream(session, &page.entries)?;
        cursor = page.cursor.max(cursor);
    }
}

fn print_stream(session: &Session, entries: &[LogEntry]) -> CliResult {
    if session.out.is_json() {
        for entry in entries {
            session.out.json_line(entry)?;
        }
        return Ok(());
    }
    print_entries(session, entries)
}

fn print_entries(session: &Session, entries: &[LogEntry]) -> CliResult {
    for entry in entries {
        session.out.line(&format_entry(session, entry))?;
    }
    Ok(())
}

/// One human line: time, process and instance, then the text.
pub(crate) fn format_entry(session: &Session, entry: &LogEntry) -> String {
    // The workload's own output is the common case and stays unmarked. Lines from the guest's
    // console and from the agent name their source, so they are not mistaken for the app's.
    let mut source = format!("{}[{}]", entry.process, short_instance(entry.instance_id));
    match entry.stream {
        LogStream::Stdout | LogStream::Stderr => {}
        LogStream::Console => source.push_str(" console"),
        LogStream::Agent => source.push_str(" agent"),
    }
    format!(
        "{} {} {}",
        session.out.paint(Style::Dim, &format_time(entry.time)),
        session.out.paint(Style::Bold, &source),
        entry.line
    )
}

/// The last 8 hex digits of an instance id, enough to tell a deploy's instances apart.
fn short_instance(id: InstanceId) -> String {
    let text = id.to_string();
    text.get(text.len().saturating_sub(8)..)
        .unwrap_or(&text)
        .to_owned()
}

/// Parses `--since`: a duration before `now`, or an RFC 3339 time.
fn parse_since(text: &str, now: OffsetDateTime) -> CliResult<OffsetDateTime> {
    if let Ok(time) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(time);
    }
    let seconds = crate::commands::tokens::create::parse_duration_secs(text).map_err(|_| {
        CliError::usage(format!("invalid --since {text:?}"))
            .with_hint("use a duration such as 15m or 2h, or a time such as 2026-12-04T10:00:00Z")
    })?;
    let seconds = i64::try_from(seconds).unwrap_or(i64::MAX);
    Ok(now.saturating_sub(time::Duration::seconds(seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_duration_and_time() {
        let now = OffsetDateTime::parse("2026-12-04T12:00:00Z", &Rfc3339).unwrap();

        assert_eq!(
            parse_since("15m", now).unwrap(),
            OffsetDateTime::parse("2026-12-04T11:45:00Z", &Rfc3339).unwrap()
        );
        assert_eq!(
            parse_since("2026-12-01T00:00:00Z", now).unwrap(),
            OffsetDateTime::parse("2026-12-01T00:00:00Z", &Rfc3339).unwrap()
        );
        assert!(parse_since("yesterday", now).is_err());
    }
}
