//! Directory handles that resolve paths inside a root without ever following a symlink out
//! of it, the primitive under the safe layer unpack.
//!
//! Paths are resolved with `openat2(2)` and `RESOLVE_BENEATH`: the kernel rejects with
//! `EXDEV` any resolution that leaves the starting directory, whether through `..`, an
//! absolute path or a symlink, and does so atomically, so a string check cannot be raced or
//! fooled. Final path components are never followed: every `*at` call here passes
//! `AT_SYMLINK_NOFOLLOW` or `O_NOFOLLOW`.

use std::ffi::{CStr, CString, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// An open directory.
#[derive(Debug)]
pub(crate) struct Dir {
    fd: OwnedFd,
}

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Converts a path component or relative path to a C string; a NUL byte is invalid input.
pub(crate) fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

impl Dir {
    /// Opens the directory at `path` (an ordinary path, trusted).
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let path = c_string(path.as_os_str().as_bytes())?;
        // SAFETY: `path` is a valid NUL-terminated string; the returned fd is checked.
        let fd = check(unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` was just returned by open(2) and is owned by nobody else.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn openat2(&self, relative: &CStr, flags: libc::c_int, resolve: u64) -> io::Result<OwnedFd> {
        // SAFETY: an all-zero open_how is valid (no flags, no mode, no resolve restrictions).
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = flags as u64;
        how.resolve = resolve;
        // SAFETY: `relative` is NUL-terminated and `how` is a valid open_how of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.fd.as_raw_fd(),
                relative.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: openat2 returned a new fd that nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
    }

    /// Opens the directory `relative` beneath this one; symlinks along the way are followed
    /// only while they stay beneath it (`EXDEV` otherwise), magic links never.
    pub(crate) fn open_dir_beneath(&self, relative: &[u8]) -> io::Result<Self> {
        let relative = c_string(relative)?;
        let fd = self.openat2(
            &relative,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
        )?;
        Ok(Self { fd })
    }

    /// Opens the file `relative` for reading as if this directory were `/`: absolute
    /// symlinks and `..` resolve inside it, as they would inside the guest.
    pub(crate) fn open_file_in_root(&self, relative: &[u8]) -> io::Result<File> {
        let relative = c_string(relative)?;
        let fd = self.openat2(
            &relative,
            libc::O_RDONLY | libc::O_CLOEXEC,
            libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
        )?;
        Ok(File::from(fd))
    }

    /// Opens the child directory `name` without following a symlink.
    pub(crate) fn open_child_dir(&self, name: &CStr) -> io::Result<Self> {
        // SAFETY: `name` is NUL-terminated; the fd is checked.
        let fd = check(unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: openat returned a new fd that nobody else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Returns the `lstat` of the child `name`, or `None` when it does not exist.
    pub(crate) fn stat(&self, name: &CStr) -> io::Result<Option<libc::stat>> {
        // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `name` is NUL-terminated and `stat` is a valid out pointer.
        let result = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                &mut stat,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        match check(result) {
            Ok(_) => Ok(Some(stat)),
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Creates the child directory `name`.
    pub(crate) fn mkdir(&self, name: &CStr, mode: u32) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated.
        check(unsafe { libc::mkdirat(self.fd.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
    }

    /// Creates the regular file `name`, which must not exist yet (so no symlink is followed).
    pub(crate) fn create_file(&self, name: &CStr) -> io::Result<File> {
        let flags =
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: `name` is NUL-terminated; the fd is checked.
        let fd = check(unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                flags,
                0o600 as libc::c_uint,
            )
        })?;
        // SAFETY: openat returned a new fd that nobody else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Creates the symlink `name` pointing at `target` (which is stored, never resolved).
    pub(crate) fn symlink(&self, target: &CStr, name: &CStr) -> io::Result<()> {
        // SAFETY: both strings are NUL-terminated.
        check(unsafe { libc::symlinkat(target.as_ptr(), self.fd.as_raw_fd(), name.as_ptr()) })
            .map(drop)
    }

    /// Creates the hardlink `name` to `source_dir/source_name`; a symlink source is linked
    /// itself, not followed.
    pub(crate) fn hardlink(
        &self,
        source_dir: &Dir,
        source_name: &CStr,
        name: &CStr,
    ) -> io::Result<()> {
        // SAFETY: both names are NUL-terminated and both fds are open; flags 0 means no follow.
        check(unsafe {
            libc::linkat(
                source_dir.fd.as_raw_fd(),
                source_name.as_ptr(),
                self.fd.as_raw_fd(),
                name.as_ptr(),
                0,
            )
        })
        .map(drop)
    }

    /// Creates the device node or FIFO `name`.
    pub(crate) fn mknod(&self, name: &CStr, mode: u32, device: libc::dev_t) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated.
        check(unsafe { libc::mknodat(self.fd.as_raw_fd(), name.as_ptr(), mode, device) }).map(drop)
    }

    /// Sets the owner of the child `name` without following a symlink.
    pub(crate) fn chown(&self, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated.
        check(unsafe {
            libc::fchownat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop)
    }

    /// Sets the mode of the child `name`, which the caller just created (so it is not a
    /// symlink: `fchmodat` has no working no-follow flag on Linux).
    pub(crate) fn chmod(&self, name: &CStr, mode: u32) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated.
        check(unsafe { libc::fchmodat(self.fd.as_raw_fd(), name.as_ptr(), mode, 0) }).map(drop)
    }

    /// Sets the access and modification time of the child `name` (or of this directory when
    /// `name` is `None`) to `mtime` seconds, without following a symlink.
    pub(crate) fn set_mtime(&self, name: Option<&CStr>, mtime: i64) -> io::Result<()> {
        let time = libc::timespec {
            tv_sec: mtime,
            tv_nsec: 0,
        };
        let times = [time, time];
        let result = match name {
            // SAFETY: `name` is NUL-terminated and `times` contains two timespecs.
            Some(name) => unsafe {
                libc::utimensat(
                    self.fd.as_raw_fd(),
                    name.as_ptr(),
                    times.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            },
            // SAFETY: the fd is open and `times` contains two timespecs.
            None => unsafe { libc::futimens(self.fd.as_raw_fd(), times.as_ptr()) },
        };
        check(result).map(drop)
    }

    /// Sets owner and mode of this directory itself.
    pub(crate) fn set_owner_and_mode(&self, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
        // SAFETY: the fd is open.
        check(unsafe { libc::fchown(self.fd.as_raw_fd(), uid, gid) })?;
        // SAFETY: the fd is open; chmod comes after chown because chown clears setuid/setgid.
        check(unsafe { libc::fchmod(self.fd.as_raw_fd(), mode) }).map(drop)
    }

    /// Sets the extended attribute `name` on this directory itself.
    pub(crate) fn set_xattr(&self, name: &CStr, value: &[u8]) -> io::Result<()> {
        set_xattr(self.fd.as_raw_fd(), name, value)
    }

    /// Removes the child `name`: a file, symlink or an empty directory.
    pub(crate) fn unlink(&self, name: &CStr, is_dir: bool) -> io::Result<()> {
        let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: `name` is NUL-terminated.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
    }

    /// Removes the child `name` and, for a directory, everything below it; a missing child is
    /// not an error. Symlinks are removed, never followed.
    pub(crate) fn remove_all(&self, name: &CStr) -> io::Result<()> {
        let Some(stat) = self.stat(name)? else {
            return Ok(());
        };
        let is_dir = stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if is_dir {
            let child = self.open_child_dir(name)?;
            for entry in child.list()? {
                child.remove_all(&c_string(entry.as_bytes())?)?;
            }
        }
        self.unlink(name, is_dir)
    }

    /// Lists the names in this directory, without `.` and `..`.
    pub(crate) fn list(&self) -> io::Result<Vec<OsString>> {
        // The /proc path names this already-open fd, so nothing is resolved again.
        let mut names = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))? {
            names.push(entry?.file_name());
        }
        Ok(names)
    }
}

/// Sets the extended attribute `name` on the open file `fd`.
pub(crate) fn set_xattr(fd: libc::c_int, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and `value` is a valid buffer of the given length.
    check(unsafe { libc::fsetxattr(fd, name.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beneath_rejects_symlink_escape() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("root");
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("../..", root.join("up")).unwrap();
        std::os::unix::fs::symlink("/usr", root.join("absolute")).unwrap();
        let dir = Dir::open(&root).unwrap();

        assert!(dir.open_dir_beneath(b"lib").is_ok());
        for escape in [&b"up"[..], b"absolute", b"../root", b"/tmp"] {
            let error = dir.open_dir_beneath(escape).unwrap_err();
            assert_eq!(
                error.raw_os_error(),
                Some(libc::EXDEV),
                "{}",
                String::from_utf8_lossy(escape)
            );
        }
    }

    #[test]
    fn remove_all_does_not_follow_symlinks() {
        let temp = tempfile::tempdir().unwrap();
        let outside = temp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"x").unwrap();
        let root = temp.path().join("root");
        std::fs::create_dir_all(root.join("tree/sub")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("tree/sub/link")).unwrap();

        let dir = Dir::open(&root).unwrap();
        dir.remove_all(&c_string(b"tree").unwrap()).unwrap();
        assert!(!root.join("tree").exists());
        assert!(outside.join("keep").exists());
    }
}
