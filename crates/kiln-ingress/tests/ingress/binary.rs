//! Tests of the `kiln-ingress` binary: flags, SIGHUP reload and SIGTERM drain.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use crate::support::*;

const BINARY: &str = env!("CARGO_BIN_EXE_kiln-ingress");

/// A running `kiln-ingress run` process, killed on drop.
struct Process {
    child: Child,
    listen: SocketAddr,
    log: mpsc::Receiver<String>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    fn start(routes: &std::path::Path) -> Self {
        let mut child = Command::new(BINARY)
            .args(["run", "--listen", "127.0.0.1:0", "--routes"])
            .arg(routes)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (sender, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        let mut process = Self {
            child,
            listen: "0.0.0.0:0".parse().unwrap(),
            log,
        };
        let line = process.wait_for_log("listening");
        let addr = line.rsplit("listen=").next().unwrap().trim();
        process.listen = addr.parse().unwrap();
        process
    }

    fn wait_for_log(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("timed out after {WAIT:?} waiting for log line {needle:?}"),
            }
        }
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) with a child's pid and a valid signal number has no memory effects.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }
}

fn write_routes(path: &std::path::Path, hostname: &str, backend: SocketAddr) {
    let text = format!("[[routes]]\nhostname = \"{hostname}\"\nbackends = [\"{backend}\"]\n");
    std::fs::write(path, text).unwrap();
}

#[tokio::test]
async fn binary_reloads_routes_on_sighup() {
    let tls = TestTls::new();
    let blue = Backend::start(&tls, "blue", "127.0.0.1:0", false).await;
    let green = Backend::start(&tls, "green", "[::1]:0", false).await;
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    write_routes(&routes, "app.example.test", blue.addr);
    let process = Process::start(&routes);

    let mut open = Client::connect(&tls, process.listen, "app.example.test")
        .await
        .unwrap();
    assert_eq!(open.ask().await.unwrap(), "blue");

    write_routes(&routes, "app.example.test", green.addr);
    process.signal(libc::SIGHUP);
    process.wait_for_log("route table applied");
    assert_eq!(
        ask_once(&tls, process.listen, "app.example.test")
            .await
            .unwrap(),
        "green"
    );
    assert_eq!(
        open.ask().await.unwrap(),
        "blue",
        "open connection keeps its backend"
    );

    // A broken file keeps the previous routes.
    std::fs::write(
        &routes,
        "[[routes]]\nhostname = \"app.example.test\"\nbackend = []\n",
    )
    .unwrap();
    process.signal(libc::SIGHUP);
    let line = process.wait_for_log("route reload failed");
    assert!(line.contains("unknown field `backend`"), "{line}");
    assert_eq!(
        ask_once(&tls, process.listen, "app.example.test")
            .await
            .unwrap(),
        "green"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_drains_on_sigterm() {
    let tls = TestTls::new();
    let backend = Backend::start(&tls, "app", "127.0.0.1:0", false).await;
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    write_routes(&routes, "app.example.test", backend.addr);
    let mut process = Process::start(&routes);

    let mut open = Client::connect(&tls, process.listen, "app.example.test")
        .await
        .unwrap();
    process.signal(libc::SIGTERM);
    process.wait_for_log("draining connections");
    assert_eq!(
        open.ask().await.unwrap(),
        "app",
        "open connection served while draining"
    );
    assert!(
        std::net::TcpStream::connect(process.listen).is_err(),
        "no new connections"
    );
    drop(open);

    let status = tokio::task::block_in_place(|| process.child.wait()).unwrap();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn binary_rejects_bad_route_file() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[[routes]]\nhostname = \"app.example.test\"\nbackends = [\"::1:443\"]\n",
    )
    .unwrap();
    let output = Command::new(BINARY)
        .args(["run", "--listen", "127.0.0.1:0", "--routes"])
        .arg(&routes)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("invalid route file"), "{stderr}");
    assert!(stderr.contains("invalid socket address"), "{stderr}");
}
