//! Thin wrappers over the system calls kiln-init makes, each returning an error that names
//! the call and its argument, so a failed boot says exactly which step failed.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A failed system call: what was attempted, on which value, and the OS error.
#[derive(Debug)]
pub(crate) struct SysError {
    pub(crate) what: String,
    pub(crate) source: io::Error,
}

impl std::fmt::Display for SysError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}

impl std::error::Error for SysError {}

pub(crate) type SysResult<T> = Result<T, SysError>;

/// Attaches a description to an `io::Error`.
pub(crate) fn context<T>(result: io::Result<T>, what: impl FnOnce() -> String) -> SysResult<T> {
    result.map_err(|source| SysError {
        what: what(),
        source,
    })
}

/// Returns `Ok(value)` when a libc call succeeded (`value != -1`), the OS error otherwise.
pub(crate) fn check(value: libc::c_int, what: impl FnOnce() -> String) -> SysResult<libc::c_int> {
    if value == -1 {
        return Err(SysError {
            what: what(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(value)
}

pub(crate) fn cstring(path: &Path) -> CString {
    // Paths built by kiln-init never contain NUL bytes; one that does maps to an empty path,
    // which every call rejects with ENOENT.
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

/// Mounts `source` on `target` (created when missing).
pub(crate) fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> SysResult<()> {
    let describe = || format!("mount {fstype} {source} on {}", target.display());
    context(std::fs::create_dir_all(target), describe)?;

    let source_c = CString::new(source).unwrap_or_default();
    let target_c = cstring(target);
    let fstype_c = CString::new(fstype).unwrap_or_default();
    let data_c = CString::new(data).unwrap_or_default();
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let result = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            flags,
            data_c.as_ptr().cast(),
        )
    };
    check(result, describe).map(drop)
}

/// Moves the mount at `source` to `target` (created when missing).
pub(crate) fn move_mount(source: &Path, target: &Path) -> SysResult<()> {
    let describe = || format!("move mount {} to {}", source.display(), target.display());
    context(std::fs::create_dir_all(target), describe)?;

    let source_c = cstring(source);
    let target_c = cstring(target);
    // SAFETY: valid NUL-terminated strings; null fstype and data are allowed with MS_MOVE.
    let result = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    };
    check(result, describe).map(drop)
}

/// Makes the current directory the root: the classic `switch_root` move plus chroot.
pub(crate) fn switch_root(new_root: &Path) -> SysResult<()> {
    context(std::env::set_current_dir(new_root), || {
        format!("chdir {}", new_root.display())
    })?;
    move_mount(Path::new("."), Path::new("/"))?;

    let dot = cstring(Path::new("."));
    // SAFETY: valid NUL-terminated string.
    check(unsafe { libc::chroot(dot.as_ptr()) }, || {
        format!("chroot {}", new_root.display())
    })?;
    context(std::env::set_current_dir("/"), || "chdir /".to_owned())
}

/// Loads a kernel module from a file with `finit_module(2)`; an already loaded module is fine.
pub(crate) fn load_module(path: &Path) -> SysResult<()> {
    let file = context(std::fs::File::open(path), || {
        format!("open module {}", path.display())
    })?;
    let params = c"";
    // SAFETY: the fd is open for the duration of the call and params is NUL-terminated.
    let result = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            params.as_ptr(),
            0,
        )
    };
    if result != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(SysError {
            what: format!("load module {}", path.display()),
            source: error,
        });
    }
    Ok(())
}

/// Credits `seed` to the kernel's entropy pool with the `RNDADDENTROPY` ioctl on
/// `/dev/urandom`, so the guest's random numbers are ready without waiting for the pool.
pub(crate) fn add_entropy(seed: &[u8]) -> SysResult<()> {
    if seed.is_empty() {
        return Ok(());
    }
    let file = context(std::fs::File::open("/dev/urandom"), || {
        "open /dev/urandom".to_owned()
    })?;

    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut request = Vec::with_capacity(8 + seed.len());
    let bits = i32::try_from(seed.len() * 8).unwrap_or(i32::MAX);
    let len = i32::try_from(seed.len()).unwrap_or(i32::MAX);
    request.extend_from_slice(&bits.to_ne_bytes());
    request.extend_from_slice(&len.to_ne_bytes());
    request.extend_from_slice(seed);
    request.resize(request.len().next_multiple_of(4), 0);

    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    // SAFETY: request holds a rand_pool_info header followed by buf_size bytes.
    let result = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            RNDADDENTROPY,
            request.as_ptr(),
        )
    };
    check(result, || "RNDADDENTROPY on /dev/urandom".to_owned()).map(drop)
}

/// Sets the guest's hostname.
pub(crate) fn set_hostname(name: &str) -> SysResult<()> {
    // SAFETY: the pointer and length describe the bytes of `name`.
    let result = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    check(result, || format!("sethostname {name:?}")).map(drop)
}

/// Blocks the signals kiln-init handles synchronously with `sigwait`, in this thread and
/// every thread spawned after it. The mask is inherited across fork and exec, so children
/// that must receive these signals unblock them before exec.
pub(crate) fn block_signals(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &signal in signals {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits for one of the signals in `set` (which must be blocked) and returns its number.
pub(crate) fn wait_signal(set: &libc::sigset_t) -> libc::c_int {
    let mut signal: libc::c_int = 0;
    // SAFETY: set is initialised and signal is a valid out pointer.
    unsafe { libc::sigwait(set, &mut signal) };
    signal
}

/// Sends a signal to a process.
pub(crate) fn kill(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) };
}

/// Flushes filesystems and powers the VM off. Never returns.
pub(crate) fn power_off() -> ! {
    // SAFETY: sync and reboot have no memory-safety preconditions.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot only returns on failure; PID 1 exiting makes the kernel panic, and the
    // kernel's `panic=-1` plus QEMU's `-no-reboot` end the VM as well.
    std::process::exit(1)
}
