//! Per-instance logs: the workload's stdout and stderr, the VM's serial console (kernel and
//! kiln-init) and the agent's lines about the instance, kept on disk with a size bound and
//! rotation, and queued (bounded too) for shipping to the control plane.
//!
//! A guest that floods its console can neither fill the disk (at most `max_file_bytes` times
//! `max_files + 1` per instance) nor the agent's memory (at most `max_pending_bytes` queued,
//! plus one partial line per stream); lines that do not fit are dropped and counted, and the
//! count is shipped as a log line of its own.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use kiln_api::types::{LogLine, LogStream};
use kiln_core::InstanceId;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::warn;

use crate::config::LogConfig;

/// Maximum length of a kept line; longer lines are cut and marked with `…`.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Lines kept in memory for crash reports ("last lines before the exit").
const TAIL_LINES: usize = 20;

/// Lines of the workload's own output (stdout and stderr) kept in memory for the exit report
/// of a run-once instance.
pub const OUTPUT_TAIL_LINES: usize = 20;

const CURRENT_FILE: &str = "current.log";

/// One instance's log, shared by the driver (which writes) and the agent (which ships).
#[derive(Clone)]
pub struct LogSink {
    inner: Arc<Mutex<InstanceLog>>,
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSink").finish_non_exhaustive()
    }
}

struct InstanceLog {
    instance: InstanceId,
    dir: PathBuf,
    config: LogConfig,
    file: Option<File>,
    file_bytes: u64,
    /// Bytes of a line not yet ended by a newline, per stream.
    partial: [Vec<u8>; 4],
    pending: VecDeque<LogLine>,
    pending_bytes: usize,
    /// Lines dropped from the shipping queue and not yet reported.
    dropped_unreported: u64,
    /// Lines dropped since the agent started.
    dropped_total: u64,
    tail: VecDeque<String>,
    /// The last lines of stdout and stderr only, without console or agent lines.
    output_tail: VecDeque<String>,
}

impl LogSink {
    /// Opens (appending) the log of `instance` in `dir`.
    pub fn open(dir: &Path, instance: InstanceId, config: LogConfig) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = open_append(&dir.join(CURRENT_FILE))?;
        let file_bytes = file.metadata()?.len();
        Ok(Self {
            inner: Arc::new(Mutex::new(InstanceLog {
                instance,
                dir: dir.to_path_buf(),
                config,
                file: Some(file),
                file_bytes,
                partial: Default::default(),
                pending: VecDeque::new(),
                pending_bytes: 0,
                dropped_unreported: 0,
                dropped_total: 0,
                tail: VecDeque::new(),
                output_tail: VecDeque::new(),
            })),
        })
    }

    /// Creates a sink that keeps lines in memory only, for when the log directory cannot be
    /// created.
    pub fn discard(instance: InstanceId) -> Self {
        Self {
            inner: Arc::new(Mutex::new(InstanceLog {
                instance,
                dir: PathBuf::new(),
                config: LogConfig::default(),
                file: None,
                file_bytes: 0,
                partial: Default::default(),
                pending: VecDeque::new(),
                pending_bytes: 0,
                dropped_unreported: 0,
                dropped_total: 0,
                tail: VecDeque::new(),
                output_tail: VecDeque::new(),
            })),
        }
    }

    /// Appends raw output of `stream`; complete lines are stored and queued.
    pub fn write(&self, stream: LogStream, bytes: &[u8]) {
        let mut log = self.lock();
        let slot = stream_slot(stream);
        let mut rest = bytes;
        while let Some(newline) = rest.iter().position(|&byte| byte == b'\n') {
            let mut line = std::mem::take(&mut log.partial[slot]);
            append_bounded(&mut line, &rest[..newline]);
            rest = &rest[newline + 1..];
            log.push_line(stream, &line);
        }
        let mut partial = std::mem::take(&mut log.partial[slot]);
        append_bounded(&mut partial, rest);
        log.partial[slot] = partial;
    }

    /// Records one line written by the agent about this instance.
    pub fn agent_line(&self, text: &str) {
        self.lock().push_line(LogStream::Agent, text.as_bytes());
    }

    /// Returns up to `max_lines` queued lines, oldest first, without removing them; a line
    /// reporting dropped lines comes first when any were dropped.
    pub fn peek_pending(&self, max_lines: usize) -> Vec<LogLine> {
        let mut log = self.lock();
        if log.dropped_unreported > 0 {
            let text = format!(
                "{} log lines dropped: the agent could not ship them fast enough",
                log.dropped_unreported
            );
            log.dropped_unreported = 0;
            let line = log.make_line(LogStream::Agent, text);
            log.pending_bytes += line.line.len();
            log.pending.push_front(line);
        }
        log.pending.iter().take(max_lines).cloned().collect()
    }

    /// Removes the `count` oldest queued lines after they were shipped.
    pub fn ack(&self, count: usize) {
        let mut log = self.lock();
        for _ in 0..count {
            let Some(line) = log.pending.pop_front() else {
                break;
            };
            log.pending_bytes -= line.line.len();
        }
    }

    /// Returns the last lines, for crash reports.
    pub fn tail(&self) -> Vec<String> {
        self.lock().tail.iter().cloned().collect()
    }

    /// Returns the last lines the workload wrote to stdout and stderr, oldest first, each cut
    /// to `max_line_bytes`.
    pub fn output_tail(&self, max_line_bytes: usize) -> Vec<String> {
        self.lock()
            .output_tail
            .iter()
            .map(|line| cut_line(line, max_line_bytes))
            .collect()
    }

    /// Returns the number of lines dropped from the shipping queue since the agent started.
    pub fn dropped_total(&self) -> u64 {
        self.lock().dropped_total
    }

    fn lock(&self) -> MutexGuard<'_, InstanceLog> {
        // A panic while holding the lock leaves plain data behind, still safe to use.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl InstanceLog {
    fn push_line(&mut self, stream: LogStream, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes).into_owned();
        let line = self.make_line(stream, text);
        self.write_to_disk(&line);

        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line.line.clone());
        if matches!(stream, LogStream::Stdout | LogStream::Stderr) {
            if self.output_tail.len() == OUTPUT_TAIL_LINES {
                self.output_tail.pop_front();
            }
            self.output_tail.push_back(line.line.clone());
        }

        self.pending_bytes += line.line.len();
        self.pending.push_back(line);
        while self.pending_bytes > self.config.max_pending_bytes {
            let Some(oldest) = self.pending.pop_front() else {
                break;
            };
            self.pending_bytes -= oldest.line.len();
            self.dropped_unreported += 1;
            self.dropped_total += 1;
        }
    }

    fn make_line(&self, stream: LogStream, text: String) -> LogLine {
        LogLine {
            instance_id: self.instance,
            stream,
            time: OffsetDateTime::now_utc(),
            line: text,
        }
    }

    fn write_to_disk(&mut self, line: &LogLine) {
        let time = line.time.format(&Rfc3339).unwrap_or_default();
        let record = format!("{time} {} {}\n", stream_name(line.stream), line.line);
        if self.file.is_some()
            && self.file_bytes + record.len() as u64 > self.config.max_file_bytes
            && let Err(error) = self.rotate()
        {
            warn!(instance = %self.instance, dir = %self.dir.display(), %error, "log rotation failed");
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        match file.write_all(record.as_bytes()) {
            Ok(()) => self.file_bytes += record.len() as u64,
            Err(error) => {
                warn!(instance = %self.instance, dir = %self.dir.display(), %error, "log write failed");
            }
        }
    }

    /// Renames `current.log` to `current.log.1`, shifting older files up and removing the
    /// oldest beyond `max_files`.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        let current = self.dir.join(CURRENT_FILE);
        let max_files = self.config.max_files;
        if max_files == 0 {
            std::fs::remove_file(&current)?;
        } else {
            let numbered = |n: u32| self.dir.join(format!("{CURRENT_FILE}.{n}"));
            let _ = std::fs::remove_file(numbered(max_files));
            for n in (1..max_files).rev() {
                if numbered(n).exists() {
                    std::fs::rename(numbered(n), numbered(n + 1))?;
                }
            }
            std::fs::rename(&current, numbered(1))?;
        }
        self.file = Some(open_append(&current)?);
        self.file_bytes = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn append_bounded(line: &mut Vec<u8>, bytes: &[u8]) {
    let room = MAX_LINE_BYTES.saturating_sub(line.len());
    if bytes.len() <= room {
        line.extend_from_slice(bytes);
        return;
    }
    line.extend_from_slice(&bytes[..room]);
    if !line.ends_with("…".as_bytes()) {
        line.extend_from_slice("…".as_bytes());
    }
}

/// Cuts `line` to at most `max_bytes` bytes on a character boundary, marking a cut with `…`.
fn cut_line(line: &str, max_bytes: usize) -> String {
    if line.len() <= max_bytes {
        return line.to_owned();
    }
    let marker = "…";
    let mut end = max_bytes.saturating_sub(marker.len());
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{marker}", &line[..end])
}

fn stream_slot(stream: LogStream) -> usize {
    match stream {
        LogStream::Stdout => 0,
        LogStream::Stderr => 1,
        LogStream::Console => 2,
        LogStream::Agent => 3,
    }
}

fn stream_name(stream: LogStream) -> &'static str {
    match stream {
        LogStream::Stdout => "stdout",
        LogStream::Stderr => "stderr",
        LogStream::Console => "console",
        LogStream::Agent => "agent",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_tail_keeps_workload_lines() {
        let sink = LogSink::discard(InstanceId::new());
        sink.agent_line("state Booting");
        sink.write(LogStream::Console, b"[    0.1] kernel line\n");
        for n in 0..25 {
            sink.write(LogStream::Stdout, format!("line {n}\n").as_bytes());
        }
        sink.write(LogStream::Stderr, "é".repeat(600).as_bytes());
        sink.write(LogStream::Stderr, b"\n");

        let tail = sink.output_tail(16);
        assert_eq!(tail.len(), OUTPUT_TAIL_LINES);
        assert_eq!(tail[0], "line 6");
        assert!(tail.iter().all(|line| !line.contains("Booting")));
        assert!(tail.iter().all(|line| !line.contains("kernel")));
        let last = tail.last().unwrap();
        assert!(last.len() <= 16, "{last}");
        assert!(last.ends_with('…'), "{last}");
    }

    fn config(max_file_bytes: u64, max_files: u32, max_pending_bytes: usize) -> LogConfig {
        LogConfig {
            max_file_bytes,
            max_files,
            max_pending_bytes,
        }
    }

    fn dir_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().metadata().unwrap().len())
            .sum()
    }

    #[test]
    fn lines_split_across_writes() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LogSink::open(dir.path(), InstanceId::new(), LogConfig::default()).unwrap();
        sink.write(LogStream::Stdout, b"hel");
        sink.write(LogStream::Stderr, b"error\n");
        sink.write(LogStream::Stdout, b"lo\nworld\n");
        let lines: Vec<String> = sink.peek_pending(10).into_iter().map(|l| l.line).collect();
        assert_eq!(lines, ["error", "hello", "world"]);
    }

    #[test]
    fn flood_stays_within_disk_bound() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LogSink::open(dir.path(), InstanceId::new(), config(8192, 2, 65536)).unwrap();
        let line = [b'x'; 100];
        for _ in 0..10_000 {
            sink.write(LogStream::Console, &line);
            sink.write(LogStream::Console, b"\n");
        }
        assert!(
            dir_bytes(dir.path()) <= 8192 * 3,
            "{}",
            dir_bytes(dir.path())
        );
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 3);
    }

    #[test]
    fn flood_drops_and_counts_pending() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LogSink::open(dir.path(), InstanceId::new(), config(1 << 20, 1, 500)).unwrap();
        for n in 0..100 {
            sink.write(LogStream::Stdout, format!("line {n:03}\n").as_bytes());
        }
        let pending = sink.peek_pending(1000);
        assert!(
            pending[0].line.contains("log lines dropped"),
            "{}",
            pending[0].line
        );
        assert_eq!(pending.last().unwrap().line, "line 099");
        let dropped: u64 = pending[0].line.split(' ').next().unwrap().parse().unwrap();
        assert_eq!(dropped + pending.len() as u64 - 1, 100);
        assert_eq!(sink.dropped_total(), dropped);
    }

    #[test]
    fn endless_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LogSink::open(dir.path(), InstanceId::new(), LogConfig::default()).unwrap();
        for _ in 0..100 {
            sink.write(LogStream::Console, &[b'y'; 4096]);
        }
        sink.write(LogStream::Console, b"\n");
        let pending = sink.peek_pending(10);
        assert_eq!(pending.len(), 1);
        assert!(pending[0].line.len() <= MAX_LINE_BYTES + "…".len());
        assert!(pending[0].line.ends_with('…'));
    }

    #[test]
    fn ack_removes_shipped_lines() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LogSink::open(dir.path(), InstanceId::new(), LogConfig::default()).unwrap();
        sink.write(LogStream::Stdout, b"a\nb\nc\n");
        sink.ack(2);
        let lines: Vec<String> = sink.peek_pending(10).into_iter().map(|l| l.line).collect();
        assert_eq!(lines, ["c"]);
        assert_eq!(sink.tail(), ["a", "b", "c"]);
    }
}
