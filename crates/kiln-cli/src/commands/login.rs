//! `kiln login`: verify a token against a control plane and store it in a named context.

use std::io::Read;

use kiln_api::{WhoAmI, routes};
use kiln_core::OrgName;
use serde::Serialize;

use crate::config::Context;
use crate::error::{CliError, CliResult};
use crate::exit::ExitKind;
use crate::http::Http;
use crate::session::Session;
use crate::terminal;

/// Arguments of `kiln login`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
The token comes from --token, --token-stdin, KILN_TOKEN, or a prompt when stdin is a
terminal. The context (default: the current one, else \"default\") is saved in
$XDG_CONFIG_HOME/kiln/config.toml, written with mode 0600, and becomes the current context.

Examples:
  kiln login --api-url https://kiln.example.com          # prompts for the token
  kiln login --context staging --api-url https://kiln-staging.example.com
  printf %s \"$TOKEN\" | kiln login --api-url URL --token-stdin")]
pub(crate) struct Args {
    /// The API token (visible in shell history and `ps`; prefer the prompt or --token-stdin)
    #[arg(long, value_name = "TOKEN", conflicts_with = "token_stdin")]
    token: Option<String>,

    /// Read the API token from stdin
    #[arg(long)]
    token_stdin: bool,
}

/// `--json` output of `kiln login`.
#[derive(Debug, Serialize)]
struct LoginResult<'a> {
    context: &'a str,
    api_url: &'a str,
    org: Option<&'a str>,
    whoami: &'a WhoAmI,
}

/// Verifies the token with `GET /v1/whoami`, then saves the context.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let context_name = session.resolved().context.clone();
    let stored = session.config().contexts.get(&context_name).cloned();
    let api_url = session
        .global
        .api_url
        .clone()
        .or_else(|| stored.as_ref().map(|c| c.api_url.clone()))
        .ok_or_else(|| {
            CliError::usage(format!("no API URL for context {context_name:?}"))
                .with_hint("pass --api-url URL, such as --api-url https://kiln.example.com")
        })?;
    let token = read_token(&args)?;

    let http = Http::new(&api_url, Some(token.clone()), session.global.verbose)?;
    let whoami: WhoAmI = http.get(routes::WHOAMI).await.map_err(|error| {
        if error.kind() == ExitKind::Auth {
            error.with_hint(
                "the token was rejected; check it, or ask an org admin for a new one (the first \
                 admin token is in the output of `kiln-control bootstrap`)",
            )
        } else {
            error
        }
    })?;

    let org = match session
        .global
        .org
        .clone()
        .or_else(|| whoami.org_name.clone())
    {
        Some(org) => Some(
            OrgName::new(org)
                .map_err(|error| CliError::usage(error.to_string()).with_hint("check --org"))?
                .to_string(),
        ),
        None => stored.as_ref().and_then(|c| c.org.clone()),
    };

    let mut config = session.config().clone();
    config.contexts.insert(
        context_name.clone(),
        Context {
            api_url: api_url.clone(),
            token: Some(token),
            org: org.clone(),
        },
    );
    config.current_context = Some(context_name.clone());
    config.save(session.config_path())?;

    if session.out.is_json() {
        return session.out.json(&LoginResult {
            context: &context_name,
            api_url: &api_url,
            org: org.as_deref(),
            whoami: &whoami,
        });
    }
    let org_text = org.map_or_else(|| "no default org".to_owned(), |o| format!("org {o}"));
    session.out.line(&format!(
        "Logged in to {api_url} with token {} ({org_text}); context {context_name:?} saved to {}",
        whoami.token.name,
        session.config_path().display()
    ))
}

fn read_token(args: &Args) -> CliResult<String> {
    if let Some(token) = &args.token {
        return non_empty(token.clone());
    }
    if args.token_stdin {
        let mut token = String::new();
        std::io::stdin()
            .take(64 * 1024)
            .read_to_string(&mut token)
            .map_err(|error| {
                CliError::failure("cannot read the token from stdin").with_source(error)
            })?;
        return non_empty(token.trim().to_owned());
    }
    if let Ok(token) = std::env::var("KILN_TOKEN")
        && !token.is_empty()
    {
        return Ok(token);
    }
    let token = terminal::prompt_hidden(
        "API token",
        "--token-stdin, --token TOKEN or set KILN_TOKEN",
    )?;
    non_empty(token.trim().to_owned())
}

fn non_empty(token: String) -> CliResult<String> {
    if token.is_empty() {
        return Err(CliError::usage("the API token is empty").with_hint(
            "pass the token an administrator gave you, or one from `kiln tokens create`",
        ));
    }
    Ok(token)
}
