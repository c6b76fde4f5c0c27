//! `kiln secrets set NAME=VALUE | NAME --from-file F | NAME`.
//!
//! The value never reaches stdout, stderr, a hint or a `--verbose` log; only the name,
//! version and digest the API returns are printed.

use std::io::Read;
use std::path::PathBuf;

use kiln_api::{SecretMeta, SetSecret, routes};

use crate::commands::EnvTarget;
use crate::commands::config::check_var_name;
use crate::error::{CliError, CliResult};
use crate::session::Session;
use crate::terminal;

/// Largest secret value the API accepts, in bytes.
const MAX_SECRET_BYTES: usize = 64 * 1024;

/// Arguments of `kiln secrets set`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  kiln secrets set DATABASE_URL --env prod                  # prompts without echo
  kiln secrets set TLS_KEY --from-file key.pem --env prod
  printf %s \"$TOKEN\" | kiln secrets set API_TOKEN --env prod  # reads stdin
  kiln secrets set API_TOKEN=value --env prod                # value lands in shell history")]
pub(crate) struct Args {
    /// NAME=VALUE, or NAME alone to read the value from --from-file or stdin
    #[arg(value_name = "NAME[=VALUE]")]
    secret: String,

    /// Read the value from this file (used as is, up to 64 KiB of UTF-8)
    #[arg(long, value_name = "FILE")]
    from_file: Option<PathBuf>,
}

/// Sets the secret and prints its new version.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let (name, value) = read_value(&args)?;
    check_var_name("secret", &name)?;
    if value.len() > MAX_SECRET_BYTES {
        return Err(CliError::usage(format!(
            "secret {name} is {} bytes, the maximum is {MAX_SECRET_BYTES}",
            value.len()
        ))
        .with_hint("store large files elsewhere and keep only a reference or key in the secret"));
    }
    let target = EnvTarget::from_session(session)?;
    let api = session.api()?;

    let meta: SecretMeta = api
        .put(
            &target.route_with(routes::SECRET, &[("name", name.as_str())]),
            &SetSecret { value },
        )
        .await?;

    if session.out.is_json() {
        return session.out.json(&meta);
    }
    session.out.line(&format!(
        "Set secret {} on {} (version {}, digest {})",
        meta.name,
        target.label(),
        meta.version,
        meta.digest
    ))?;
    session
        .out
        .note("Running instances keep the old value until the next deploy: kiln deploy");
    Ok(())
}

/// Returns the name and value from whichever source the arguments name.
fn read_value(args: &Args) -> CliResult<(String, String)> {
    if let Some((name, value)) = args.secret.split_once('=') {
        if args.from_file.is_some() {
            return Err(CliError::usage(format!(
                "secret {name}: both a value and --from-file were given"
            ))
            .with_hint("give the value one way: NAME=VALUE, NAME --from-file FILE, or NAME with the value on stdin"));
        }
        return Ok((name.to_owned(), value.to_owned()));
    }

    let name = args.secret.clone();
    if let Some(path) = &args.from_file {
        let bytes = std::fs::read(path).map_err(|error| {
            CliError::failure(format!("cannot read secret {name} from {}", path.display()))
                .with_source(error)
        })?;
        let value = String::from_utf8(bytes).map_err(|_| {
            CliError::usage(format!(
                "secret {name}: {} is not UTF-8 text",
                path.display()
            ))
            .with_hint("encode binary data first, for example with base64")
        })?;
        return Ok((name, value));
    }

    if terminal::stdin_is_terminal() {
        let value = terminal::prompt_hidden(
            &format!("value of secret {name}"),
            "--from-file FILE or pipe the value on stdin",
        )?;
        return Ok((name, value));
    }

    let mut value = String::new();
    std::io::stdin()
        .take(MAX_SECRET_BYTES as u64 + 1)
        .read_to_string(&mut value)
        .map_err(|error| {
            CliError::failure(format!("cannot read secret {name} from stdin"))
                .with_source(error)
                .with_hint("pipe UTF-8 text, or use --from-file FILE")
        })?;
    // `echo value |` adds one newline that is not part of the value.
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    if value.is_empty() {
        return Err(CliError::usage(format!("secret {name}: stdin was empty"))
            .with_hint("pipe the value on stdin, or use NAME=VALUE or --from-file FILE"));
    }
    Ok((name, value))
}
