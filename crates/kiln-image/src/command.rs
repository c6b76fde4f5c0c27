//! The one way this crate runs external programs (`mkfs.ext4`): absolute paths, no shell,
//! and an error that carries the command line, the exit status and stderr.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// An external program that failed to start or exited unsuccessfully.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program could not be started (missing binary, permissions).
    #[error("failed to start `{command_line}`")]
    Spawn {
        /// The command line, for the operator to rerun by hand.
        command_line: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The program ran and exited unsuccessfully.
    #[error("`{command_line}` failed with {status}: {stderr}")]
    Failed {
        /// The command line, for the operator to rerun by hand.
        command_line: String,
        /// The exit status.
        status: ExitStatus,
        /// The program's stderr, trimmed.
        stderr: String,
    },
}

/// Runs `program` with `args` and returns its stdout; `program` must be an absolute path so
/// that `PATH` never decides which binary runs.
pub fn run<I, S>(program: &Path, args: I) -> Result<Vec<u8>, CommandError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args
        .into_iter()
        .map(|arg| arg.as_ref().to_owned())
        .collect();
    let command_line = std::iter::once(program.as_os_str())
        .chain(args.iter().map(|arg| arg.as_os_str()))
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");

    debug_assert!(
        program.is_absolute(),
        "{command_line}: program path must be absolute"
    );
    let output = Command::new(program)
        .args(&args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| CommandError::Spawn {
            command_line: command_line.clone(),
            source,
        })?;

    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        return Err(CommandError::Failed {
            command_line,
            status: output.status,
            stderr,
        });
    }
    Ok(output.stdout)
}

/// Finds `name` in the usual system directories and returns its absolute path, or the
/// `/usr/sbin` path when it is in none (so the spawn error names a plausible location).
pub fn system_binary(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| Path::new("/usr/sbin").join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_carries_command_line_and_stderr() {
        let error = run(Path::new("/bin/ls"), ["/kiln-no-such-path"]).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("/bin/ls /kiln-no-such-path"), "{message}");
        assert!(message.contains("No such file"), "{message}");
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let error = run(Path::new("/kiln-no-such-binary"), ["x"]).unwrap_err();
        assert!(matches!(error, CommandError::Spawn { .. }), "{error:?}");
    }
}
