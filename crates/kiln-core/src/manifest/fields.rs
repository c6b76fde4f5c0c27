//! Typed reads of single TOML values, each recording a positioned error instead of failing.
//!
//! Every reader returns `None` after recording an error, so the caller keeps going and the
//! whole file is checked in one pass. Spans come from `toml_edit`'s `ImDocument`, which keeps
//! the byte range of every key and value.

use std::ops::Range;
use std::time::Duration;

use toml_edit::{Item, TableLike, Value};

use super::diagnostics::{Diagnostics, ErrorCode, Problem};
use super::units::{format_duration, parse_duration, parse_size_mib};

/// A value with the byte range of its text in the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Spanned<T> {
    pub(super) value: T,
    pub(super) span: Range<usize>,
}

/// A table (standard, dotted or inline) at a key path.
#[derive(Clone)]
pub(super) struct TableRef<'a> {
    pub(super) path: String,
    /// Span reported when a required key of this table is missing (the table's key).
    pub(super) anchor: Range<usize>,
    pub(super) inner: &'a dyn TableLike,
}

/// One key of a table and its item.
#[derive(Clone)]
pub(super) struct Field<'a> {
    pub(super) path: String,
    pub(super) key: &'a str,
    pub(super) key_span: Range<usize>,
    pub(super) item: &'a Item,
}

impl Field<'_> {
    /// Returns the span of the value, or of the key when the value is a table whose span
    /// would cover many lines.
    pub(super) fn value_span(&self) -> Range<usize> {
        match self.item {
            Item::Value(value) => value.span().unwrap_or_else(|| self.key_span.clone()),
            _ => self.key_span.clone(),
        }
    }
}

/// Appends `key` to a key path, quoting it when it is not a bare TOML key.
pub(super) fn join(path: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let key = if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}

impl<'a> TableRef<'a> {
    /// Returns the field `key`, if present.
    pub(super) fn get(&self, key: &str) -> Option<Field<'a>> {
        let (toml_key, item) = self.inner.get_key_value(key)?;
        if item.is_none() {
            return None;
        }
        Some(Field {
            path: join(&self.path, key),
            key: toml_key.get(),
            key_span: toml_key.span().unwrap_or_else(|| self.anchor.clone()),
            item,
        })
    }

    /// Returns every field, in file order.
    pub(super) fn fields(&self) -> Vec<Field<'a>> {
        self.inner
            .iter()
            .filter_map(|(key, _)| self.get(key))
            .collect()
    }

    /// Records an error for each key not in `allowed`, suggesting the closest allowed key.
    pub(super) fn reject_unknown(&self, diagnostics: &mut Diagnostics<'_>, allowed: &[&str]) {
        self.reject_unknown_except(diagnostics, allowed, &[]);
    }

    /// Like [`Self::reject_unknown`], but leaves the keys in `reported` alone because the
    /// caller reports them with a more specific message.
    pub(super) fn reject_unknown_except(
        &self,
        diagnostics: &mut Diagnostics<'_>,
        allowed: &[&str],
        reported: &[&str],
    ) {
        for field in self.fields() {
            if allowed.contains(&field.key) || reported.contains(&field.key) {
                continue;
            }
            let suggestion = closest(field.key, allowed)
                .map(|close| format!("did you mean `{close}`? "))
                .unwrap_or_default();
            diagnostics.push(
                field.key_span.clone(),
                Problem {
                    code: ErrorCode::UnknownKey,
                    key: field.path.clone(),
                    message: format!("unknown key `{}`", field.key),
                    help: format!("{suggestion}allowed keys here: {}", allowed.join(", ")),
                },
            );
        }
    }

    /// Records a missing-key error pointing at this table.
    pub(super) fn missing(&self, diagnostics: &mut Diagnostics<'_>, key: &str, help: &str) {
        diagnostics.push(
            self.anchor.clone(),
            Problem {
                code: ErrorCode::MissingKey,
                key: join(&self.path, key),
                message: format!("missing required key `{key}`"),
                help: help.to_owned(),
            },
        );
    }
}

/// Returns the allowed key closest to `key` by edit distance, if it is a likely typo.
fn closest<'k>(key: &str, allowed: &[&'k str]) -> Option<&'k str> {
    allowed
        .iter()
        .map(|candidate| (edit_distance(key, candidate), *candidate))
        .filter(|(distance, _)| *distance <= 2)
        .min()
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// Describes an item's TOML type with an article, for "expected X, found Y".
fn describe(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
        Item::Value(value) => describe_value(value),
    }
}

fn describe_value(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::InlineTable(_) => "an inline table",
    }
}

/// Records a wrong-type error for `field`.
pub(super) fn wrong_type(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
    expected: &str,
    help: &str,
) {
    diagnostics.push(
        field.value_span(),
        Problem {
            code: ErrorCode::WrongType,
            key: field.path.clone(),
            message: format!("expected {expected}, found {}", describe(field.item)),
            help: help.to_owned(),
        },
    );
}

/// Reads a table-valued field (a `[section]`, a dotted key or an inline table).
pub(super) fn table<'a>(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'a>,
    help: &str,
) -> Option<TableRef<'a>> {
    let Some(inner) = field.item.as_table_like() else {
        wrong_type(diagnostics, field, "a table", help);
        return None;
    };
    Some(TableRef {
        path: field.path.clone(),
        anchor: field.key_span.clone(),
        inner,
    })
}

/// Reads a list of tables, written as `[[key]]` sections or as an array of inline tables.
pub(super) fn table_list<'a>(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'a>,
    help: &str,
) -> Vec<TableRef<'a>> {
    let path_at = |index: usize| format!("{}[{index}]", field.path);
    match field.item {
        Item::ArrayOfTables(tables) => tables
            .iter()
            .enumerate()
            .map(|(index, table)| TableRef {
                path: path_at(index),
                anchor: table.span().map_or_else(
                    || field.key_span.clone(),
                    |span| diagnostics.first_line(span),
                ),
                inner: table as &dyn TableLike,
            })
            .collect(),
        Item::Value(Value::Array(array)) => {
            let mut tables = Vec::new();
            for (index, element) in array.iter().enumerate() {
                let span = element.span().unwrap_or_else(|| field.key_span.clone());
                let Some(inner) = element.as_inline_table() else {
                    diagnostics.push(
                        span,
                        Problem {
                            code: ErrorCode::WrongType,
                            key: path_at(index),
                            message: format!(
                                "expected an inline table, found {}",
                                describe_value(element)
                            ),
                            help: help.to_owned(),
                        },
                    );
                    continue;
                };
                tables.push(TableRef {
                    path: path_at(index),
                    anchor: span,
                    inner: inner as &dyn TableLike,
                });
            }
            tables
        }
        _ => {
            wrong_type(diagnostics, field, "an array of tables", help);
            Vec::new()
        }
    }
}

/// Reads a string.
pub(super) fn string(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
    help: &str,
) -> Option<Spanned<String>> {
    match field.item.as_str() {
        Some(text) => Some(Spanned {
            value: text.to_owned(),
            span: field.value_span(),
        }),
        None => {
            wrong_type(diagnostics, field, "a string", help);
            None
        }
    }
}

/// Reads a boolean.
pub(super) fn boolean(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
    help: &str,
) -> Option<bool> {
    let value = field.item.as_bool();
    if value.is_none() {
        wrong_type(diagnostics, field, "a boolean", help);
    }
    value
}

/// Records an out-of-range error.
pub(super) fn out_of_range(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
    message: String,
    help: String,
) {
    diagnostics.push(
        field.value_span(),
        Problem {
            code: ErrorCode::OutOfRange,
            key: field.path.clone(),
            message,
            help,
        },
    );
}

/// Reads an integer in `min..=max`. The `help` text states what is allowed and why.
pub(super) fn integer(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
    (min, max): (u32, u32),
    help: &str,
) -> Option<Spanned<u32>> {
    let Some(number) = field.item.as_integer() else {
        wrong_type(diagnostics, field, "an integer", help);
        return None;
    };
    if number < i64::from(min) || number > i64::from(max) {
        out_of_range(
            diagnostics,
            field,
            format!("{number} is outside the allowed range {min} to {max}"),
            help.to_owned(),
        );
        return None;
    }
    u32::try_from(number).ok().map(|value| Spanned {
        value,
        span: field.value_span(),
    })
}

/// Reads a size in MiB, written as an integer number of MiB or a string with a binary unit
/// (`"512MiB"`, `"2GiB"`), in `min..=max` MiB.
pub(super) fn size_mib(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
    (min, max): (u32, u32),
    help: &str,
) -> Option<u32> {
    let mib: i128 = match (field.item.as_integer(), field.item.as_str()) {
        (Some(number), _) => i128::from(number),
        (None, Some(text)) => match parse_size_mib(text) {
            Ok(mib) => i128::from(mib),
            Err(error) => {
                diagnostics.push(
                    field.value_span(),
                    Problem {
                        code: ErrorCode::InvalidSize,
                        key: field.path.clone(),
                        message: format!("invalid size {text:?}: {error}"),
                        help: help.to_owned(),
                    },
                );
                return None;
            }
        },
        (None, None) => {
            wrong_type(
                diagnostics,
                field,
                "an integer number of MiB or a size string",
                help,
            );
            return None;
        }
    };

    let written = field
        .item
        .as_value()
        .map_or_else(String::new, |value| value.to_string().trim().to_owned());
    if mib < i128::from(min) {
        out_of_range(
            diagnostics,
            field,
            format!("{written} is below the minimum of {min} MiB"),
            help.to_owned(),
        );
        return None;
    }
    if mib > i128::from(max) {
        out_of_range(
            diagnostics,
            field,
            format!("{written} is above the maximum of {max} MiB"),
            help.to_owned(),
        );
        return None;
    }
    u32::try_from(mib).ok()
}

/// Reads a duration string (`"30s"`, `"2m"`) in `min..=max`.
pub(super) fn duration(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
    (min, max): (Duration, Duration),
) -> Option<Spanned<Duration>> {
    let range_help = format!(
        "use a duration from {} to {}, written as a number and a unit (ms, s, m, h), such as \"30s\" or \"2m\"",
        format_duration(min),
        format_duration(max)
    );
    let Some(text) = field.item.as_str() else {
        let help = match field.item.as_integer() {
            Some(number) => format!(
                "a bare number has no unit; quote it with a unit, such as \"{number}s\"; {range_help}"
            ),
            None => range_help,
        };
        wrong_type(diagnostics, field, "a duration string", &help);
        return None;
    };

    let value = match parse_duration(text) {
        Ok(value) => value,
        Err(error) => {
            diagnostics.push(
                field.value_span(),
                Problem {
                    code: ErrorCode::InvalidDuration,
                    key: field.path.clone(),
                    message: format!("invalid duration {text:?}: {error}"),
                    help: range_help,
                },
            );
            return None;
        }
    };
    if value < min || value > max {
        out_of_range(
            diagnostics,
            field,
            format!("{text:?} is outside the allowed range"),
            range_help,
        );
        return None;
    }
    Some(Spanned {
        value,
        span: field.value_span(),
    })
}

/// Reads an array of strings, reporting elements of another type. Returns `None` when the
/// value is not an array or any element is not a string.
pub(super) fn string_list(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
    help: &str,
) -> Option<Vec<Spanned<String>>> {
    let (strings, complete) = string_items(diagnostics, field, help)?;
    complete.then_some(strings)
}

/// Reads the string elements of an array, reporting the others. Returns the strings and
/// whether every element was one, or `None` when the value is not an array.
pub(super) fn string_items(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
    help: &str,
) -> Option<(Vec<Spanned<String>>, bool)> {
    let Some(array) = field.item.as_array() else {
        wrong_type(diagnostics, field, "an array of strings", help);
        return None;
    };

    let mut strings = Vec::new();
    let mut complete = true;
    for (index, element) in array.iter().enumerate() {
        let span = element.span().unwrap_or_else(|| field.value_span());
        match element.as_str() {
            Some(text) => strings.push(Spanned {
                value: text.to_owned(),
                span,
            }),
            None => {
                complete = false;
                diagnostics.push(
                    span,
                    Problem {
                        code: ErrorCode::WrongType,
                        key: format!("{}[{index}]", field.path),
                        message: format!("expected a string, found {}", describe_value(element)),
                        help: help.to_owned(),
                    },
                );
            }
        }
    }
    Some((strings, complete))
}

/// Reads a command: a non-empty array of strings without NUL bytes whose first element (the
/// program) is not empty.
pub(super) fn command(diagnostics: &mut Diagnostics<'_>, field: &Field<'_>) -> Option<Vec<String>> {
    const HELP: &str = "write the argv as an array of strings, such as [\"/app/server\", \"--port\", \"8443\"]; no shell runs it, so use [\"/bin/sh\", \"-c\", \"...\"] for shell syntax";
    let args = string_list(diagnostics, field, HELP)?;

    let invalid = |message: String| Problem {
        code: ErrorCode::InvalidValue,
        key: field.path.clone(),
        message,
        help: HELP.to_owned(),
    };
    let Some(program) = args.first() else {
        diagnostics.push(
            field.value_span(),
            invalid("the command is empty".to_owned()),
        );
        return None;
    };
    if program.value.is_empty() {
        diagnostics.push(
            program.span.clone(),
            invalid("the program (first element) is empty".to_owned()),
        );
        return None;
    }
    if let Some(arg) = args.iter().find(|arg| arg.value.contains('\0')) {
        diagnostics.push(
            arg.span.clone(),
            invalid(
                "an argument contains a NUL byte, which no process argument can hold".to_owned(),
            ),
        );
        return None;
    }
    Some(args.into_iter().map(|arg| arg.value).collect())
}

/// Reads a string that must be one of `choices`.
pub(super) fn choice(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
    choices: &[&str],
) -> Option<Spanned<String>> {
    let help = format!("use one of: {}", quoted_list(choices));
    let text = string(diagnostics, field, &help)?;
    if choices.contains(&text.value.as_str()) {
        return Some(text);
    }
    diagnostics.push(
        text.span.clone(),
        Problem {
            code: ErrorCode::InvalidValue,
            key: field.path.clone(),
            message: format!("unknown value {:?}", text.value),
            help,
        },
    );
    None
}

/// Formats choices as `"a", "b" or "c"`.
pub(super) fn quoted_list(choices: &[&str]) -> String {
    let quoted: Vec<String> = choices.iter().map(|c| format!("{c:?}")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.join(""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_quotes_non_bare_keys() {
        assert_eq!(join("", "app"), "app");
        assert_eq!(join("env", "RUST_LOG"), "env.RUST_LOG");
        assert_eq!(join("env", "a.b"), "env.\"a.b\"");
        assert_eq!(join("env", ""), "env.\"\"");
    }

    #[test]
    fn closest_suggests_typos_only() {
        let allowed = ["count", "vcpus", "memory"];
        assert_eq!(closest("cpus", &allowed), Some("vcpus"));
        assert_eq!(closest("memroy", &allowed), Some("memory"));
        assert_eq!(closest("replicas", &allowed), None);
    }

    #[test]
    fn quoted_list_reads_naturally() {
        assert_eq!(quoted_list(&["tls"]), "\"tls\"");
        assert_eq!(quoted_list(&["tls", "tcp"]), "\"tls\" or \"tcp\"");
        assert_eq!(quoted_list(&["a", "b", "c"]), "\"a\", \"b\" or \"c\"");
    }
}
