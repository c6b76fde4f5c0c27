//! Redaction of tokens and secret values before anything reaches `--verbose` output.
//!
//! Request and response bodies are JSON; every object member whose key is in
//! [`SENSITIVE_KEYS`] is replaced, at any depth, and so is `value` in the bodies of secrets
//! endpoints. Headers that carry credentials are replaced whole.

use serde_json::Value;

/// Placeholder printed in place of a redacted value.
pub(crate) const REDACTED: &str = "[redacted]";

/// JSON keys whose values are credentials wherever they appear.
const SENSITIVE_KEYS: [&str; 4] = ["token", "secret", "password", "plaintext"];

/// Header names whose values are credentials (compared case-insensitively).
const SENSITIVE_HEADERS: [&str; 4] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

/// Returns the header value to print: the scheme alone for credentials, else the value.
pub(crate) fn header_value(name: &str, value: &str) -> String {
    if !SENSITIVE_HEADERS
        .iter()
        .any(|sensitive| name.eq_ignore_ascii_case(sensitive))
    {
        return value.to_owned();
    }
    match value.split_once(' ') {
        Some((scheme, _)) => format!("{scheme} {REDACTED}"),
        None => REDACTED.to_owned(),
    }
}

/// Returns `body` with credentials replaced; `secrets_endpoint` also redacts `value` keys.
///
/// A body that is not JSON is replaced whole when it belongs to a secrets endpoint, since it
/// cannot be inspected.
pub(crate) fn body(body: &[u8], secrets_endpoint: bool) -> String {
    let Ok(mut json) = serde_json::from_slice::<Value>(body) else {
        if secrets_endpoint {
            return format!("{REDACTED} ({} bytes)", body.len());
        }
        return String::from_utf8_lossy(body).into_owned();
    };
    redact_value(&mut json, secrets_endpoint);
    json.to_string()
}

fn redact_value(value: &mut Value, secrets_endpoint: bool) {
    match value {
        Value::Object(members) => {
            for (key, member) in members.iter_mut() {
                let sensitive =
                    SENSITIVE_KEYS.contains(&key.as_str()) || (secrets_endpoint && key == "value");
                if sensitive && !member.is_null() {
                    *member = Value::String(REDACTED.to_owned());
                } else {
                    redact_value(member, secrets_endpoint);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                redact_value(item, secrets_endpoint);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_keeps_scheme_only() {
        assert_eq!(
            header_value("Authorization", "Bearer kiln_abc"),
            "Bearer [redacted]"
        );
        assert_eq!(
            header_value("accept", "application/json"),
            "application/json"
        );
    }

    #[test]
    fn token_redacted_at_any_depth() {
        let text = body(br#"{"items":[{"name":"ci","token":"kiln_abc"}]}"#, false);

        assert!(!text.contains("kiln_abc"), "{text}");
        assert!(text.contains(r#""token":"[redacted]""#), "{text}");
    }

    #[test]
    fn secret_value_redacted_on_secrets_endpoint() {
        let text = body(br#"{"value":"hunter2","name":"DB"}"#, true);

        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains(r#""name":"DB""#), "{text}");
    }

    #[test]
    fn config_value_kept_elsewhere() {
        let text = body(br#"{"value":"info"}"#, false);

        assert!(text.contains("info"), "{text}");
    }

    #[test]
    fn non_json_secret_body_hidden() {
        assert_eq!(body(b"hunter2", true), "[redacted] (7 bytes)");
    }
}
