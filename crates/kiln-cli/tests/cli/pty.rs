//! Paths that only run on a terminal, under a real pseudo-terminal: `script(1)` from
//! util-linux gives `kiln` a pty as stdin, stdout, stderr and controlling terminal, and the
//! test types into it.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::harness::Kiln;
use crate::plans::{project, start_hosts};
use crate::registry::{Registry, unique_repository};
use crate::server::Control;

/// Time `kiln login` gets to show its prompt.
const PROMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Time `kiln login` gets to exit after the token is typed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Time a followed deploy gets to show its spinner, and then to finish.
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(90);

/// Collects a child's output from a reader thread.
struct Output {
    chunks: mpsc::Receiver<Vec<u8>>,
    text: String,
}

impl Output {
    fn start(mut reader: impl Read + Send + 'static) -> Self {
        let (sender, chunks) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buffer = [0_u8; 4096];
            while let Ok(read) = reader.read(&mut buffer) {
                if read == 0 || sender.send(buffer[..read].to_vec()).is_err() {
                    return;
                }
            }
        });
        Self {
            chunks,
            text: String::new(),
        }
    }

    /// Reads until the output contains `needle`, within `timeout`.
    fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.text.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.text.push_str(&String::from_utf8_lossy(&chunk)),
                Err(_) => panic!(
                    "no {needle:?} within {timeout:?}; output so far: {:?}",
                    self.text
                ),
            }
        }
    }

    /// Drains what has arrived so far.
    fn drain(&mut self) {
        while let Ok(chunk) = self.chunks.try_recv() {
            self.text.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

/// Returns the terminal (stdin) of the `kiln` process that `script(1)` with pid `script`
/// started, once that process exists.
fn kiln_terminal(script: u32) -> Option<std::path::PathBuf> {
    let parent_of = |pid: u32| -> Option<(String, u32)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let comm = stat[open + 1..close].to_owned();
        let ppid = stat[close + 1..].split_whitespace().nth(1)?.parse().ok()?;
        Some((comm, ppid))
    };
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Some((comm, mut ancestor)) = parent_of(pid) else {
            continue;
        };
        if comm != "kiln" {
            continue;
        }
        // `script` runs the command through a shell, which may or may not exec it.
        for _ in 0..3 {
            if ancestor == script {
                return std::fs::read_link(format!("/proc/{pid}/fd/0")).ok();
            }
            ancestor = parent_of(ancestor).map_or(0, |(_, ppid)| ppid);
        }
    }
    None
}

/// Waits until the terminal of the `kiln` started by `script` has echo off, within `timeout`.
fn wait_echo_off(script: u32, timeout: Duration) {
    use nix::sys::termios::{LocalFlags, tcgetattr};

    let deadline = Instant::now() + timeout;
    loop {
        let echo_off = kiln_terminal(script)
            .and_then(|path| std::fs::File::open(path).ok())
            .and_then(|terminal| tcgetattr(&terminal).ok())
            .is_some_and(|termios| !termios.local_flags.contains(LocalFlags::ECHO));
        if echo_off {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the terminal of kiln still echoes after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `child` to exit within `timeout`, collecting its output meanwhile.
fn wait_exit(
    child: &mut std::process::Child,
    output: &mut Output,
    timeout: Duration,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "kiln did not exit within {timeout:?}: {:?}",
            output.text
        );
        output.drain();
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn login_prompts_on_terminal() {
    let control = Control::start();
    let kiln = Kiln::new();
    let mut child = kiln
        .terminal_command(&["login", "--api-url", &control.url])
        .spawn()
        .expect("run script(1); install util-linux's bsdutils");
    let mut stdin = child.stdin.take().unwrap();
    let mut output = Output::start(child.stdout.take().unwrap());

    // Type only after the prompt turned echo off, as a person would: the prompt is printed
    // just before echo goes off.
    output.wait_for("API token: ", PROMPT_TIMEOUT);
    wait_echo_off(child.id(), PROMPT_TIMEOUT);
    stdin
        .write_all(format!("{}\r", control.org_token).as_bytes())
        .unwrap();
    stdin.flush().unwrap();

    let status = wait_exit(&mut child, &mut output, EXIT_TIMEOUT);
    drop(stdin);
    output.drain();

    assert!(status.success(), "{status:?}: {:?}", output.text);
    assert!(
        !output.text.contains(&control.org_token),
        "the token was echoed: {:?}",
        output.text
    );
    let config = kiln.config_file();
    let saved = std::fs::read_to_string(&config).unwrap();
    assert!(saved.contains(&control.org_token), "{saved}");
    let mode = std::fs::metadata(&config).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
}

#[test]
fn deploy_spinner_on_terminal() {
    let control = Control::start();
    let registry = Registry::start();
    let _hosts = start_hosts(&control, &["h1"]);
    let repository = unique_repository("web");
    registry.push_image(&repository, "1.0", b"v1");
    let kiln = project(&control);
    let image = format!("{}/{repository}:1.0", registry.addr);

    let mut child = kiln
        .terminal_command(&["deploy", "--image", &image])
        .spawn()
        .expect("run script(1); install util-linux's bsdutils");
    let stdin = child.stdin.take().unwrap();
    let mut output = Output::start(child.stdout.take().unwrap());

    output.wait_for("Deploying v1: ", DEPLOY_TIMEOUT);
    let status = wait_exit(&mut child, &mut output, DEPLOY_TIMEOUT);
    drop(stdin);
    output.drain();
    assert!(status.success(), "{status:?}: {:?}", output.text);
    assert!(
        output.text.contains("Deployed web/prod v1"),
        "{:?}",
        output.text
    );

    // Without a terminal the same follow draws no spinner.
    let piped = kiln.run(&["deploy"]);
    piped.ok();
    assert!(!piped.stderr.contains("Deploying v2: "), "{}", piped.stderr);
}
