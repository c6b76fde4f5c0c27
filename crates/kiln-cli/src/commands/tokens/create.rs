//! `kiln tokens create --name NAME`.

use kiln_api::{CreateToken, CreatedToken, routes};

use crate::commands::route;
use crate::error::CliResult;
use crate::session::Session;

/// Arguments of `kiln tokens create`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  kiln tokens create --name ci --expires-in 30d
  KILN_TOKEN=$(kiln tokens create --name ci --json | jq -r .secret)")]
pub(crate) struct Args {
    /// Label of the token, such as ci or alice-laptop
    #[arg(long)]
    name: String,

    /// Lifetime, as a number with s, m, h or d (30d); without it the token never expires
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
    expires_in: Option<u64>,
}

/// Creates the token and prints its secret once.
pub(crate) async fn run(session: &mut Session, args: Args) -> CliResult {
    let org = session.org()?;
    let api = session.api()?;

    let created: CreatedToken = api
        .post(
            &route(routes::TOKENS, &[("org", org.as_str())]),
            &CreateToken {
                name: args.name,
                expires_in_secs: args.expires_in,
            },
        )
        .await?;

    if session.out.is_json() {
        return session.out.json(&created);
    }
    // The secret is the command's output, so it goes to stdout alone on its line, where
    // `$(kiln tokens create ...)` captures it; everything else goes to stderr.
    session.out.note(&format!(
        "Created token {} ({}). Its secret is shown once:",
        created.token.name, created.token.id
    ));
    session.out.line(&created.secret)?;
    Ok(())
}

/// Parses `90s`, `15m`, `12h` or `30d` into seconds; the error is clap's value message.
pub(crate) fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let invalid = || "expected a number followed by s, m, h or d, such as 30d".to_owned();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(invalid)?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(invalid()),
    };
    let seconds = number.checked_mul(scale).ok_or_else(invalid)?;
    if seconds == 0 {
        return Err(invalid());
    }
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("90s").unwrap(), 90);
        assert_eq!(parse_duration_secs("15m").unwrap(), 900);
        assert_eq!(parse_duration_secs("30d").unwrap(), 2_592_000);
        assert!(parse_duration_secs("30").is_err());
        assert!(parse_duration_secs("d").is_err());
        assert!(parse_duration_secs("0h").is_err());
        assert!(parse_duration_secs("5w").is_err());
        assert!(parse_duration_secs("99999999999999999999d").is_err());
    }
}
