//! The CLI's error: what failed, on which value, what to do next, and the cause chain.
//!
//! Commands return [`CliError`]; `main` prints it once to stderr and exits with its
//! [`ExitKind`]. Causes are kept as a chain and printed one per line, so no message repeats
//! the text of its source.

use std::fmt;

use crate::exit::ExitKind;

/// A failed command, ready to print.
#[derive(Debug)]
pub(crate) struct CliError {
    kind: ExitKind,
    message: String,
    detail: Option<String>,
    hint: Option<String>,
    source: Option<anyhow::Error>,
}

/// The result type of every command.
pub(crate) type CliResult<T = ()> = Result<T, CliError>;

impl CliError {
    /// Creates an error of `kind`; `message` says what failed and on which value.
    pub(crate) fn new(kind: ExitKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            detail: None,
            hint: None,
            source: None,
        }
    }

    /// A failure without a more specific exit code.
    pub(crate) fn failure(message: impl Into<String>) -> Self {
        Self::new(ExitKind::Failure, message)
    }

    /// A usage error: a flag or argument is missing or invalid.
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self::new(ExitKind::Usage, message)
    }

    /// Adds what to do next.
    pub(crate) fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Adds a pre-rendered block printed under the message, such as a manifest diagnostic.
    pub(crate) fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Attaches the underlying cause; its chain is printed once, below the message.
    pub(crate) fn with_source(mut self, source: impl Into<anyhow::Error>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The exit kind this error ends the process with.
    pub(crate) fn kind(&self) -> ExitKind {
        self.kind
    }
}

impl fmt::Display for CliError {
    /// Formats the error as `main` prints it: the message, the detail block, one `caused by`
    /// line per cause, and the hint.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error: {}", self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, "\n{}", detail.trim_end())?;
        }
        if let Some(source) = &self.source {
            for cause in source.chain() {
                write!(f, "\n  caused by: {cause}")?;
            }
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_prints_chain_once() {
        let root = std::io::Error::other("connection refused");
        let source = anyhow::Error::new(root).context("connecting to 127.0.0.1:9");
        let error = CliError::failure("request GET /v1/apps failed")
            .with_source(source)
            .with_hint("check that kiln-control is running");

        let text = error.to_string();

        assert_eq!(
            text,
            "error: request GET /v1/apps failed\n  \
             caused by: connecting to 127.0.0.1:9\n  \
             caused by: connection refused\n  \
             hint: check that kiln-control is running"
        );
    }
}
