//! Manifest errors with their position, for people (miette underlines the offending text) and
//! for programs (a stable code, the key path, line and column).
//!
//! Parsing collects every problem it finds instead of stopping at the first, so a developer
//! fixes a broken `kiln.toml` in one round trip.

use std::fmt;
use std::ops::Range;

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceCode};

/// Maximum length, in characters, of the offending text quoted in an error. Longer text is
/// cut and ends with `…`.
const MAX_FOUND_CHARS: usize = 60;

/// The kind of a manifest problem, as a stable machine-readable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    /// The file is not valid TOML.
    Syntax,
    /// A key that the manifest does not define.
    UnknownKey,
    /// A required key is absent.
    MissingKey,
    /// A value of the wrong TOML type (a number where a string belongs).
    WrongType,
    /// A name that is not a DNS label.
    InvalidName,
    /// A hostname that is not a valid DNS name.
    InvalidHostname,
    /// A hostname claimed by two services or two environments.
    DuplicateHostname,
    /// A number outside its allowed range.
    OutOfRange,
    /// A duration string that does not parse.
    InvalidDuration,
    /// A size string that does not parse.
    InvalidSize,
    /// A value that is not one of the allowed choices or breaks a format rule.
    InvalidValue,
    /// A reference to a process type, service or volume that is not defined.
    UnknownReference,
    /// Two definitions that cannot both hold (two services on one port, two volumes on one
    /// path, a process type defined twice).
    Conflict,
}

impl ErrorCode {
    /// Returns the stable code, such as `manifest::unknown_key`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Syntax => "manifest::syntax",
            Self::UnknownKey => "manifest::unknown_key",
            Self::MissingKey => "manifest::missing_key",
            Self::WrongType => "manifest::wrong_type",
            Self::InvalidName => "manifest::invalid_name",
            Self::InvalidHostname => "manifest::invalid_hostname",
            Self::DuplicateHostname => "manifest::duplicate_hostname",
            Self::OutOfRange => "manifest::out_of_range",
            Self::InvalidDuration => "manifest::invalid_duration",
            Self::InvalidSize => "manifest::invalid_size",
            Self::InvalidValue => "manifest::invalid_value",
            Self::UnknownReference => "manifest::unknown_reference",
            Self::Conflict => "manifest::conflict",
        }
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem in a manifest. It displays as `key.path: message` and serializes to JSON for
/// API error details (`span` as `{"start": .., "end": ..}` byte offsets).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ManifestError {
    /// Kind of problem.
    pub code: ErrorCode,
    /// The key path, such as `processes.web.memory` or `startup[1].command`; empty for a
    /// syntax error before any key.
    pub key: String,
    /// Description of the problem, naming the offending value.
    pub message: String,
    /// The offending text as written in the file (cut to 60 characters).
    pub found: String,
    /// The allowed values or the fix.
    pub help: String,
    /// Byte range of the offending text in the source.
    pub span: Range<usize>,
    /// Line of the span's start, counted from 1.
    pub line: usize,
    /// Column of the span's start in characters, counted from 1.
    pub column: usize,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ManifestError {}

impl Diagnostic for ManifestError {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.code))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(&self.help))
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let label = LabeledSpan::new_primary_with_span(Some("here".to_owned()), self.span.clone());
        Some(Box::new(std::iter::once(label)))
    }
}

/// Every problem found in one manifest, with the source so a report can quote it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} is not a valid manifest: {}", self.file_name(), count_errors(self.errors.len()))]
pub struct ManifestErrors {
    /// The problems, ordered by position in the file.
    pub errors: Vec<ManifestError>,
    /// The file name and text, boxed to keep `Result<Manifest, ManifestErrors>` small.
    named_source: Box<NamedSource<String>>,
}

fn count_errors(count: usize) -> String {
    if count == 1 {
        "1 error".to_owned()
    } else {
        format!("{count} errors")
    }
}

impl ManifestErrors {
    pub(super) fn new(file_name: &str, source_text: &str, mut errors: Vec<ManifestError>) -> Self {
        errors.sort_by(|a, b| {
            (a.span.start, a.span.end, a.code, &a.key).cmp(&(
                b.span.start,
                b.span.end,
                b.code,
                &b.key,
            ))
        });
        errors.dedup();
        Self {
            errors,
            named_source: Box::new(NamedSource::new(file_name, source_text.to_owned())),
        }
    }

    /// Returns the file name shown in reports, such as `kiln.toml`.
    pub fn file_name(&self) -> &str {
        self.named_source.name()
    }

    /// Returns the manifest text that the spans point into.
    pub fn source_text(&self) -> &str {
        self.named_source.inner()
    }

    /// Renders the errors as plain text, one block per error, for logs, non-interactive
    /// terminals and tests:
    ///
    /// ```text
    /// kiln.toml:7:10: processes.web.memory: 64 MiB is below the minimum of 128 MiB [manifest::out_of_range]
    ///     found: 64
    ///     help: use 128 to 65536 MiB ...
    /// ```
    pub fn render_plain(&self) -> String {
        let mut text = String::new();
        for error in &self.errors {
            text.push_str(&format!(
                "{}:{}:{}: {} [{}]\n",
                self.file_name(),
                error.line,
                error.column,
                error,
                error.code
            ));
            if !error.found.is_empty() {
                text.push_str(&format!("    found: {}\n", error.found));
            }
            text.push_str(&format!("    help: {}\n", error.help));
        }
        text
    }
}

impl Diagnostic for ManifestErrors {
    fn source_code(&self) -> Option<&dyn SourceCode> {
        Some(self.named_source.as_ref())
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        Some(Box::new(
            self.errors.iter().map(|error| error as &dyn Diagnostic),
        ))
    }
}

/// Collects errors while the manifest is read, computing line, column and quoted text.
pub(super) struct Diagnostics<'s> {
    source: &'s str,
    errors: Vec<ManifestError>,
}

/// The parts of an error that the reader supplies; the collector adds the position.
pub(super) struct Problem {
    pub(super) code: ErrorCode,
    pub(super) key: String,
    pub(super) message: String,
    pub(super) help: String,
}

impl<'s> Diagnostics<'s> {
    pub(super) fn new(source: &'s str) -> Self {
        Self {
            source,
            errors: Vec::new(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub(super) fn into_errors(self) -> Vec<ManifestError> {
        self.errors
    }

    /// Records a problem at `span`, which must lie on character boundaries of the source.
    pub(super) fn push(&mut self, span: Range<usize>, problem: Problem) {
        let span = self.clamp(span);
        let (line, column) = line_column(self.source, span.start);
        let found = quote_found(&self.source[span.clone()]);
        self.errors.push(ManifestError {
            code: problem.code,
            key: problem.key,
            message: problem.message,
            found,
            help: problem.help,
            span,
            line,
            column,
        });
    }

    /// Returns the part of `span` on its first line, such as the `[[startup]]` header of a
    /// table whose span covers its whole body.
    pub(super) fn first_line(&self, span: Range<usize>) -> Range<usize> {
        let span = self.clamp(span);
        let end = self.source[span.clone()]
            .find('\n')
            .map_or(span.end, |offset| span.start + offset);
        span.start..end
    }

    /// Keeps a span inside the source and on character boundaries, so that a wrong span
    /// from a parser can never make error reporting panic.
    fn clamp(&self, span: Range<usize>) -> Range<usize> {
        let len = self.source.len();
        let mut start = span.start.min(len);
        let mut end = span.end.clamp(start, len);
        while !self.source.is_char_boundary(start) {
            start -= 1;
        }
        while !self.source.is_char_boundary(end) {
            end += 1;
        }
        start..end
    }
}

/// Returns the 1-based line and character column of byte `offset`.
fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Returns the first line of `text`, cut to [`MAX_FOUND_CHARS`] characters.
fn quote_found(text: &str) -> String {
    let first_line = text.lines().next().unwrap_or("");
    let mut quoted: String = first_line.chars().take(MAX_FOUND_CHARS).collect();
    if quoted.len() < text.len() {
        quoted.push('…');
    }
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_characters() {
        let source = "a = 1\nname = \"é\" x\n";
        assert_eq!(line_column(source, 0), (1, 1));
        assert_eq!(line_column(source, 6), (2, 1));
        let x = source.find('x').unwrap();
        assert_eq!(line_column(source, x), (2, 12));
    }

    #[test]
    fn found_text_is_cut() {
        assert_eq!(quote_found("short"), "short");
        assert_eq!(quote_found("one\ntwo"), "one…");
        let long = "x".repeat(100);
        assert_eq!(quote_found(&long).chars().count(), MAX_FOUND_CHARS + 1);
    }

    #[test]
    fn clamp_keeps_spans_on_boundaries() {
        let source = "é = 1";
        let mut diagnostics = Diagnostics::new(source);
        let problem = Problem {
            code: ErrorCode::InvalidValue,
            key: "k".to_owned(),
            message: "m".to_owned(),
            help: "h".to_owned(),
        };
        diagnostics.push(1..100, problem);
        let errors = diagnostics.into_errors();
        assert_eq!(errors[0].span, 0..source.len());
    }
}
