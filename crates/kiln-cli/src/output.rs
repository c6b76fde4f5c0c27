//! Where and how results are printed.
//!
//! Data goes to stdout: a table or a short sentence for people, or with `--json` the API
//! object and nothing else (NDJSON, one object per line, for streams such as `logs -f` and
//! deploy progress). Progress and notes go to stderr, and spinners only when stderr is a
//! terminal, so a pipe or a CI log never gets control characters. Colour is used only when
//! stdout is a terminal and `NO_COLOR` is unset (<https://no-color.org>).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::error::{CliError, CliResult};

/// The printing policy of one `kiln` run.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    json: bool,
    color: bool,
    stderr_terminal: bool,
}

/// A style applied to a table cell or a word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Style {
    /// No styling.
    Plain,
    /// Headers and names.
    Bold,
    /// Healthy, done, succeeded.
    Good,
    /// Pending, draining, in progress.
    Warn,
    /// Failed, dead, rolled back.
    Bad,
    /// Secondary text such as ids and times.
    Dim,
}

impl Output {
    /// Builds the policy from `--json` and the environment.
    pub(crate) fn new(json: bool) -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Self {
            json,
            color: !no_color && std::io::stdout().is_terminal(),
            stderr_terminal: std::io::stderr().is_terminal(),
        }
    }

    /// Whether `--json` was given.
    pub(crate) fn is_json(&self) -> bool {
        self.json
    }

    /// Prints `value` as pretty JSON on stdout.
    pub(crate) fn json<T: Serialize + ?Sized>(&self, value: &T) -> CliResult {
        let text = serde_json::to_string_pretty(value)
            .map_err(|error| CliError::failure("cannot encode JSON output").with_source(error))?;
        write_stdout(&format!("{text}\n"))
    }

    /// Prints `value` as one line of NDJSON on stdout and flushes, for streams.
    pub(crate) fn json_line<T: Serialize + ?Sized>(&self, value: &T) -> CliResult {
        let text = serde_json::to_string(value)
            .map_err(|error| CliError::failure("cannot encode JSON output").with_source(error))?;
        write_stdout(&format!("{text}\n"))
    }

    /// Prints one human line on stdout (ignored with `--json`, whose callers print the object).
    pub(crate) fn line(&self, text: &str) -> CliResult {
        if self.json {
            return Ok(());
        }
        write_stdout(&format!("{text}\n"))
    }

    /// Prints a note on stderr, such as a warning or what to run next.
    pub(crate) fn note(&self, text: &str) {
        eprintln!("{text}");
    }

    /// Prints `table` on stdout with aligned columns.
    pub(crate) fn table(&self, table: &Table) -> CliResult {
        write_stdout(&table.render(self.color))
    }

    /// Styles `text` when colour is on.
    pub(crate) fn paint(&self, style: Style, text: &str) -> String {
        paint(self.color, style, text)
    }

    /// Returns a spinner on stderr, hidden unless stderr is a terminal.
    pub(crate) fn spinner(&self, message: &str) -> ProgressBar {
        if !self.stderr_terminal || self.json {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}") {
            bar.set_style(style);
        }
        bar.set_message(message.to_owned());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }
}

fn write_stdout(text: &str) -> CliResult {
    let mut stdout = std::io::stdout().lock();
    let result = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
    match result {
        Ok(()) => Ok(()),
        // A closed pipe (`kiln logs | head`) is the reader's choice, not a failure.
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(error) => Err(CliError::failure("cannot write to stdout").with_source(error)),
    }
}

fn paint(color: bool, style: Style, text: &str) -> String {
    if !color {
        return text.to_owned();
    }
    let code = match style {
        Style::Plain => return text.to_owned(),
        Style::Bold => "1",
        Style::Good => "32",
        Style::Warn => "33",
        Style::Bad => "31",
        Style::Dim => "2",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// A table of text cells with a header row.
#[derive(Debug, Clone, Default)]
pub(crate) struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<(String, Style)>>,
}

impl Table {
    /// Creates a table with these column headers.
    pub(crate) fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Appends a row of plain cells.
    pub(crate) fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.rows.push(
            cells
                .into_iter()
                .map(|c| (c.into(), Style::Plain))
                .collect(),
        );
    }

    /// Appends a row whose cells carry a style each.
    pub(crate) fn styled_row(&mut self, cells: Vec<(String, Style)>) {
        self.rows.push(cells);
    }

    /// Renders the table; columns are separated by two spaces, the last one is not padded.
    pub(crate) fn render(&self, color: bool) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, (cell, _)) in row.iter().enumerate() {
                if let Some(width) = widths.get_mut(i) {
                    *width = (*width).max(cell.chars().count());
                }
            }
        }

        let mut out = String::new();
        let header: Vec<(String, Style)> = self
            .headers
            .iter()
            .map(|h| ((*h).to_owned(), Style::Bold))
            .collect();
        for row in std::iter::once(&header).chain(self.rows.iter()) {
            let last = row.len().saturating_sub(1);
            let mut line = String::new();
            for (i, (cell, style)) in row.iter().enumerate() {
                line.push_str(&paint(color, *style, cell));
                if i < last {
                    let width = widths.get(i).copied().unwrap_or(0);
                    let pad = width.saturating_sub(cell.chars().count()) + 2;
                    line.push_str(&" ".repeat(pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut table = Table::new(&["NAME", "STATUS"]);
        table.row(["web", "running"]);
        table.row(["worker-long", "stopped"]);

        assert_eq!(
            table.render(false),
            "NAME         STATUS\nweb          running\nworker-long  stopped\n"
        );
    }

    #[test]
    fn paint_without_color_is_plain() {
        assert_eq!(paint(false, Style::Bad, "failed"), "failed");
        assert_eq!(paint(true, Style::Bad, "failed"), "\x1b[31mfailed\x1b[0m");
    }
}
