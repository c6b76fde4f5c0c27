//! The command-line grammar: global flags and the tree of `noun verb` commands.
//!
//! Each leaf command's arguments live beside its code in `commands/`; this file only
//! assembles them, so `kiln --help` and the module tree read the same.

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::commands::{
    apply, apps, completion, config, deploy, envs, events, hosts, init, ips, login, logout, logs,
    plan, releases, restart, rollback, scale, secrets, status, tokens, whoami,
};
use crate::exit::ExitKind;

/// The environment variables `kiln --help` lists after the options.
const ENVIRONMENT_HELP: &str = "\
Environment:
  KILN_TOKEN       API token (overrides the context's token)
  KILN_API_URL     API base URL (same as --api-url)
  KILN_CONTEXT     context name (same as --context)
  KILN_ORG, KILN_APP, KILN_ENV
                   same as --org, --app, --env
  NO_COLOR         disable colour
  XDG_CONFIG_HOME  config directory; the file is $XDG_CONFIG_HOME/kiln/config.toml";

/// Examples `kiln --help` ends with.
const EXAMPLES_HELP: &str = "\
Examples:
  kiln login --api-url https://kiln.example.com
  kiln init --image registry.example.com/web:1.0
  kiln deploy --env prod";

/// Returns the full command grammar, with the environment variables, exit codes and examples
/// after the root help.
pub(crate) fn command() -> clap::Command {
    let mut exit_codes = String::from("Exit codes:");
    for kind in ExitKind::ALL {
        exit_codes.push_str(&format!("\n  {:<4} {}", kind.code(), kind.describe()));
    }
    Cli::command().after_help(format!(
        "{ENVIRONMENT_HELP}\n\n{exit_codes}\n\n{EXAMPLES_HELP}"
    ))
}

/// Deploy and run apps on Kiln.
///
/// Every command talks to kiln-control's API. Data goes to stdout (a table, or with --json
/// the API object); progress and notes go to stderr.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, propagate_version = true, max_term_width = 100)]
pub(crate) struct Cli {
    /// Options that every command accepts.
    #[command(flatten)]
    pub(crate) global: GlobalArgs,

    /// The command to run.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Flags accepted by every command.
#[derive(Debug, Clone, Args)]
pub(crate) struct GlobalArgs {
    /// Org to act in [default: the context's org]
    #[arg(
        long,
        global = true,
        env = "KILN_ORG",
        hide_env_values = true,
        value_name = "ORG"
    )]
    pub(crate) org: Option<String>,

    /// App to act on [default: `app` in ./kiln.toml]; login, logout, whoami, tokens and hosts
    /// ignore it
    #[arg(
        long,
        global = true,
        env = "KILN_APP",
        hide_env_values = true,
        value_name = "APP"
    )]
    pub(crate) app: Option<String>,

    /// Environment to act on, such as prod or staging; login, logout, whoami, tokens and
    /// hosts ignore it
    #[arg(
        long,
        global = true,
        env = "KILN_ENV",
        hide_env_values = true,
        value_name = "ENV"
    )]
    pub(crate) env: Option<String>,

    /// Print the API object as JSON on stdout (NDJSON for streams) and nothing else there
    #[arg(long, global = true)]
    pub(crate) json: bool,

    /// Log each HTTP request and response on stderr, with tokens and secrets redacted
    #[arg(long, short = 'v', global = true)]
    pub(crate) verbose: bool,

    /// Named context from the config file [default: the file's current context]
    #[arg(
        long,
        global = true,
        env = "KILN_CONTEXT",
        hide_env_values = true,
        value_name = "NAME"
    )]
    pub(crate) context: Option<String>,

    /// API base URL, overriding the context's
    #[arg(
        long,
        global = true,
        env = "KILN_API_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub(crate) api_url: Option<String>,
}

/// Every top-level command.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Store an API token for a control plane in a named context
    Login(login::Args),
    /// Remove the stored token of a context
    Logout(logout::Args),
    /// Show who the current token belongs to
    Whoami(whoami::Args),
    /// Write a commented kiln.toml in the current directory
    Init(init::Args),
    /// Create, list, show and destroy apps
    #[command(
        subcommand,
        after_help = "Examples:\n  kiln apps create web\n  kiln apps list\n  kiln apps show web --json"
    )]
    Apps(apps::Command),
    /// Create, list and destroy environments of an app
    #[command(
        subcommand,
        after_help = "Examples:\n  kiln envs create prod --app web\n  kiln envs list --app web"
    )]
    Envs(envs::Command),
    /// Deploy the image and kiln.toml to an environment and follow the rollout
    Deploy(deploy::Args),
    /// Show exactly what a deploy would do, as a plan that `kiln apply` runs
    Plan(plan::Args),
    /// Apply a plan made by `kiln plan`, unless the environment changed since
    Apply(apply::Args),
    /// Show an environment's current release, instances and routes
    Status(status::Args),
    /// List an environment's releases
    Releases(releases::Args),
    /// Roll an environment back to an earlier release
    Rollback(rollback::Args),
    /// Change instance counts per process type, without a new release
    Scale(scale::Args),
    /// Restart the instances of an environment, or of one process type
    Restart(restart::Args),
    /// Set, unset and list environment variables of an environment
    #[command(
        subcommand,
        after_help = "Examples:\n  kiln config set LOG_LEVEL=debug --env prod\n  kiln config list --env prod"
    )]
    Config(config::Command),
    /// Set, unset and list secrets of an environment (values are never shown)
    #[command(
        subcommand,
        after_help = "Examples:\n  kiln secrets set DATABASE_URL --env prod\n  kiln secrets list --env prod"
    )]
    Secrets(secrets::Command),
    /// Allocate, list and release dedicated IP addresses of an environment
    #[command(
        subcommand,
        after_help = "Examples:\n  kiln ips allocate-v4 --env prod\n  kiln ips list --env prod\n  kiln ips release 203.0.113.7 --env prod"
    )]
    Ips(ips::Command),
    /// Show recent logs of an environment, or follow them
    Logs(logs::Args),
    /// Show the audit trail of an org, app or environment
    Events(events::Args),
    /// Create, list and revoke API tokens of the org
    #[command(
        subcommand,
        after_help = "Examples:\n  kiln tokens create --name ci --expires-in 30d\n  kiln tokens list"
    )]
    Tokens(tokens::Command),
    /// List, cordon and drain hosts (admin)
    #[command(
        subcommand,
        after_help = "Examples:\n  kiln hosts list\n  kiln hosts drain host-3"
    )]
    Hosts(hosts::Command),
    /// Print a shell completion script
    Completion(completion::Args),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar_is_consistent() {
        command().debug_assert();
    }
}
