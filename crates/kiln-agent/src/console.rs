//! Follows a VM's serial console (kernel and kiln-init output) into the instance's
//! [`LogSink`] as [`LogStream::Console`] lines, so the console reaches the same bounded local
//! log and the same shipping queue as the workload's stdout and stderr.
//!
//! The VMM driver owns the console: it copies the guest's serial port into `console.log` in
//! the VM's directory and rotates it at a size limit by renaming the full file to
//! `console.log.1` and putting a fresh file in its place. The follower reads that file by
//! offset and, when the path names a new file, first finishes the file it has open (the
//! old inode, now `console.log.1`) and then starts the new one at its beginning. Output from
//! before the follower started (an earlier boot of the same instance, or the time before an
//! agent restart) is skipped, so nothing is shipped twice.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use kiln_api::types::LogStream;
use tokio::sync::watch;

use crate::logs::LogSink;

/// Interval between reads of the console file while it has no new bytes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Bytes read per turn before the follower yields to other tasks.
const READ_BUDGET: usize = 256 * 1024;

/// A running console follower. Dropping it (or calling [`ConsoleFollower::stop`]) makes the
/// task read what is left and end.
#[derive(Debug)]
pub struct ConsoleFollower {
    stop: watch::Sender<bool>,
}

impl ConsoleFollower {
    /// Starts following `path` into `logs`, from the file's current end when it exists
    /// already and from its beginning when it is created later.
    pub fn start(path: PathBuf, logs: LogSink) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let mut reader = ConsoleReader::new(path, logs);
        tokio::spawn(async move {
            loop {
                let more = reader.read_available();
                if *stopped.borrow() {
                    reader.read_available();
                    return;
                }
                if more {
                    tokio::task::yield_now().await;
                    continue;
                }
                tokio::select! {
                    changed = stopped.changed() => {
                        if changed.is_err() {
                            reader.read_available();
                            return;
                        }
                    }
                    () = tokio::time::sleep(POLL_INTERVAL) => {}
                }
            }
        });
        Self { stop }
    }

    /// Makes the task read what is left of the console and end.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for ConsoleFollower {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The follower's state: the open console file and where reading continues.
struct ConsoleReader {
    path: PathBuf,
    logs: LogSink,
    /// The open file and its inode.
    file: Option<(File, u64)>,
    /// Inode and length of the file that existed when following began; its bytes up to that
    /// length are skipped.
    skip: Option<(u64, u64)>,
    buffer: Vec<u8>,
}

impl ConsoleReader {
    fn new(path: PathBuf, logs: LogSink) -> Self {
        let skip = std::fs::metadata(&path)
            .ok()
            .map(|metadata| (metadata.ino(), metadata.len()));
        Self {
            path,
            logs,
            file: None,
            skip,
            buffer: vec![0; 64 * 1024],
        }
    }

    /// Reads new console bytes into the log, up to [`READ_BUDGET`]; returns whether more may
    /// be waiting.
    fn read_available(&mut self) -> bool {
        if self.file.is_none() && !self.open_current() {
            return false;
        }

        let mut budget = READ_BUDGET;
        while budget > 0 {
            let read = self.read_chunk();
            if read == 0 {
                break;
            }
            budget = budget.saturating_sub(read);
        }
        if budget == 0 {
            return true;
        }

        // At the end of the held file: if the driver rotated the console, the path now names
        // a new file. Finish the held one (bytes written just before the rotation), then
        // switch.
        let Some((_, held_inode)) = &self.file else {
            return false;
        };
        let current_inode = std::fs::metadata(&self.path).ok().map(|m| m.ino());
        if current_inode.is_none_or(|inode| inode == *held_inode) {
            return false;
        }
        let held_inode = *held_inode;
        while self.read_chunk() > 0 {}
        let rotated = kiln_vmm::console::rotated_path(&self.path);
        if std::fs::metadata(&rotated).is_ok_and(|m| m.ino() != held_inode) {
            self.logs.agent_line(
                "console output skipped: the console log rotated more than once between two reads",
            );
        }
        self.file = None;
        self.open_current()
    }

    /// Opens the file the path names now, skipping the bytes that were there at the start.
    fn open_current(&mut self) -> bool {
        let Ok(mut file) = File::open(&self.path) else {
            return false;
        };
        let Ok(metadata) = file.metadata() else {
            return false;
        };
        let inode = metadata.ino();
        if let Some((skip_inode, skip_length)) = self.skip.take()
            && skip_inode == inode
            && file.seek(SeekFrom::Start(skip_length)).is_err()
        {
            return false;
        }
        self.file = Some((file, inode));
        true
    }

    /// Reads one chunk of the held file into the log; returns the bytes read.
    fn read_chunk(&mut self) -> usize {
        let Some((file, _)) = self.file.as_mut() else {
            return 0;
        };
        let read = match file.read(&mut self.buffer) {
            Ok(read) => read,
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "console read failed");
                return 0;
            }
        };
        // Serial consoles end lines with CR LF.
        let chunk: Vec<u8> = self.buffer[..read]
            .iter()
            .copied()
            .filter(|&byte| byte != b'\r')
            .collect();
        self.logs.write(LogStream::Console, &chunk);
        read
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::Path;

    use kiln_core::InstanceId;

    use super::*;
    use crate::config::LogConfig;

    fn console_lines(sink: &LogSink) -> Vec<String> {
        sink.peek_pending(10_000)
            .into_iter()
            .filter(|line| line.stream == LogStream::Console)
            .map(|line| line.line)
            .collect()
    }

    fn append(path: &Path, bytes: &[u8]) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        file.write_all(bytes).unwrap();
    }

    /// Rotates as the driver does: the full file becomes `.1`, a fresh file takes its path.
    fn rotate(path: &Path) {
        let rotated = kiln_vmm::console::rotated_path(path);
        std::fs::rename(path, rotated).unwrap();
        std::fs::File::create(path).unwrap();
    }

    fn reader(dir: &Path) -> (ConsoleReader, LogSink, PathBuf) {
        let sink =
            LogSink::open(&dir.join("logs"), InstanceId::new(), LogConfig::default()).unwrap();
        let path = dir.join("console.log");
        (ConsoleReader::new(path.clone(), sink.clone()), sink, path)
    }

    #[test]
    fn new_console_read_from_start() {
        let dir = tempfile::tempdir().unwrap();
        let (mut reader, sink, path) = reader(dir.path());
        assert!(!reader.read_available());

        append(
            &path,
            b"Linux version 6.1\r\nkiln-init: boot failed: no such file\r\npart",
        );
        reader.read_available();
        append(&path, b"ial\r\n");
        reader.read_available();

        assert_eq!(
            console_lines(&sink),
            [
                "Linux version 6.1",
                "kiln-init: boot failed: no such file",
                "partial"
            ]
        );
    }

    #[test]
    fn earlier_output_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        append(&path, b"from the previous boot\r\n");
        let (mut reader, sink, _) = reader(dir.path());

        append(&path, b"from this boot\r\n");
        reader.read_available();

        assert_eq!(console_lines(&sink), ["from this boot"]);
    }

    #[test]
    fn rotation_loses_no_line() {
        let dir = tempfile::tempdir().unwrap();
        let (mut reader, sink, path) = reader(dir.path());
        append(&path, b"one\r\n");
        reader.read_available();

        // Written after the last read, then rotated away before the next one.
        append(&path, b"two\r\n");
        rotate(&path);
        append(&path, b"three\r\n");
        reader.read_available();
        reader.read_available();

        assert_eq!(console_lines(&sink), ["one", "two", "three"]);
    }

    #[test]
    fn double_rotation_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (mut reader, sink, path) = reader(dir.path());
        append(&path, b"one\r\n");
        reader.read_available();

        rotate(&path);
        append(&path, b"lost\r\n");
        rotate(&path);
        append(&path, b"three\r\n");
        reader.read_available();
        reader.read_available();

        let lines: Vec<String> = sink.peek_pending(100).into_iter().map(|l| l.line).collect();
        assert!(
            lines
                .iter()
                .any(|line| line.starts_with("console output skipped")),
            "{lines:?}"
        );
        assert_eq!(console_lines(&sink), ["one", "three"]);
    }

    #[test]
    fn flood_bounded_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LogSink::open(
            &dir.path().join("logs"),
            InstanceId::new(),
            LogConfig {
                max_file_bytes: 64 * 1024,
                max_files: 1,
                max_pending_bytes: 32 * 1024,
            },
        )
        .unwrap();
        let path = dir.path().join("console.log");
        let mut reader = ConsoleReader::new(path.clone(), sink.clone());
        let line = [b'x'; 99];
        let mut flood = Vec::new();
        for _ in 0..10_000 {
            flood.extend_from_slice(&line);
            flood.extend_from_slice(b"\r\n");
        }
        append(&path, &flood);
        while reader.read_available() {}

        let pending = sink.peek_pending(100_000);
        let queued: usize = pending.iter().map(|line| line.line.len()).sum();
        assert!(queued <= 32 * 1024 + 200, "{queued} bytes queued");
        assert!(
            pending[0].line.contains("log lines dropped"),
            "{}",
            pending[0].line
        );
        assert!(sink.dropped_total() > 9_000, "{}", sink.dropped_total());
        let on_disk: u64 = std::fs::read_dir(dir.path().join("logs"))
            .unwrap()
            .map(|entry| entry.unwrap().metadata().unwrap().len())
            .sum();
        assert!(on_disk <= 2 * 64 * 1024, "{on_disk} bytes on disk");
    }
}
