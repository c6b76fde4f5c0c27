//! Human-written units of the manifest: durations (`"30s"`, `"1m30s"`) and sizes (`"512MiB"`).
//!
//! These parsers only look at the text. Range checks belong to the field being read, because
//! the allowed range differs per key (a health-check timeout versus a release-command timeout).

use std::fmt::Write as _;
use std::time::Duration;

/// Error for a duration or size string that does not parse. Its text is a full sentence for
/// the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnitError(String);

const DURATION_UNITS: [(&str, u64); 4] = [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)];

/// Parses a duration such as `"500ms"`, `"30s"`, `"2m"`, `"1h"` or `"1m30s"`.
///
/// Each part is a whole number followed by one of `ms`, `s`, `m`, `h`. A bare number is
/// rejected because `30` could mean seconds or milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    if text.is_empty() {
        return Err(UnitError("the duration is empty".to_owned()));
    }
    if text.trim() != text || text.contains(' ') {
        return Err(UnitError(
            "the duration contains spaces; write it without them, such as \"1m30s\"".to_owned(),
        ));
    }

    let mut total_ms: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (digits, after_digits) = rest.split_at(digits_end);
        if digits.is_empty() {
            return Err(UnitError(format!(
                "expected a number before {after_digits:?}; write a number and a unit, such as \"30s\""
            )));
        }
        if after_digits.starts_with('.') {
            return Err(UnitError(
                "fractions are not allowed; use a smaller unit, such as \"1500ms\" for 1.5 seconds"
                    .to_owned(),
            ));
        }

        let unit_end = after_digits
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after_digits.len());
        let (unit, after_unit) = after_digits.split_at(unit_end);
        if unit.is_empty() {
            return Err(UnitError(format!(
                "the number {digits} has no unit; add one, such as \"{digits}s\" (units: ms, s, m, h)"
            )));
        }
        let Some((_, unit_ms)) = DURATION_UNITS.iter().find(|(name, _)| *name == unit) else {
            return Err(UnitError(format!(
                "unknown unit {unit:?}; use ms, s, m or h, such as \"30s\" or \"2m\""
            )));
        };

        let part_ms = digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(*unit_ms))
            .and_then(|ms| total_ms.checked_add(ms));
        let Some(sum) = part_ms else {
            return Err(UnitError("the duration is too large".to_owned()));
        };
        total_ms = sum;
        rest = after_unit;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Formats a duration in the form [`parse_duration`] reads, with the largest units first
/// (`90s` becomes `"1m30s"`). Sub-millisecond parts are dropped.
pub fn format_duration(duration: Duration) -> String {
    let mut ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return "0s".to_owned();
    }

    let mut text = String::new();
    for (name, unit_ms) in DURATION_UNITS.iter().rev() {
        if ms >= *unit_ms {
            let _ = write!(text, "{}{name}", ms / unit_ms);
            ms %= unit_ms;
        }
    }
    text
}

const SIZE_UNITS: [(&str, u64); 3] = [("MiB", 1), ("GiB", 1024), ("TiB", 1024 * 1024)];

/// Parses a size such as `"512MiB"`, `"2GiB"` or `"1TiB"` into MiB.
///
/// Only binary units are accepted: `"1GB"` is rejected with a hint, because silently reading
/// it as GiB or as 10^9 bytes would each surprise half of the readers.
pub fn parse_size_mib(text: &str) -> Result<u64, UnitError> {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    let unit = unit.trim_start();

    if digits.is_empty() {
        return Err(UnitError(
            "expected a number followed by MiB, GiB or TiB, such as \"512MiB\"".to_owned(),
        ));
    }
    if unit.starts_with('.') {
        return Err(UnitError(
            "fractions are not allowed; use a smaller unit, such as \"1536MiB\" for 1.5 GiB"
                .to_owned(),
        ));
    }
    if unit.is_empty() {
        return Err(UnitError(format!(
            "the number {digits} has no unit; write \"{digits}MiB\" or give an integer number of MiB"
        )));
    }
    let Some((_, factor)) = SIZE_UNITS.iter().find(|(name, _)| *name == unit) else {
        let hint = match unit.to_ascii_uppercase().as_str() {
            "M" | "MB" => "; write MiB (1 MiB = 1,048,576 bytes)",
            "G" | "GB" => "; write GiB (1 GiB = 1024 MiB)",
            "T" | "TB" => "; write TiB (1 TiB = 1024 GiB)",
            _ => "",
        };
        return Err(UnitError(format!(
            "unknown unit {unit:?}; use MiB, GiB or TiB{hint}"
        )));
    };

    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(*factor))
        .ok_or_else(|| UnitError("the size is too large".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_accepts_each_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn duration_accepts_compound_forms() {
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse_duration("1h2m3s4ms"),
            Ok(Duration::from_millis(3_723_004))
        );
    }

    #[test]
    fn duration_rejects_with_reason() {
        let cases = [
            ("", "empty"),
            ("30", "has no unit; add one, such as \"30s\""),
            ("30sec", "unknown unit \"sec\""),
            ("1.5s", "fractions are not allowed"),
            ("s", "expected a number before \"s\""),
            ("-1s", "expected a number before \"-1s\""),
            ("1 m", "contains spaces"),
            (" 1m", "contains spaces"),
            ("99999999999999999999h", "too large"),
            ("5124095576030432h", "too large"),
        ];
        for (input, expected) in cases {
            let message = parse_duration(input).unwrap_err().to_string();
            assert!(message.contains(expected), "{input:?}: {message}");
        }
    }

    #[test]
    fn duration_formats_back_to_parseable_text() {
        for text in ["0s", "500ms", "30s", "1m30s", "2h", "1h1ms"] {
            let duration = parse_duration(text).unwrap();
            assert_eq!(format_duration(duration), text);
        }
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
    }

    #[test]
    fn size_accepts_binary_units() {
        assert_eq!(parse_size_mib("512MiB"), Ok(512));
        assert_eq!(parse_size_mib("2GiB"), Ok(2048));
        assert_eq!(parse_size_mib("1TiB"), Ok(1_048_576));
        assert_eq!(parse_size_mib("1 GiB"), Ok(1024));
    }

    #[test]
    fn size_rejects_with_reason() {
        let cases = [
            ("1GB", "write GiB"),
            ("512M", "write MiB"),
            ("1.5GiB", "fractions are not allowed"),
            ("1024", "has no unit"),
            ("GiB", "expected a number"),
            ("1kb", "unknown unit \"kb\"; use MiB, GiB or TiB"),
            ("99999999999999999999GiB", "too large"),
        ];
        for (input, expected) in cases {
            let message = parse_size_mib(input).unwrap_err().to_string();
            assert!(message.contains(expected), "{input:?}: {message}");
        }
    }
}
