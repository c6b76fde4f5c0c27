//! One module per `noun verb` command; each has its `Args` (the clap grammar) and `run`.
//!
//! A command's `run` reads its inputs, calls the API, and then either prints the API object
//! with `--json` and returns, or formats it for people.

pub(crate) mod apply;
pub(crate) mod apps;
pub(crate) mod completion;
pub(crate) mod config;
pub(crate) mod deploy;
pub(crate) mod envs;
pub(crate) mod events;
pub(crate) mod hosts;
pub(crate) mod init;
pub(crate) mod ips;
pub(crate) mod login;
pub(crate) mod logout;
pub(crate) mod logs;
pub(crate) mod plan;
pub(crate) mod releases;
pub(crate) mod restart;
pub(crate) mod rollback;
pub(crate) mod scale;
pub(crate) mod secrets;
pub(crate) mod status;
pub(crate) mod tokens;
pub(crate) mod whoami;

use kiln_core::{AppName, EnvName, OrgName};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::cli::Command;
use crate::error::CliResult;
use crate::session::Session;

/// Runs one parsed command.
pub(crate) async fn run(session: &mut Session, command: Command) -> CliResult {
    match command {
        Command::Login(args) => login::run(session, args).await,
        Command::Logout(args) => logout::run(session, args),
        Command::Whoami(args) => whoami::run(session, args).await,
        Command::Init(args) => init::run(session, args),
        Command::Apps(command) => apps::run(session, command).await,
        Command::Envs(command) => envs::run(session, command).await,
        Command::Deploy(args) => deploy::run(session, args).await,
        Command::Plan(args) => plan::run(session, args).await,
        Command::Apply(args) => apply::run(session, args).await,
        Command::Status(args) => status::run(session, args).await,
        Command::Releases(args) => releases::run(session, args).await,
        Command::Rollback(args) => rollback::run(session, args).await,
        Command::Scale(args) => scale::run(session, args).await,
        Command::Restart(args) => restart::run(session, args).await,
        Command::Config(command) => config::run(session, command).await,
        Command::Secrets(command) => secrets::run(session, command).await,
        Command::Ips(command) => ips::run(session, command).await,
        Command::Logs(args) => logs::run(session, args).await,
        Command::Events(args) => events::run(session, args).await,
        Command::Tokens(command) => tokens::run(session, command).await,
        Command::Hosts(command) => hosts::run(session, command).await,
        Command::Completion(args) => completion::run(args),
    }
}

/// Fills a `kiln_api::routes` template such as `/v1/orgs/{org}/apps/{app}`.
///
/// Values are names, ids and numbers whose characters need no escaping in a path, except
/// host names, which are escaped here anyway.
pub(crate) fn route(template: &str, params: &[(&str, &str)]) -> String {
    let mut path = template.to_owned();
    for (name, value) in params {
        path = path.replace(&format!("{{{name}}}"), &escape_segment(value));
    }
    path
}

fn escape_segment(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The org, app and env an env-scoped command acts on.
#[derive(Debug, Clone)]
pub(crate) struct EnvTarget {
    /// The org.
    pub(crate) org: OrgName,
    /// The app.
    pub(crate) app: AppName,
    /// The environment.
    pub(crate) env: EnvName,
}

impl EnvTarget {
    /// Resolves the target from the session (flags, environment variables, ./kiln.toml).
    pub(crate) fn from_session(session: &Session) -> CliResult<Self> {
        Ok(Self {
            org: session.org()?,
            app: session.app()?,
            env: session.env()?,
        })
    }

    /// Fills a route template with this target's org, app and env.
    pub(crate) fn route(&self, template: &str) -> String {
        self.route_with(template, &[])
    }

    /// Fills a route template with this target and `extra` parameters.
    pub(crate) fn route_with(&self, template: &str, extra: &[(&str, &str)]) -> String {
        let mut params = vec![
            ("org", self.org.as_str()),
            ("app", self.app.as_str()),
            ("env", self.env.as_str()),
        ];
        params.extend_from_slice(extra);
        route(template, &params)
    }

    /// `APP/ENV`, as messages name an environment.
    pub(crate) fn label(&self) -> String {
        format!("{}/{}", self.app, self.env)
    }
}

/// Formats a time as RFC 3339 in UTC, seconds precision.
pub(crate) fn format_time(time: OffsetDateTime) -> String {
    let time = time
        .to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(time);
    time.format(&Rfc3339).unwrap_or_else(|_| time.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_fills_and_escapes() {
        assert_eq!(
            route(
                "/v1/orgs/{org}/apps/{app}",
                &[("org", "acme"), ("app", "web")]
            ),
            "/v1/orgs/acme/apps/web"
        );
        assert_eq!(
            route("/v1/hosts/{host}", &[("host", "a b/c")]),
            "/v1/hosts/a%20b%2Fc"
        );
    }
}
