//! The one way kiln-net runs an external program (today only `nft`).
//!
//! Programs are named by absolute path and run without a shell, so an interface name can never
//! be read as shell syntax; a failure carries the command line, the exit status and stderr.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

/// A failed external command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The program is not an absolute path.
    #[error("program path {program:?} must be absolute")]
    RelativeProgram {
        /// The rejected path.
        program: PathBuf,
    },
    /// The process could not be started.
    #[error("failed to start `{command_line}`")]
    Spawn {
        /// The command line that was run.
        command_line: String,
        /// Why spawning failed.
        #[source]
        source: std::io::Error,
    },
    /// Writing stdin or reading the output failed.
    #[error("failed to talk to `{command_line}`")]
    Io {
        /// The command line that was run.
        command_line: String,
        /// Why the pipe failed.
        #[source]
        source: std::io::Error,
    },
    /// The process exited unsuccessfully.
    #[error("`{command_line}` failed with {status}: {stderr}")]
    Failed {
        /// The command line that was run.
        command_line: String,
        /// The exit status.
        status: std::process::ExitStatus,
        /// Standard error, trimmed.
        stderr: String,
    },
}

/// Runs `program` with `args`, feeds `stdin` to it and returns its standard output.
///
/// The child inherits the calling thread's network namespace, which is what tests rely on.
pub async fn run_command(
    program: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Result<Vec<u8>, CommandError> {
    if !program.is_absolute() {
        return Err(CommandError::RelativeProgram {
            program: program.to_path_buf(),
        });
    }
    let command_line = std::iter::once(program.display().to_string())
        .chain(args.iter().map(|arg| (*arg).to_owned()))
        .collect::<Vec<_>>()
        .join(" ");

    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CommandError::Spawn {
            command_line: command_line.clone(),
            source,
        })?;

    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input)
            .await
            .map_err(|source| CommandError::Io {
                command_line: command_line.clone(),
                source,
            })?;
        drop(pipe);
    }

    let output = child
        .wait_with_output()
        .await
        .map_err(|source| CommandError::Io {
            command_line: command_line.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(CommandError::Failed {
            command_line,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failure_carries_command_line_and_stderr() {
        let error = run_command(Path::new("/bin/sh"), &["-c", "echo oops >&2; exit 3"], None)
            .await
            .unwrap_err();
        let message = error.to_string();
        assert!(message.contains("/bin/sh -c"), "{message}");
        assert!(message.contains("oops"), "{message}");
        assert!(message.contains("exit status: 3"), "{message}");
    }

    #[tokio::test]
    async fn relative_program_rejected() {
        let error = run_command(Path::new("nft"), &[], None).await.unwrap_err();
        assert!(matches!(error, CommandError::RelativeProgram { .. }));
    }

    #[tokio::test]
    async fn stdin_reaches_program() {
        let output = run_command(Path::new("/bin/cat"), &[], Some(b"frame"))
            .await
            .unwrap();
        assert_eq!(output, b"frame");
    }
}
