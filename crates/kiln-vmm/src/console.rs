//! Captures a VM's serial console into a log file of bounded size.
//!
//! The console is a byte stream the guest controls, so it can be flooded. The capture streams
//! it to disk through a fixed buffer and rotates the file when it reaches the limit, keeping
//! one older file (`console.log.1`): host memory stays constant and disk use is at most twice
//! the limit.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Copies `source` into `path` until the source closes, rotating at `limit_bytes`.
pub async fn capture(
    mut source: impl AsyncRead + Unpin,
    path: PathBuf,
    limit_bytes: u64,
) -> std::io::Result<()> {
    let mut file = open_append(&path).await?;
    let mut written = file.metadata().await?.len();
    let mut buffer = vec![0u8; 16 * 1024];

    loop {
        let read = source.read(&mut buffer).await?;
        if read == 0 {
            return file.flush().await;
        }

        let mut pending = &buffer[..read];
        while !pending.is_empty() {
            if written >= limit_bytes {
                file.flush().await?;
                drop(file);
                file = rotate(&path).await?;
                written = 0;
            }
            let room = usize::try_from(limit_bytes - written).unwrap_or(usize::MAX);
            let chunk = pending.len().min(room.max(1));
            file.write_all(&pending[..chunk]).await?;
            written += chunk as u64;
            pending = &pending[chunk..];
        }
    }
}

/// Path of the rotated, older console log.
pub fn rotated_path(path: &Path) -> PathBuf {
    sibling(path, ".1")
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Moves the full log to its rotated name and returns a fresh, empty log file.
///
/// The new file is created under a temporary name and renamed over the log, so the log's path
/// names a file at every moment: readers (`kiln logs`, operators running `tail -F`) never see
/// it missing.
async fn rotate(path: &Path) -> std::io::Result<tokio::fs::File> {
    let fresh_path = sibling(path, ".new");
    let link_path = sibling(path, ".old");

    let _ = tokio::fs::remove_file(&link_path).await;
    tokio::fs::hard_link(path, &link_path).await?;
    tokio::fs::rename(&link_path, rotated_path(path)).await?;
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&fresh_path)
        .await?;
    tokio::fs::rename(&fresh_path, path).await?;
    Ok(file)
}

async fn open_append(path: &Path) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rotates_at_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let flood = vec![b'x'; 10_000];

        capture(flood.as_slice(), path.clone(), 4096).await.unwrap();

        let current = std::fs::metadata(&path).unwrap().len();
        let old = std::fs::metadata(rotated_path(&path)).unwrap().len();
        assert!(current <= 4096, "current log has {current} bytes");
        assert!(old <= 4096, "rotated log has {old} bytes");
    }
}
