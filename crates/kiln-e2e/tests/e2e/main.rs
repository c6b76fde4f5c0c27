//! Kiln's main job end to end, on the real binaries: `kiln deploy` of the example app
//! (examples/hello-tls) from a real registry, a microVM per instance (QEMU; TCG where the host
//! has no usable KVM), and real TLS requests through kiln-ingress with the environment's
//! hostname as SNI.
//!
//! Each test starts its own dev stack (`scripts/dev up`) in a network namespace of its own.
//! Run as root, after building the binaries:
//!
//! ```text
//! cargo build -p kiln-cli -p kiln-control -p kiln-agent -p kiln-ingress
//! cargo test -p kiln-e2e
//! ```

mod stack;
mod wait;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use serde_json::Value;

use crate::stack::{Answer, Stack};

/// Time for the ingress to route a deployed environment: it learns routes by long-polling,
/// so the first answer may lag the end of the deploy.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for a scaled-up instance to boot, become healthy and receive traffic.
const SCALE_TIMEOUT: Duration = Duration::from_secs(600);
/// Time for the agent to stop the microVMs of a destroyed environment and remove their TAP
/// devices, rules and disks.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(120);

/// A secret value that must never show up anywhere but inside the staging instance.
const SECRET_VALUE: &str = "postgres://e2e:0c4f1d-not-for-prod@db/hello";

#[test]
fn deploy_update_rollback_scale() {
    let stack = Stack::start("main");
    stack.create_env("staging");
    let v1_image = stack.push_image("v1");
    let v2_image = stack.push_image("v2");

    // v1: the first deploy, answered through the ingress.
    stack.deploy("staging", Some(&v1_image));
    let hostname = stack.hostname("staging");
    let first = wait_for_release(&stack, &hostname, 1);
    assert_eq!(first.field("app"), "hello", "answer: {}", first.body);
    assert_eq!(first.field("env"), "staging", "answer: {}", first.body);

    // v2 while a client loops requests: a rolling deploy drops none of them.
    let stop = AtomicBool::new(false);
    let counts = thread::scope(|scope| {
        let client = scope.spawn(|| loop_requests(&stack, &hostname, &stop));
        // Stops the client even when the deploy panics, so the scope can join it.
        let _stop_client = StopOnDrop(&stop);
        stack.deploy("staging", Some(&v2_image));
        wait_for_release(&stack, &hostname, 2);
        stop.store(true, Ordering::Relaxed);
        client.join().expect("the client thread panicked")
    });
    assert!(counts.succeeded > 0, "the client got no answer at all");
    assert_eq!(
        counts.failed,
        0,
        "{} of {} requests failed during the deploy of v2; first failure: {}",
        counts.failed,
        counts.failed + counts.succeeded,
        counts.first_failure
    );
    assert!(
        counts.releases.contains("v1") || counts.releases.contains("1"),
        "the client never saw v1 during the deploy: {:?}",
        counts.releases
    );

    // Rollback to v1: the environment runs v1's image again, and answers from the release
    // the rollback made current.
    stack.kiln_with(
        &["rollback", "1", "--env", "staging"],
        None,
        stack::DEPLOY_TIMEOUT,
    );
    let rolled_back = current_release(&stack, "staging");
    let v1_digest = v1_image.rsplit_once('@').map(|(_, digest)| digest);
    assert_eq!(
        rolled_back["image"]["digest"].as_str(),
        v1_digest,
        "rollback to v1 did not use v1's image: {rolled_back}"
    );
    let version = rolled_back["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("release without a version: {rolled_back}"));
    wait_for_release(&stack, &hostname, version);

    // Scale to 2: both instances answer through the ingress.
    stack.kiln(&["scale", "web=2", "--env", "staging"]);
    let running: BTreeSet<String> =
        wait::until("two instances in kiln status", SCALE_TIMEOUT, || {
            let ids: BTreeSet<String> = stack
                .instances("staging")
                .iter()
                .filter(|instance| instance["state"] == "healthy" || instance["state"] == "running")
                .filter_map(|instance| instance["id"].as_str().map(str::to_owned))
                .collect();
            if ids.len() == 2 {
                Ok(ids)
            } else {
                Err(format!("instances up: {ids:?}"))
            }
        });
    let mut answered = BTreeSet::new();
    wait::until("both instances to answer", SCALE_TIMEOUT, || {
        if let Ok(answer) = stack.request(&hostname) {
            answered.insert(answer.field("instance").to_owned());
        }
        if running.is_subset(&answered) {
            Ok(())
        } else {
            Err(format!("answered: {answered:?}, running: {running:?}"))
        }
    });
}

#[test]
fn secret_reaches_only_its_env() {
    let stack = Stack::start("secret");
    stack.create_env("staging");
    stack.create_env("prod");
    let image = stack.push_image("v1");
    stack.deploy("staging", Some(&image));
    stack.deploy("prod", Some(&image));
    let staging = stack.hostname("staging");
    let prod = stack.hostname("prod");
    assert_ne!(staging, prod, "two environments share a hostname");

    let before = wait_for_release(&stack, &staging, 1);
    assert!(before.secrets().is_empty(), "answer: {}", before.body);

    // The value goes through stdin, as a script would pass it.
    stack.kiln_with(
        &["secrets", "set", "DATABASE_URL", "--env", "staging"],
        Some(SECRET_VALUE.as_bytes()),
        Duration::from_secs(60),
    );

    // Setting a secret changes no running instance: release v1 still reports none.
    let unchanged = stack.request(&staging).expect("staging answers");
    assert_eq!(unchanged.field("instance"), before.field("instance"));
    assert!(unchanged.secrets().is_empty(), "answer: {}", unchanged.body);

    // The next release of staging has it.
    stack.deploy("staging", None);
    let after = wait_for_release(&stack, &staging, 2);
    assert_eq!(after.secrets(), ["DATABASE_URL"], "answer: {}", after.body);
    assert!(
        !after.body.contains(SECRET_VALUE),
        "the app printed the value"
    );

    // Another environment never gets it, not even in its next release.
    stack.deploy("prod", None);
    let other = wait_for_release(&stack, &prod, 2);
    assert!(
        other.secrets().is_empty(),
        "prod got a secret: {}",
        other.body
    );

    // The value appears in no listing, event or log.
    let listing = stack.kiln(&["secrets", "list", "--env", "staging", "--json"]);
    assert!(listing.contains("DATABASE_URL"), "listing: {listing}");
    assert!(
        !listing.contains(SECRET_VALUE),
        "secrets list shows the value"
    );
    let events = stack.kiln(&["events", "--json"]);
    assert!(!events.contains(SECRET_VALUE), "an event holds the value");
    let logs = stack.kiln(&["logs", "--env", "staging", "--json"]);
    assert!(!logs.contains(SECRET_VALUE), "a log line holds the value");
    for log in [
        "control/control.log",
        "agent/agent.log",
        "ingress/ingress.log",
    ] {
        let text = std::fs::read_to_string(stack.dev_dir().join(log)).unwrap_or_default();
        assert!(!text.contains(SECRET_VALUE), "{log} holds the value");
    }
}

#[test]
fn destroy_leaves_nothing() {
    let stack = Stack::start("destroy");
    stack.create_env("staging");
    let image = stack.push_image("v1");
    stack.deploy("staging", Some(&image));
    let hostname = stack.hostname("staging");
    wait_for_release(&stack, &hostname, 1);

    let instances: Vec<String> = stack
        .instances("staging")
        .iter()
        .filter_map(|instance| instance["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(instances.len(), 1, "instances: {instances:?}");
    assert_eq!(
        stack.vm_pids().len(),
        1,
        "one microVM runs before the destroy"
    );
    assert_eq!(
        stack.tap_devices().len(),
        1,
        "one TAP device exists before the destroy"
    );

    stack.kiln(&["envs", "destroy", "staging", "--yes"]);

    wait::until("the microVM to exit", TEARDOWN_TIMEOUT, || {
        let pids = stack.vm_pids();
        if pids.is_empty() {
            Ok(())
        } else {
            Err(format!("VMM pids: {pids:?}"))
        }
    });
    wait::until("the TAP device to go", TEARDOWN_TIMEOUT, || {
        let taps = stack.tap_devices();
        if taps.is_empty() {
            Ok(())
        } else {
            Err(format!("TAP devices: {taps:?}"))
        }
    });
    wait::until("the nftables rules to go", TEARDOWN_TIMEOUT, || {
        let ruleset = stack.nft_ruleset();
        if ruleset.contains("table inet kiln") || ruleset.contains("table arp kiln") {
            Err(ruleset)
        } else {
            Ok(())
        }
    });
    for instance in &instances {
        // The agent names instance directories and disks by instance id; the TAP device by
        // the id's last 12 hex digits.
        let uuid = instance.rsplit('_').next().unwrap_or(instance);
        wait::until(
            "the instance's disk and state to go",
            TEARDOWN_TIMEOUT,
            || {
                let left = stack.agent_paths_containing(uuid);
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(format!("left: {left:?}"))
                }
            },
        );
    }
    assert!(
        stack.request(&hostname).is_err(),
        "the destroyed environment still answers"
    );
}

/// Waits until the environment answers through the ingress from release `version`.
fn wait_for_release(stack: &Stack, hostname: &str, version: u64) -> Answer {
    wait::until(
        &format!("release v{version} to answer for {hostname}"),
        ROUTE_TIMEOUT,
        || match stack.request(hostname) {
            Ok(answer) if release_is(&answer, version) => Ok(answer),
            Ok(answer) => Err(format!("answer from another release:\n{}", answer.body)),
            Err(error) => Err(error),
        },
    )
}

/// Whether the answer's `release` field names version `version` ("v2" or "2").
fn release_is(answer: &Answer, version: u64) -> bool {
    let release = answer.field("release");
    release == format!("v{version}") || release == version.to_string()
}

/// The current release of `env` as `kiln status --json` shows it.
fn current_release(stack: &Stack, env: &str) -> Value {
    stack.kiln_json(&["status", "--env", env])["release"].clone()
}

/// What a looping client saw.
struct Counts {
    succeeded: u64,
    failed: u64,
    first_failure: String,
    releases: BTreeSet<String>,
}

/// Sends requests through the ingress one after another until `stop` is set.
fn loop_requests(stack: &Stack, hostname: &str, stop: &AtomicBool) -> Counts {
    let mut counts = Counts {
        succeeded: 0,
        failed: 0,
        first_failure: String::new(),
        releases: BTreeSet::new(),
    };
    while !stop.load(Ordering::Relaxed) {
        match stack.request(hostname) {
            Ok(answer) => {
                counts.succeeded += 1;
                counts.releases.insert(answer.field("release").to_owned());
            }
            Err(error) => {
                if counts.failed == 0 {
                    counts.first_failure = error;
                }
                counts.failed += 1;
            }
        }
    }
    counts
}

/// Sets the flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A manifest for the busybox image whose release command runs `script` with `/bin/sh -c`.
fn release_command_manifest(script: &str) -> String {
    format!(
        r#"app = "hello"

[processes.web]
command = ["/bin/busybox", "httpd", "-f", "-p", "[::]:8443", "-h", "/www"]
count = 1
vcpus = 1
memory = 128

[services.https]
process = "web"
port = 8443
protocol = "tls"

[services.https.health]
type = "tcp"
interval = "1s"
timeout = "1s"
grace_period = "60s"

[release_command]
command = ["/bin/sh", "-c", "{script}"]
timeout = "5m"
memory = 128
"#
    )
}

#[test]
fn release_command_gates_deploy() {
    let stack = Stack::start("relcmd");
    stack.create_env("staging");
    let image = stack.push_busybox_image("v1");

    // v1: the command writes a marker, prints it and exits 0; the deploy goes on.
    stack.write_manifest(&release_command_manifest(
        "echo release-marker-$KILN_RELEASE > /tmp/marker && cat /tmp/marker",
    ));
    let events = stack.kiln_with(
        &["deploy", "--env", "staging", "--image", &image, "--json"],
        None,
        stack::DEPLOY_TIMEOUT,
    );
    let step = events
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|event| {
            event["type"] == "DeployStepCompleted"
                && event["data"]["step"] == "completed:release-command"
        })
        .unwrap_or_else(|| panic!("no completed release command step in:\n{events}"));
    let output: Vec<&str> = step["data"]["output"]
        .as_array()
        .map(|lines| lines.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(output, ["release-marker-v1"], "step: {step}");
    let web: Vec<Value> = wait::until("the v1 web instance to be healthy", SCALE_TIMEOUT, || {
        let instances = stack.instances("staging");
        let healthy: Vec<Value> = instances
            .iter()
            .filter(|instance| instance["state"] == "healthy")
            .cloned()
            .collect();
        if healthy.len() == 1 && instances.len() == 1 {
            Ok(healthy)
        } else {
            Err(format!("instances: {instances:?}"))
        }
    });
    assert_eq!(web[0]["process"], "web", "instance: {}", web[0]);

    // v2: the command fails with exit code 3; `kiln deploy` fails, naming the release command
    // and showing its output, and the v1 instance keeps running.
    stack.write_manifest(&release_command_manifest(
        "echo checking the schema; echo schema v7 is missing >&2; exit 3",
    ));
    let failed = stack.kiln_output(
        &["deploy", "--env", "staging", "--image", &image],
        None,
        stack::DEPLOY_TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(
        failed.status.code(),
        Some(6),
        "kiln deploy did not exit with the deploy-failed code:\n{stderr}"
    );
    assert!(stderr.contains("release command"), "stderr:\n{stderr}");
    assert!(stderr.contains("exited with code 3"), "stderr:\n{stderr}");
    assert!(stderr.contains("schema v7 is missing"), "stderr:\n{stderr}");

    let current = current_release(&stack, "staging");
    assert_eq!(current["version"], 1, "current release: {current}");
    // The failed command's instance is removed soon after the deploy ends; the web instance
    // is never touched.
    wait::until("only the v1 web instance", TEARDOWN_TIMEOUT, || {
        let instances = stack.instances("staging");
        let ids: Vec<&Value> = instances.iter().map(|instance| &instance["id"]).collect();
        let web_running = instances
            .iter()
            .any(|instance| instance["id"] == web[0]["id"] && instance["state"] == "healthy");
        if ids == [&web[0]["id"]] && web_running {
            Ok(())
        } else {
            Err(format!("instances: {instances:?}"))
        }
    });

    // Both one-off microVMs are gone, with their TAP devices: only the web instance's remain.
    wait::until(
        "the release commands' microVMs to go",
        TEARDOWN_TIMEOUT,
        || {
            let pids = stack.vm_pids();
            let taps = stack.tap_devices();
            if pids.len() == 1 && taps.len() == 1 {
                Ok(())
            } else {
                Err(format!("VMM pids: {pids:?}, TAP devices: {taps:?}"))
            }
        },
    );
}
