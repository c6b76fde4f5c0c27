//! Applies image layers, lowest first, to a root directory: whiteouts, opaque directories,
//! hardlinks, symlinks, device nodes, ownership, modes, mtimes and xattrs.
//!
//! No entry can write outside the root. Entry names with `..` components or a leading `/`
//! are rejected outright. Parent directories are opened with `RESOLVE_BENEATH`, so a symlink
//! planted by an earlier entry or layer is followed only while it stays inside the root. A
//! symlink that leaves it (`..` past the root, or an absolute target) rejects the image. The last
//! component is never followed: an existing entry of that name is removed first and files are
//! created with `O_EXCL | O_NOFOLLOW`. Hardlink targets are resolved the same way.
//!
//! Ownership is applied with real `chown`, so unpacking needs root (or `CAP_CHOWN`).

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::dirfd::{self, Dir, c_string};
use crate::manifest::Compression;

/// Prefix of a whiteout file: `.wh.NAME` deletes `NAME` from lower layers.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// An opaque-directory marker: the directory hides everything below it from lower layers.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Mode of parent directories that an image implies but has no entry for.
const IMPLIED_DIR_MODE: u32 = 0o755;
/// Read buffer for layer blobs, in bytes.
const READ_BUFFER: usize = 256 * 1024;

/// One layer blob to apply.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The layer's digest (used in errors).
    pub digest: Digest,
    /// The verified blob on disk.
    pub path: PathBuf,
    /// The blob's compression.
    pub compression: Compression,
}

/// A failure while applying a layer; every variant names the layer.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The root directory could not be opened.
    #[error("failed to open unpack root {path}")]
    OpenRoot {
        /// The root directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The blob could not be read or decompressed, or is not a valid tar.
    #[error("failed to read layer {layer}")]
    Read {
        /// The layer digest.
        layer: Digest,
        /// The read or decode error.
        #[source]
        source: io::Error,
    },
    /// An entry would write outside the root, or its name is malformed.
    #[error("layer {layer} rejected: entry {entry:?} {reason}")]
    Unsafe {
        /// The layer digest.
        layer: Digest,
        /// The entry name as stored in the tar.
        entry: String,
        /// The reason the entry is rejected.
        reason: &'static str,
    },
    /// The tar entry type is not one a root filesystem can contain.
    #[error("layer {layer}: entry {entry:?} has unsupported tar type {kind:?}")]
    UnsupportedType {
        /// The layer digest.
        layer: Digest,
        /// The entry name as stored in the tar.
        entry: String,
        /// The tar type byte.
        kind: char,
    },
    /// The image unpacks to more than a limit allows.
    #[error(
        "layer {layer}: the image unpacks to more than {limit} {quantity}; if it is meant to be \
         this large, raise {setting} in the agent's image store config"
    )]
    TooLarge {
        /// The layer being applied when the limit was reached.
        layer: Digest,
        /// Counted quantity: `bytes of file content` or `entries`.
        quantity: &'static str,
        /// The limit.
        limit: u64,
        /// The config key that sets the limit.
        setting: &'static str,
    },
    /// A filesystem operation on an entry failed.
    #[error("layer {layer}: failed to {operation} {entry:?}")]
    Write {
        /// The layer digest.
        layer: Digest,
        /// The entry name as stored in the tar.
        entry: String,
        /// The operation that failed (`create`, `chown`, ...).
        operation: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Caps on what one image may unpack to, so a layer that decompresses to far more than its
/// blob (a decompression bomb, or an image much larger than intended) fails the build before
/// it fills the store's filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Bytes of regular file content, over all layers.
    pub max_bytes: u64,
    /// Tar entries, over all layers.
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        Self {
            max_bytes: 16 * 1024 * 1024 * 1024,
            max_entries: 1_000_000,
        }
    }
}

/// Counts from one unpack, for logs and the ext4 sizing.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnpackStats {
    /// Tar entries applied, over all layers.
    pub entries: u64,
    /// Bytes of regular file content written.
    pub bytes: u64,
}

/// Applies `layers` in order to the existing, empty directory `root`, failing once their
/// content or entry count exceeds `limits`.
pub fn unpack(
    root: &Path,
    layers: &[Layer],
    limits: UnpackLimits,
) -> Result<UnpackStats, UnpackError> {
    let root_dir = Dir::open(root).map_err(|source| UnpackError::OpenRoot {
        path: root.to_owned(),
        source,
    })?;
    let mut unpacker = Unpacker {
        root: root_dir,
        limits,
        stats: UnpackStats::default(),
        dir_mtimes: HashMap::new(),
    };

    for layer in layers {
        let _span = tracing::debug_span!("layer", digest = %layer.digest).entered();
        unpacker.apply_layer(layer)?;
    }

    unpacker.restore_dir_mtimes();
    Ok(unpacker.stats)
}

struct Unpacker {
    root: Dir,
    limits: UnpackLimits,
    stats: UnpackStats,
    /// Directory mtimes, applied after all layers because creating children changes them.
    dir_mtimes: HashMap<Vec<u8>, i64>,
}

/// State of the layer being applied.
struct LayerState<'a> {
    layer: &'a Layer,
    /// Paths this layer created, and all their ancestors (what an opaque marker keeps).
    touched: HashSet<Vec<u8>>,
    /// The most recently opened parent directory, reused while entries share a parent.
    cached_parent: Option<(Vec<u8>, Dir)>,
}

/// An entry name split into its parent path and final component.
struct EntryPath {
    /// The normalized path, components joined by `/`; empty for the root itself.
    full: Vec<u8>,
    /// The parent path, empty for entries directly in the root.
    parent: Vec<u8>,
    /// The final component.
    name: Vec<u8>,
}

/// Normalizes a tar entry name: drops `.` and empty components, rejects `..` and absolute
/// names.
fn normalize(raw: &[u8]) -> Result<EntryPath, &'static str> {
    if raw.starts_with(b"/") {
        return Err("has an absolute path");
    }
    let mut components = Vec::new();
    for component in raw.split(|&byte| byte == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err("has a `..` component"),
            other => components.push(other),
        }
    }
    let Some((name, parents)) = components.split_last() else {
        return Ok(EntryPath {
            full: Vec::new(),
            parent: Vec::new(),
            name: Vec::new(),
        });
    };
    let parent = parents.join(&b'/');
    let full = components.join(&b'/');
    Ok(EntryPath {
        full,
        parent,
        name: name.to_vec(),
    })
}

fn open_decoder(layer: &Layer) -> io::Result<Box<dyn Read>> {
    let file = BufReader::with_capacity(READ_BUFFER, File::open(&layer.path)?);
    Ok(match layer.compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(file)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(file)?),
    })
}

impl Unpacker {
    fn apply_layer(&mut self, layer: &Layer) -> Result<(), UnpackError> {
        let read_error = |source| UnpackError::Read {
            layer: layer.digest.clone(),
            source,
        };
        let mut archive = tar::Archive::new(open_decoder(layer).map_err(read_error)?);
        let mut state = LayerState {
            layer,
            touched: HashSet::new(),
            cached_parent: None,
        };

        for entry in archive.entries().map_err(read_error)? {
            let mut entry = entry.map_err(read_error)?;
            if self.stats.entries >= self.limits.max_entries {
                return Err(UnpackError::TooLarge {
                    layer: layer.digest.clone(),
                    quantity: "entries",
                    limit: self.limits.max_entries,
                    setting: "max_unpacked_entries",
                });
            }
            self.apply_entry(&mut state, &mut entry)?;
            self.stats.entries += 1;
        }
        Ok(())
    }

    fn apply_entry(
        &mut self,
        state: &mut LayerState<'_>,
        entry: &mut tar::Entry<'_, Box<dyn Read>>,
    ) -> Result<(), UnpackError> {
        let raw_name = entry.path_bytes().into_owned();
        let display = String::from_utf8_lossy(&raw_name).into_owned();
        let layer = state.layer;
        let unsafe_entry = |reason| UnpackError::Unsafe {
            layer: layer.digest.clone(),
            entry: display.clone(),
            reason,
        };
        let write_error = |operation, source| UnpackError::Write {
            layer: layer.digest.clone(),
            entry: display.clone(),
            operation,
            source,
        };

        let kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::XGlobalHeader) {
            return Ok(());
        }
        let path = normalize(&raw_name).map_err(unsafe_entry)?;
        let header = entry.header();
        let uid = header.uid().map_err(|source| UnpackError::Read {
            layer: layer.digest.clone(),
            source,
        })? as u32;
        let gid = header.gid().map_err(|source| UnpackError::Read {
            layer: layer.digest.clone(),
            source,
        })? as u32;
        let mode = header.mode().map_err(|source| UnpackError::Read {
            layer: layer.digest.clone(),
            source,
        })? & 0o7777;
        let mtime = header.mtime().unwrap_or(0) as i64;

        if path.name.is_empty() {
            // The root directory itself (`./`): only its metadata applies.
            if !kind.is_dir() {
                return Err(unsafe_entry("names the root but is not a directory"));
            }
            self.root
                .set_owner_and_mode(uid, gid, mode)
                .map_err(|error| write_error("set owner and mode of", error))?;
            self.dir_mtimes.insert(Vec::new(), mtime);
            return Ok(());
        }

        if path.name == OPAQUE_MARKER {
            state.cached_parent = None;
            let Some(parent) = self
                .resolve_dir(&path.parent, false)
                .map_err(|error| classify(error, &unsafe_entry, &write_error))?
            else {
                return Ok(());
            };
            prune_opaque(&parent, &path.parent, &state.touched)
                .map_err(|error| write_error("clear opaque directory", error))?;
            return Ok(());
        }
        if let Some(hidden) = path.name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.starts_with(WHITEOUT_PREFIX) {
                // Other `.wh..wh.` names are AUFS metadata with no meaning in OCI layers.
                return Ok(());
            }
            state.cached_parent = None;
            let Some(parent) = self
                .resolve_dir(&path.parent, false)
                .map_err(|error| classify(error, &unsafe_entry, &write_error))?
            else {
                return Ok(());
            };
            let hidden = c_string(hidden).map_err(|error| write_error("apply whiteout", error))?;
            parent
                .remove_all(&hidden)
                .map_err(|error| write_error("apply whiteout", error))?;
            return Ok(());
        }

        let hardlink_source = if kind == tar::EntryType::Link {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| unsafe_entry("is a hardlink without a target"))?;
            let target = normalize(&target)
                .map_err(|_| unsafe_entry("is a hardlink whose target leaves the root"))?;
            if target.name.is_empty() {
                return Err(unsafe_entry("is a hardlink to the root directory"));
            }
            let source_dir = match self.root.open_dir_beneath(if target.parent.is_empty() {
                b"."
            } else {
                &target.parent
            }) {
                Ok(dir) => dir,
                Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {
                    return Err(unsafe_entry("is a hardlink to a path that does not exist"));
                }
                Err(error) => {
                    return Err(classify(
                        error,
                        &|_| unsafe_entry("is a hardlink whose target leaves the root"),
                        &|op, e| write_error(op, e),
                    ));
                }
            };
            Some((
                source_dir,
                c_string(&target.name).map_err(|error| write_error("link", error))?,
            ))
        } else {
            None
        };

        let parent = self
            .open_parent(state, &path.parent, true)
            .map_err(|error| classify(error, &unsafe_entry, &write_error))?
            .ok_or_else(|| unsafe_entry("has a parent that could not be created"))?;
        let name = c_string(&path.name).map_err(|error| write_error("create", error))?;
        let existing = parent
            .stat(&name)
            .map_err(|error| write_error("inspect", error))?;
        let existing_is_dir =
            existing.is_some_and(|stat| stat.st_mode & libc::S_IFMT == libc::S_IFDIR);

        // Replacing anything but a directory with a directory removes it first; a directory
        // over a directory keeps the lower layer's contents.
        let keep_existing = kind.is_dir() && existing_is_dir;
        if existing.is_some() && !keep_existing {
            if let Some((source_dir, source_name)) = &hardlink_source {
                let source = source_dir
                    .stat(source_name)
                    .map_err(|error| write_error("inspect hardlink target of", error))?;
                if let (Some(source), Some(existing)) = (source, existing)
                    && source.st_ino == existing.st_ino
                    && source.st_dev == existing.st_dev
                {
                    return Ok(());
                }
            }
            parent
                .remove_all(&name)
                .map_err(|error| write_error("replace", error))?;
        }
        let parent_changed = existing.is_some() && !keep_existing;

        match kind {
            tar::EntryType::Directory => {
                if !keep_existing {
                    parent
                        .mkdir(&name, 0o700)
                        .map_err(|error| write_error("create directory", error))?;
                }
                let dir = parent
                    .open_child_dir(&name)
                    .map_err(|error| write_error("open directory", error))?;
                dir.set_owner_and_mode(uid, gid, mode)
                    .map_err(|error| write_error("set owner and mode of", error))?;
                for (key, value) in
                    xattrs(entry).map_err(|error| write_error("read xattrs of", error))?
                {
                    dir.set_xattr(&key, &value)
                        .map_err(|error| write_error("set xattr on", error))?;
                }
                self.dir_mtimes.insert(path.full.clone(), mtime);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                // The header's size is checked first, so an entry that would cross the limit
                // writes nothing. The copy is bounded too, in case the header understates it.
                let limit = self.limits.max_bytes;
                let remaining = limit.saturating_sub(self.stats.bytes);
                let too_large = || UnpackError::TooLarge {
                    layer: layer.digest.clone(),
                    quantity: "bytes of file content",
                    limit,
                    setting: "max_unpacked_bytes",
                };
                if entry.size() > remaining {
                    return Err(too_large());
                }
                let xattrs = xattrs(entry).map_err(|error| write_error("read xattrs of", error))?;
                let mut file = parent
                    .create_file(&name)
                    .map_err(|error| write_error("create", error))?;
                let written = io::copy(
                    &mut Read::take(&mut *entry, remaining.saturating_add(1)),
                    &mut file,
                )
                .map_err(|source| UnpackError::Read {
                    layer: layer.digest.clone(),
                    source,
                })?;
                if written > remaining {
                    return Err(too_large());
                }
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                    .map_err(|error| write_error("chown", error))?;
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(|error| write_error("chmod", error))?;
                for (key, value) in xattrs {
                    dirfd::set_xattr(file.as_raw_fd(), &key, &value)
                        .map_err(|error| write_error("set xattr on", error))?;
                }
                let time =
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime.max(0) as u64);
                file.set_times(
                    std::fs::FileTimes::new()
                        .set_accessed(time)
                        .set_modified(time),
                )
                .map_err(|error| write_error("set mtime of", error))?;
                self.stats.bytes += written;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry("is a symlink without a target"))?;
                let target =
                    c_string(&target).map_err(|error| write_error("create symlink", error))?;
                parent
                    .symlink(&target, &name)
                    .map_err(|error| write_error("create symlink", error))?;
                parent
                    .chown(&name, uid, gid)
                    .map_err(|error| write_error("chown", error))?;
                parent
                    .set_mtime(Some(&name), mtime)
                    .map_err(|error| write_error("set mtime of", error))?;
            }
            tar::EntryType::Link => {
                let Some((source_dir, source_name)) = hardlink_source else {
                    return Err(unsafe_entry("is a hardlink without a target"));
                };
                match source_dir
                    .stat(&source_name)
                    .map_err(|error| write_error("inspect hardlink target of", error))?
                {
                    None => {
                        return Err(unsafe_entry("is a hardlink to a path that does not exist"));
                    }
                    Some(stat) if stat.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                        return Err(unsafe_entry("is a hardlink to a directory"));
                    }
                    Some(_) => {}
                }
                parent
                    .hardlink(&source_dir, &source_name, &name)
                    .map_err(|error| write_error("create hardlink", error))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let file_type = match kind {
                    tar::EntryType::Char => libc::S_IFCHR,
                    tar::EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                parent
                    .mknod(&name, file_type | mode, libc::makedev(major, minor))
                    .map_err(|error| write_error("create device node", error))?;
                parent
                    .chown(&name, uid, gid)
                    .map_err(|error| write_error("chown", error))?;
                // mknod applies the umask, and chown clears setuid and setgid bits.
                parent
                    .chmod(&name, mode)
                    .map_err(|error| write_error("chmod", error))?;
                parent
                    .set_mtime(Some(&name), mtime)
                    .map_err(|error| write_error("set mtime of", error))?;
            }
            other => {
                return Err(UnpackError::UnsupportedType {
                    layer: layer.digest.clone(),
                    entry: display,
                    kind: other.as_byte() as char,
                });
            }
        }

        if parent_changed || !matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
            state.cached_parent = None;
        }
        mark_touched(&mut state.touched, &path.full);
        Ok(())
    }

    /// Opens the parent directory `parent` (a normalized path), creating missing directories
    /// with root ownership and mode 0755 when `create` is set. Returns `None` when it does not
    /// exist and `create` is not set.
    fn open_parent<'s>(
        &self,
        state: &'s mut LayerState<'_>,
        parent: &[u8],
        create: bool,
    ) -> io::Result<Option<&'s Dir>> {
        let cached = state
            .cached_parent
            .as_ref()
            .is_some_and(|(path, _)| path == parent);
        if !cached {
            let Some(dir) = self.resolve_dir(parent, create)? else {
                return Ok(None);
            };
            state.cached_parent = Some((parent.to_vec(), dir));
        }
        Ok(state.cached_parent.as_ref().map(|(_, dir)| dir))
    }

    fn resolve_dir(&self, path: &[u8], create: bool) -> io::Result<Option<Dir>> {
        if path.is_empty() {
            return self.root.open_dir_beneath(b".").map(Some);
        }
        match self.root.open_dir_beneath(path) {
            Ok(dir) => return Ok(Some(dir)),
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) && create => {}
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(error) => return Err(error),
        }

        // Walk down from the root, creating each missing directory inside the last one that
        // resolved safely.
        let mut current = self.root.open_dir_beneath(b".")?;
        let mut prefix = Vec::new();
        for component in path.split(|&byte| byte == b'/') {
            if !prefix.is_empty() {
                prefix.push(b'/');
            }
            prefix.extend_from_slice(component);
            current = match self.root.open_dir_beneath(&prefix) {
                Ok(dir) => dir,
                Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {
                    let name = c_string(component)?;
                    current.mkdir(&name, IMPLIED_DIR_MODE)?;
                    current.chown(&name, 0, 0)?;
                    // mkdir applies the process umask, so the mode is set explicitly.
                    current.chmod(&name, IMPLIED_DIR_MODE)?;
                    self.root.open_dir_beneath(&prefix)?
                }
                Err(error) => return Err(error),
            };
        }
        Ok(Some(current))
    }

    fn restore_dir_mtimes(&self) {
        for (path, mtime) in &self.dir_mtimes {
            let relative: &[u8] = if path.is_empty() { b"." } else { path };
            // A directory removed by a later layer has nothing to restore.
            if let Ok(dir) = self.root.open_dir_beneath(relative)
                && let Err(error) = dir.set_mtime(None, *mtime)
            {
                tracing::debug!(path = %String::from_utf8_lossy(path), %error, "failed to restore directory mtime");
            }
        }
    }
}

/// Maps a resolution error to `Unsafe` when the kernel reports an escape (`EXDEV`, or
/// `ELOOP` from a symlink loop) and to a write error otherwise.
fn classify(
    error: io::Error,
    unsafe_entry: &dyn Fn(&'static str) -> UnpackError,
    write_error: &dyn Fn(&'static str, io::Error) -> UnpackError,
) -> UnpackError {
    match error.raw_os_error() {
        Some(libc::EXDEV) => unsafe_entry("resolves through a symlink that leaves the root"),
        Some(libc::ELOOP) => unsafe_entry("resolves through a symlink loop"),
        Some(libc::ENOTDIR) => unsafe_entry("has a parent that is not a directory"),
        _ => write_error("open parent directory of", error),
    }
}

fn mark_touched(touched: &mut HashSet<Vec<u8>>, full: &[u8]) {
    let mut end = full.len();
    loop {
        if !touched.insert(full[..end].to_vec()) {
            return;
        }
        match full[..end].iter().rposition(|&byte| byte == b'/') {
            Some(slash) => end = slash,
            None => return,
        }
    }
}

/// Removes everything below `dir` that the current layer did not create.
fn prune_opaque(dir: &Dir, dir_path: &[u8], touched: &HashSet<Vec<u8>>) -> io::Result<()> {
    for child in dir.list()? {
        let child_bytes = std::os::unix::ffi::OsStrExt::as_bytes(child.as_os_str());
        let mut child_path = dir_path.to_vec();
        if !child_path.is_empty() {
            child_path.push(b'/');
        }
        child_path.extend_from_slice(child_bytes);
        let name = c_string(child_bytes)?;

        if !touched.contains(&child_path) {
            dir.remove_all(&name)?;
            continue;
        }
        let is_dir = dir
            .stat(&name)?
            .is_some_and(|stat| stat.st_mode & libc::S_IFMT == libc::S_IFDIR);
        if is_dir {
            prune_opaque(&dir.open_child_dir(&name)?, &child_path, touched)?;
        }
    }
    Ok(())
}

/// Reads the `SCHILY.xattr.*` PAX records of an entry.
fn xattrs(entry: &mut tar::Entry<'_, Box<dyn Read>>) -> io::Result<Vec<(CString, Vec<u8>)>> {
    let mut found = Vec::new();
    let Some(extensions) = entry.pax_extensions()? else {
        return Ok(found);
    };
    for extension in extensions {
        let extension = extension?;
        if let Some(name) = extension.key_bytes().strip_prefix(b"SCHILY.xattr.") {
            found.push((c_string(name)?, extension.value_bytes().to_vec()));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_strips_dot_components() {
        let path = normalize(b"./usr//bin/./env").unwrap();
        assert_eq!(path.full, b"usr/bin/env");
        assert_eq!(path.parent, b"usr/bin");
        assert_eq!(path.name, b"env");
        assert!(normalize(b"./").unwrap().name.is_empty());
    }

    #[test]
    fn normalize_rejects_escapes() {
        assert!(normalize(b"../etc/passwd").is_err());
        assert!(normalize(b"usr/../../etc").is_err());
        assert!(normalize(b"/etc/passwd").is_err());
    }

    #[test]
    fn touched_marks_ancestors() {
        let mut touched = HashSet::new();
        mark_touched(&mut touched, b"a/b/c");
        assert!(touched.contains(&b"a"[..]));
        assert!(touched.contains(&b"a/b"[..]));
        assert!(touched.contains(&b"a/b/c"[..]));
    }
}
