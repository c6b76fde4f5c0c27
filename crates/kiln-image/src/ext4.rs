//! Builds a read-only ext4 image from an unpacked root with `mkfs.ext4 -d`, sized from the
//! tree's own bytes and inode count.
//!
//! The image has no journal (nothing writes to it) and no reserved blocks, so its size tracks
//! the content. The estimate counts 4 KiB blocks per file, directory and long symlink, one
//! 256-byte inode per distinct inode plus headroom, and a margin for ext4's own metadata; if
//! `mkfs.ext4` still runs out of space the size grows and the build is retried.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::command::{self, CommandError};

const BLOCK_SIZE: u64 = 4096;
const INODE_SIZE: u64 = 256;
/// A symlink target this long or longer needs a data block (shorter ones live in the inode).
const FAST_SYMLINK_MAX: u64 = 60;
/// Fixed slack for superblocks, group descriptors, bitmaps and the root and lost+found
/// directories.
const FIXED_OVERHEAD: u64 = 16 * 1024 * 1024;
/// Attempts with a growing size before giving up.
const ATTEMPTS: u32 = 3;

/// What the image must hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeSize {
    /// 4 KiB data blocks of files, directories and long symlinks.
    pub blocks: u64,
    /// Distinct inodes (hardlinks count once).
    pub inodes: u64,
}

/// A failure to measure the tree or to build the image.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// Walking the unpacked tree failed.
    #[error("failed to measure {path}")]
    Measure {
        /// The path that could not be read.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating or sizing the output file failed.
    #[error("failed to create ext4 image file {path}")]
    CreateFile {
        /// The output file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `mkfs.ext4` failed.
    #[error("mkfs.ext4 failed for {path}")]
    Mkfs {
        /// The output file.
        path: PathBuf,
        /// The command's error, with command line, status and stderr.
        #[source]
        source: CommandError,
    },
}

/// Counts blocks and inodes of the tree at `root` without following symlinks.
pub fn measure(root: &Path) -> Result<TreeSize, Ext4Error> {
    let mut size = TreeSize::default();
    let mut seen_inodes = HashSet::new();
    let mut pending = vec![root.to_owned()];

    while let Some(dir) = pending.pop() {
        let measure_error = |source| Ext4Error::Measure {
            path: dir.clone(),
            source,
        };
        let mut dir_entry_bytes = 24;
        size.inodes += 1;
        for entry in fs::read_dir(&dir).map_err(measure_error)? {
            let entry = entry.map_err(measure_error)?;
            let metadata = entry.metadata().map_err(measure_error)?;
            // ext4 directory entries: 8 header bytes plus the name, padded to 4.
            dir_entry_bytes += (8 + entry.file_name().len() as u64).div_ceil(4) * 4;
            if metadata.is_dir() {
                pending.push(entry.path());
                continue;
            }
            if metadata.nlink() > 1 && !seen_inodes.insert(metadata.ino()) {
                continue;
            }
            size.inodes += 1;
            if metadata.is_file() {
                size.blocks += metadata.len().div_ceil(BLOCK_SIZE);
            } else if metadata.is_symlink() && metadata.len() >= FAST_SYMLINK_MAX {
                size.blocks += 1;
            }
        }
        size.blocks += dir_entry_bytes.div_ceil(BLOCK_SIZE).max(1);
    }
    Ok(size)
}

/// Returns the image size in bytes and the inode count to give `mkfs.ext4` for `tree`.
pub fn plan(tree: TreeSize) -> (u64, u64) {
    let inodes = tree.inodes + tree.inodes / 10 + 64;
    let data = tree.blocks * BLOCK_SIZE;
    // Extent tree blocks, bitmaps and group descriptors stay well under 3% of the data.
    let bytes = data + data / 32 + inodes * INODE_SIZE + FIXED_OVERHEAD;
    (bytes.div_ceil(1024 * 1024) * 1024 * 1024, inodes)
}

/// Builds the ext4 image `output` from `root` and fsyncs it; returns its size in bytes.
pub fn build(root: &Path, output: &Path) -> Result<u64, Ext4Error> {
    let tree = measure(root)?;
    let (mut bytes, inodes) = plan(tree);
    let mkfs = command::system_binary("mkfs.ext4");

    let mut attempt = 1;
    loop {
        let create_error = |source| Ext4Error::CreateFile {
            path: output.to_owned(),
            source,
        };
        let file = File::create(output).map_err(create_error)?;
        file.set_len(bytes).map_err(create_error)?;
        drop(file);

        let inode_count = inodes.to_string();
        let result = command::run(
            &mkfs,
            [
                "-q".as_ref(),
                "-F".as_ref(),
                "-t".as_ref(),
                "ext4".as_ref(),
                "-b".as_ref(),
                "4096".as_ref(),
                "-I".as_ref(),
                "256".as_ref(),
                "-N".as_ref(),
                inode_count.as_ref(),
                "-m".as_ref(),
                "0".as_ref(),
                "-O".as_ref(),
                "^has_journal,^resize_inode".as_ref(),
                "-E".as_ref(),
                "lazy_itable_init=0,nodiscard".as_ref(),
                "-L".as_ref(),
                "kiln-rootfs".as_ref(),
                "-d".as_ref(),
                root.as_os_str(),
                output.as_os_str(),
            ],
        );
        match result {
            Ok(_) => break,
            Err(CommandError::Failed { ref stderr, .. })
                if attempt < ATTEMPTS && is_out_of_space(stderr) =>
            {
                tracing::warn!(output = %output.display(), bytes, attempt, "ext4 image too small, retrying larger");
                bytes += bytes / 2;
                attempt += 1;
            }
            Err(source) => {
                return Err(Ext4Error::Mkfs {
                    path: output.to_owned(),
                    source,
                });
            }
        }
    }

    let file = File::open(output).map_err(|source| Ext4Error::CreateFile {
        path: output.to_owned(),
        source,
    })?;
    file.sync_all().map_err(|source| Ext4Error::CreateFile {
        path: output.to_owned(),
        source,
    })?;
    Ok(bytes)
}

fn is_out_of_space(stderr: &str) -> bool {
    ["No space left", "Could not allocate", "inodes", "too small"]
        .iter()
        .any(|needle| stderr.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_grows_with_content() {
        let small = plan(TreeSize {
            blocks: 10,
            inodes: 10,
        });
        let large = plan(TreeSize {
            blocks: 100_000,
            inodes: 20_000,
        });
        assert!(small.0 >= FIXED_OVERHEAD);
        assert!(large.0 > 100_000 * BLOCK_SIZE);
        assert!(large.1 > 20_000);
        assert_eq!(large.0 % (1024 * 1024), 0);
    }

    #[test]
    fn measure_counts_hardlinks_once() {
        let temp = tempfile::tempdir().unwrap();
        fs::write(temp.path().join("a"), vec![0u8; 5000]).unwrap();
        fs::hard_link(temp.path().join("a"), temp.path().join("b")).unwrap();
        fs::create_dir(temp.path().join("d")).unwrap();
        let size = measure(temp.path()).unwrap();
        assert_eq!(size.inodes, 3, "root, d and one inode for a and b");
        assert_eq!(
            size.blocks,
            2 + 1 + 1,
            "two file blocks and one per directory"
        );
    }
}
