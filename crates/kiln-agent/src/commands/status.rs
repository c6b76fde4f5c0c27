//! `kiln-agent status [--json]`: the instances of the agent on this host, from the status
//! snapshot the running agent writes after every reconcile pass.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use kiln_agent::config::AgentConfig;
use kiln_agent::status::AgentStatus;

/// Arguments of `kiln-agent status`.
#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    /// The agent's config file, for its state directory.
    #[arg(long, default_value = "/etc/kiln/agent.toml")]
    config: PathBuf,
    /// Print the status snapshot as JSON.
    #[arg(long)]
    json: bool,
}

/// Exit code when no agent has written a status snapshot yet.
const NO_STATUS: u8 = 3;

/// Prints the agent's instances.
pub(crate) async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let config = AgentConfig::load(&args.config)?;
    let path = config.state_dir.join("status.json");
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "no status at {}: the agent has not run with this state directory yet \
                 (start it with `kiln-agent run --config {}`)",
                path.display(),
                args.config.display()
            );
            return Ok(ExitCode::from(NO_STATUS));
        }
        Err(error) => {
            return Err(error).with_context(|| format!("failed to read {}", path.display()));
        }
    };
    let status: AgentStatus = serde_json::from_slice(&bytes)
        .with_context(|| format!("invalid status file {}", path.display()))?;

    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }

    let alive = std::path::Path::new(&format!("/proc/{}", status.pid)).exists();
    eprintln!(
        "agent pid {} ({}), control plane {}, cursor {}, snapshot {}",
        status.pid,
        if alive { "running" } else { "not running" },
        if status.control_plane_reachable {
            "reachable"
        } else {
            "unreachable"
        },
        status.cursor,
        status.time
    );
    println!(
        "{:<40} {:<10} {:<24} {:<8} {:<28} {:>8} {:>8}  DETAIL",
        "INSTANCE", "STATE", "ENV", "PROCESS", "IPV6", "UPTIME", "RESTARTS"
    );
    for instance in &status.instances {
        let state = if instance.crash_loop {
            "crash_loop".to_owned()
        } else {
            serde_json::to_value(instance.state)?
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        let uptime = instance
            .uptime_secs
            .map_or("-".to_owned(), |secs| format!("{secs}s"));
        println!(
            "{:<40} {:<10} {:<24} {:<8} {:<28} {:>8} {:>8}  {}",
            instance.id.to_string(),
            state,
            instance.env,
            instance.process,
            instance.ipv6.to_string(),
            uptime,
            instance.restarts,
            instance.detail.as_deref().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}
