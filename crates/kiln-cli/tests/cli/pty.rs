//! Paths that only run on a terminal, under a real pseudo-terminal: `script(1)` from
//! util-linux gives `kiln` a pty as stdin, stdout, stderr and controlling terminal, and the
//! test types into it.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::harness::Kiln;
use crate::server::Control;

/// Time `kiln login` gets to show its prompt.
const PROMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Time `kiln login` gets to exit after the token is typed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

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

    // Type only after the prompt turned echo off, as a person would.
    output.wait_for("API token: ", PROMPT_TIMEOUT);
    stdin
        .write_all(format!("{}\r", control.org_token).as_bytes())
        .unwrap();
    stdin.flush().unwrap();

    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "kiln login did not exit within {EXIT_TIMEOUT:?}: {:?}",
            output.text
        );
        output.drain();
        std::thread::sleep(Duration::from_millis(50));
    };
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
