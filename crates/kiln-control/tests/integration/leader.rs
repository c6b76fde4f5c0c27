//! Two kiln-control processes on one database: exactly one leads, and the other takes over
//! with a higher fencing term when the leader stops.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness;

/// Longest time to wait for a process to start or for leadership to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Interval between health polls.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

struct Replica {
    child: Child,
    address: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_replica(database_url: &str, key_file: &std::path::Path) -> Replica {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-control"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            database_url,
            "--master-key-file",
        ])
        .arg(key_file)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let address = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Replica { child, address }
}

async fn health(replica: &Replica) -> Option<(bool, i64)> {
    let response = reqwest::get(format!("http://{}/healthz", replica.address))
        .await
        .ok()?;
    let body: serde_json::Value = response.json().await.ok()?;
    Some((body["leader"].as_bool()?, body["term"].as_i64()?))
}

#[tokio::test]
async fn exactly_one_replica_leads() {
    let server = harness::TestServer::start().await;
    let first = start_replica(&server.database.url, &server.key_file);
    let second = start_replica(&server.database.url, &server.key_file);

    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let (leader_index, term) = loop {
        let states = [health(&first).await, health(&second).await];
        let leaders: Vec<(usize, i64)> = states
            .iter()
            .enumerate()
            .filter_map(|(index, state)| {
                state
                    .filter(|(leader, _)| *leader)
                    .map(|(_, term)| (index, term))
            })
            .collect();
        assert!(leaders.len() <= 1, "two leaders at once: {states:?}");
        if let [only] = leaders[..] {
            break only;
        }
        assert!(
            Instant::now() < deadline,
            "no leader within {SETTLE_TIMEOUT:?}: {states:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    assert!(term >= 1);

    let mut replicas = [Some(first), Some(second)];
    drop(replicas[leader_index].take());
    let survivor = replicas[1 - leader_index].take().unwrap();

    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        if let Some((true, new_term)) = health(&survivor).await {
            assert!(
                new_term > term,
                "the new term {new_term} does not fence the old term {term}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the survivor did not take over within {SETTLE_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[tokio::test]
async fn stale_term_is_fenced() {
    let (store, _db) = harness::store().await;
    sqlx::query("INSERT INTO leader_terms (name, term) VALUES ('control', 5)")
        .execute(store.pool())
        .await
        .unwrap();

    let mut tx = store.begin().await.unwrap();
    let stale = kiln_control::leader::check_fence(&mut tx, 4).await;
    assert!(
        matches!(
            stale,
            Err(kiln_control::leader::FenceError::Stale {
                held: 4,
                current: 5
            })
        ),
        "{stale:?}"
    );
    drop(tx);

    let mut tx = store.begin().await.unwrap();
    kiln_control::leader::check_fence(&mut tx, 5).await.unwrap();
}

#[tokio::test]
async fn piped_stderr_has_no_ansi() {
    let server = harness::TestServer::start().await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-control"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &server.database.url,
            "--master-key-file",
        ])
        .arg(&server.key_file)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert!(line.starts_with("listening on "), "{line:?}");

    // The "listening" log line is written to stderr before the stdout line was printed.
    child.kill().unwrap();
    child.wait().unwrap();
    let mut logs = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut logs).unwrap();
    assert!(logs.contains("listening"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "{logs:?}");
}
