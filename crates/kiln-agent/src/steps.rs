//! Durations of the steps of an instance start, written to the instance's log as one line
//! (`start steps (ms): record 1, image 2, disk 85, …`) so an operator, `kiln logs` and the
//! start benchmark can see where a slow start spends its time.

use std::fmt::Write;
use std::time::{Duration, Instant};

/// Prefix of the log line that [`StepTimes::summary`] returns.
pub const SUMMARY_PREFIX: &str = "start steps (ms): ";

/// The measured steps of one start, in the order they were recorded.
#[derive(Debug, Clone)]
pub struct StepTimes {
    began: Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl StepTimes {
    /// Starts timing a start at the current instant.
    pub fn new() -> Self {
        Self {
            began: Instant::now(),
            steps: Vec::new(),
        }
    }

    /// Records that step `name` took `duration`.
    pub fn record(&mut self, name: &'static str, duration: Duration) {
        self.steps.push((name, duration));
    }

    /// Returns the time since [`StepTimes::new`].
    pub fn total(&self) -> Duration {
        self.began.elapsed()
    }

    /// Formats the steps and the total as one log line. Steps that ran concurrently each
    /// show their own duration, so the total can be less than their sum.
    pub fn summary(&self) -> String {
        let mut line = SUMMARY_PREFIX.to_owned();
        for (name, duration) in &self.steps {
            let _ = write!(line, "{name} {}, ", duration.as_millis());
        }
        let _ = write!(line, "total {}", self.total().as_millis());
        line
    }
}

impl Default for StepTimes {
    fn default() -> Self {
        Self::new()
    }
}

/// Parses a line made by [`StepTimes::summary`] into step names and milliseconds; returns
/// `None` for any other line.
pub fn parse_summary(line: &str) -> Option<Vec<(String, u64)>> {
    let rest = line.strip_prefix(SUMMARY_PREFIX)?;
    rest.split(", ")
        .map(|step| {
            let (name, millis) = step.rsplit_once(' ')?;
            Some((name.to_owned(), millis.parse().ok()?))
        })
        .collect()
}

/// Runs `future` and returns its output with the time it took.
pub async fn timed<T>(future: impl Future<Output = T>) -> (T, Duration) {
    let began = Instant::now();
    let output = future.await;
    (output, began.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_round_trips() {
        let mut steps = StepTimes::new();
        steps.record("image", Duration::from_millis(2));
        steps.record("vm boot", Duration::from_millis(9620));
        let parsed = parse_summary(&steps.summary()).unwrap();
        assert_eq!(parsed[0], ("image".to_owned(), 2));
        assert_eq!(parsed[1], ("vm boot".to_owned(), 9620));
        assert_eq!(parsed[2].0, "total");
    }

    #[test]
    fn other_lines_not_parsed() {
        assert_eq!(parse_summary("state Healthy"), None);
        assert_eq!(parse_summary("start steps (ms): image x"), None);
    }
}
