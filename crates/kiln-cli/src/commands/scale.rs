//! `kiln scale web=3 worker=1`: instance counts per process type, without a new release.

use std::collections::BTreeMap;

use kiln_api::{Env, ScaleEnv, routes};
use kiln_core::ProcessName;

use crate::commands::EnvTarget;
use crate::error::{CliError, CliResult};
use crate::session::Session;

/// Maximum instances of one process type, the same as the server's limit, so the CLI rejects
/// what the server would reject before sending it.
// NOTE: a copy of `kiln_control::api::envs::MAX_INSTANCES_PER_PROCESS`; kiln-api does not
// export it and the CLI does not depend on the server crate. Keep the two equal.
const MAX_COUNT: u32 = 100;

/// Arguments of `kiln scale`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  kiln scale web=3 worker=1 --env prod\n  kiln scale worker=0 --env staging"
)]
pub(crate) struct Args {
    /// New counts as PROCESS=COUNT; process types not named keep their count
    #[arg(required = true, value_name = "PROCESS=COUNT")]
    counts: Vec<String>,
}

/// Sets the counts.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let counts = parse_counts(&args.counts)?;
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;

    let env: Env = api
        .put(
            &target.route(routes::ENV_SCALE),
            &ScaleEnv {
                counts: counts.clone(),
            },
        )
        .await?;

    if session.out.is_json() {
        return session.out.json(&env);
    }
    let text: Vec<String> = env
        .scale
        .iter()
        .map(|(process, count)| format!("{process}={count}"))
        .collect();
    session
        .out
        .line(&format!("Scaled {}: {}", target.label(), text.join(" ")))?;
    session.out.note(&format!(
        "Follow the change with: kiln status --env {}",
        target.env
    ));
    Ok(())
}

fn parse_counts(pairs: &[String]) -> CliResult<BTreeMap<ProcessName, u32>> {
    let mut counts = BTreeMap::new();
    for pair in pairs {
        let invalid = || {
            CliError::usage(format!("invalid count {pair:?}: expected PROCESS=COUNT")).with_hint(
                format!("write it like web=3, with a count from 0 to {MAX_COUNT}"),
            )
        };
        let (process, count) = pair.split_once('=').ok_or_else(invalid)?;
        let process =
            ProcessName::new(process).map_err(|error| CliError::usage(error.to_string()))?;
        let count: u32 = count.parse().map_err(|_| invalid())?;
        if count > MAX_COUNT {
            return Err(invalid());
        }
        if counts.insert(process.clone(), count).is_some() {
            return Err(
                CliError::usage(format!("process type {process} is named twice"))
                    .with_hint("name each process type once"),
            );
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn counts_parse() {
        let counts = parse_counts(&strings(&["web=3", "worker=0"])).unwrap();

        assert_eq!(counts.len(), 2);
        assert_eq!(counts[&ProcessName::new("web").unwrap()], 3);
    }

    #[test]
    fn counts_accept_server_maximum() {
        let counts = parse_counts(&strings(&["web=100"])).unwrap();

        assert_eq!(counts[&ProcessName::new("web").unwrap()], 100);
    }

    #[test]
    fn counts_reject_bad_input() {
        assert!(parse_counts(&strings(&["web"])).is_err());
        assert!(parse_counts(&strings(&["web=-1"])).is_err());
        assert!(parse_counts(&strings(&["web=101"])).is_err());
        assert!(parse_counts(&strings(&["Web=1"])).is_err());
        assert!(parse_counts(&strings(&["web=1", "web=2"])).is_err());
    }
}
