//! The `kiln.toml` manifest: parsing, validation, per-environment overrides and the canonical
//! JSON form that releases store.
//!
//! Parsing makes two passes over a `toml_edit` document, which keeps the byte span of every
//! key and value. The `reader` pass checks each value on its own (type, format, range,
//! unknown keys). The `validate` pass checks the rules between tables (references, ports,
//! hostnames per environment). Both passes record every problem instead of stopping at the
//! first, and each error carries its key path, line, column and offending text, so the CLI
//! can underline it with miette. Nothing here does I/O, because the caller reads the file.

mod canonical;
mod diagnostics;
mod environments;
mod fields;
mod reader;
mod schema;
mod services;
mod units;
mod validate;

#[cfg(test)]
mod tests;

use toml_edit::ImDocument;

pub use diagnostics::{ErrorCode, ManifestError, ManifestErrors};
pub use schema::*;
pub use units::{UnitError, format_duration, parse_duration, parse_size_mib};

use diagnostics::{Diagnostics, Problem};

impl Manifest {
    /// Parses and validates a manifest, naming the file `kiln.toml` in errors.
    pub fn parse(source: &str) -> Result<Self, ManifestErrors> {
        Self::parse_named("kiln.toml", source)
    }

    /// Parses and validates a manifest; `file_name` is shown in errors.
    pub fn parse_named(file_name: &str, source: &str) -> Result<Self, ManifestErrors> {
        let mut diagnostics = Diagnostics::new(source);

        let document = match ImDocument::parse(source) {
            Ok(document) => document,
            Err(error) => {
                record_syntax_error(&mut diagnostics, source, &error);
                return Err(ManifestErrors::new(
                    file_name,
                    source,
                    diagnostics.into_errors(),
                ));
            }
        };

        let draft = reader::read(&document, &mut diagnostics);
        validate::check(&draft, &mut diagnostics);
        if diagnostics.is_empty()
            && let Some(manifest) = validate::build(draft)
        {
            return Ok(manifest);
        }

        let mut errors = diagnostics.into_errors();
        if errors.is_empty() {
            // `build` returns None only for a missing required value, and `read` reports
            // those. Reaching this is a bug, but the manifest must still not pass as valid.
            errors.push(ManifestError {
                code: ErrorCode::MissingKey,
                key: String::new(),
                message: "the manifest is incomplete".to_owned(),
                found: String::new(),
                help: "this is a bug in Kiln's manifest checks; please report it with the file"
                    .to_owned(),
                span: 0..0,
                line: 1,
                column: 1,
            });
        }
        Err(ManifestErrors::new(file_name, source, errors))
    }
}

/// Records a TOML syntax error, rewording the duplicate-table case, which is how a process
/// type, service or volume defined twice shows up.
fn record_syntax_error(
    diagnostics: &mut Diagnostics<'_>,
    source: &str,
    error: &toml_edit::TomlError,
) {
    let span = error.span().unwrap_or(0..0);
    let span = diagnostics.first_line(span.start..source.len());
    let message = error.message().trim().replace('\n', ": ");

    let duplicate = message
        .split("duplicate key `")
        .nth(1)
        .and_then(|rest| rest.split_once("` in table `"))
        .map(|(key, table)| (key.to_owned(), table.trim_end_matches('`').to_owned()));
    let problem = match duplicate {
        Some((key, table)) => Problem {
            code: ErrorCode::Conflict,
            key: if table.is_empty() {
                key.clone()
            } else {
                format!("{table}.{key}")
            },
            message: match table.as_str() {
                "processes" => format!("process type `{key}` is defined twice"),
                "services" => format!("service `{key}` is defined twice"),
                "volumes" => format!("volume `{key}` is defined twice"),
                "environments" => format!("environment `{key}` is defined twice"),
                _ => format!("`{key}` is defined twice"),
            },
            help: "each key may appear once; merge the two definitions into one".to_owned(),
        },
        None => Problem {
            code: ErrorCode::Syntax,
            key: String::new(),
            message: format!("invalid TOML: {message}"),
            help: "fix the TOML syntax; see https://toml.io for the format".to_owned(),
        },
    };
    diagnostics.push(span, problem);
}
