//! Running the real `kiln` binary in an isolated home: its own config directory, working
//! directory and environment, with stdin never a terminal.

#![allow(dead_code)] // Helpers for the tests that need a control plane.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use regex::Regex;

/// Result of one `kiln` run.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Run {
    /// Stdout and stderr together, for checks that something appears nowhere.
    pub(crate) fn all_output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// Parses stdout as JSON.
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// Asserts the exit code, printing both streams on failure.
    #[track_caller]
    pub(crate) fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "unexpected exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Asserts success.
    #[track_caller]
    pub(crate) fn ok(&self) -> &Self {
        self.expect_code(0)
    }
}

/// An isolated place to run `kiln`.
pub(crate) struct Kiln {
    home: tempfile::TempDir,
    workdir: PathBuf,
    env: Vec<(String, String)>,
}

impl Kiln {
    pub(crate) fn new() -> Self {
        let home = tempfile::Builder::new()
            .prefix("kiln-cli-test-")
            .tempdir()
            .unwrap();
        let workdir = home.path().join("project");
        std::fs::create_dir(&workdir).unwrap();
        Self {
            home,
            workdir,
            env: Vec::new(),
        }
    }

    /// The directory `kiln` runs in.
    pub(crate) fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// The config file `kiln login` writes.
    pub(crate) fn config_file(&self) -> PathBuf {
        self.home
            .path()
            .join("config")
            .join("kiln")
            .join("config.toml")
    }

    /// Sets an environment variable for every later run.
    pub(crate) fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Runs `kiln ARGS` with stdin empty (not a terminal).
    pub(crate) fn run(&self, args: &[&str]) -> Run {
        self.run_with_stdin(args, None)
    }

    /// Starts `kiln ARGS` with stdin empty and stdout and stderr piped, without waiting.
    pub(crate) fn spawn(&self, args: &[&str]) -> std::process::Child {
        self.command(args, false).spawn().expect("spawn kiln")
    }

    /// Builds `kiln ARGS` run by `script(1)` on a new pseudo-terminal, so stdin, stdout and
    /// stderr of `kiln` are a terminal. The returned command's own stdin and stdout are pipes
    /// to that terminal. Arguments are single-quoted for the shell `script` starts.
    pub(crate) fn terminal_command(&self, args: &[&str]) -> Command {
        let mut line = shell_quote(env!("CARGO_BIN_EXE_kiln"));
        for arg in args {
            line.push(' ');
            line.push_str(&shell_quote(arg));
        }
        let command = self.command(&[], true);
        let mut script = Command::new("script");
        script
            .args(["--quiet", "--return", "--command", &line, "/dev/null"])
            .current_dir(&self.workdir)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in command.get_envs() {
            if let Some(value) = value {
                script.env(key, value);
            }
        }
        script
    }

    fn command(&self, args: &[&str], piped_stdin: bool) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command
            .args(args)
            .current_dir(&self.workdir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .stdin(if piped_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in &self.env {
            command.env(key, value);
        }
        command
    }

    /// Runs `kiln ARGS` with `input` piped to stdin.
    pub(crate) fn run_with_stdin(&self, args: &[&str], input: Option<&str>) -> Run {
        let mut child = self
            .command(args, input.is_some())
            .spawn()
            .expect("spawn kiln");
        if let Some(input) = input {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        let output = child.wait_with_output().unwrap();
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8(output.stdout).unwrap(),
            stderr: String::from_utf8(output.stderr).unwrap(),
        }
    }
}

/// Quotes `text` for a POSIX shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// Replaces what changes between runs (ids, times, ports, temp paths, digests) with fixed
/// placeholders, so output can be compared to a snapshot.
pub(crate) fn redact(text: &str) -> String {
    let rules = [
        (
            r"\b(org|app|env|rel|dep|inst|host|tok|pln)_[0-9a-f]{32}\b",
            "[${1}_id]",
        ),
        (
            r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b",
            "[uuid]",
        ),
        (
            r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})",
            "[time]",
        ),
        (r"sha256:[0-9a-f]{64}", "sha256:[digest]"),
        (r"sha256:[0-9a-f]{12}\b", "sha256:[short]"),
        (r"127\.0\.0\.1:\d+", "127.0.0.1:[port]"),
        (r"/tmp/kiln-cli-test-[A-Za-z0-9]+", "[home]"),
        (r"kiln_[A-Za-z0-9_\-]{20,}", "[token]"),
        (r"fd[0-9a-f]{2}(:[0-9a-f]{0,4}){2,7}", "[ipv6]"),
        (r"\([0-9]+ ms\)", "([ms])"),
        (r"-[0-9a-f]{32}\b", "-[unique]"),
        (r"in [0-9]+s\b", "in [s]"),
    ];
    let mut text = text.to_owned();
    for (pattern, replacement) in rules {
        text = Regex::new(pattern)
            .unwrap()
            .replace_all(&text, replacement)
            .into_owned();
    }
    text
}
