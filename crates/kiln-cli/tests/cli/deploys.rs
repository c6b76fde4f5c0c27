//! Deploys against a real kiln-control and a real registry: releases pinned by digest,
//! redeploys, rollbacks, and Ctrl-C while following.
//!
//! No scheduler or agent runs here, so a deploy stays pending: these tests check what the
//! CLI sends and how it follows, not a finished rollout.

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::Duration;

use insta::assert_snapshot;

use crate::harness::{Kiln, redact};
use crate::registry::{Registry, unique_repository};
use crate::server::Control;

/// How long `kiln deploy` may take to start following before the test gives up.
const FOLLOW_START_TIMEOUT: Duration = Duration::from_secs(30);

fn project(control: &Control) -> Kiln {
    let mut kiln = control.kiln();
    kiln.run(&["init", "--name", "web"]).ok();
    kiln.run(&["apps", "create", "web"]).ok();
    kiln.run(&["envs", "create", "prod"]).ok();
    kiln.set_env("KILN_ENV", "prod");
    kiln
}

#[test]
fn deploy_detach_creates_release() {
    let control = Control::start();
    let registry = Registry::start();
    let repository = unique_repository("web");
    let digest = registry.push_image(&repository, "1.0", b"v1");
    let kiln = project(&control);
    let image = format!("{}/{repository}:1.0", registry.addr);

    let run = kiln.run(&[
        "deploy", "--image", &image, "--detach", "--json", "-m", "first",
    ]);

    run.ok();
    let created = run.json();
    assert_eq!(created["release"]["version"], 1);
    assert_eq!(created["release"]["image"]["digest"], digest.as_str());
    assert_eq!(created["release"]["image"]["reference"], image.as_str());
    assert_eq!(created["release"]["spec"]["processes"]["web"]["count"], 2);
    assert_eq!(created["deploy"]["state"], "pending");

    let human = kiln.run(&["deploy", "--detach"]);
    human.ok();
    assert_snapshot!("deploy_detach_stdout", redact(&human.stdout));
    assert!(
        human
            .stderr
            .contains("Follow it with: kiln deploy --attach dep_"),
        "{}",
        human.stderr
    );

    let releases = kiln.run(&["releases", "--json"]);
    releases.ok();
    let items = releases.json()["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 2);
    for release in &items {
        assert_eq!(
            release["image"]["digest"],
            digest.as_str(),
            "a redeploy keeps the digest"
        );
    }
    let table = kiln.run(&["releases"]);
    table.ok();
    assert_snapshot!("releases_stdout", redact(&table.stdout));
}

#[test]
fn first_deploy_needs_image() {
    let control = Control::start();
    let kiln = project(&control);

    let run = kiln.run(&["deploy", "--detach"]);

    run.expect_code(2);
    assert!(
        run.stderr.contains("has no release to take the image from"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("pass --image REF"), "{}", run.stderr);
}

#[test]
fn rollback_requests_old_version() {
    let control = Control::start();
    let registry = Registry::start();
    let repository = unique_repository("web");
    registry.push_image(&repository, "1.0", b"v1");
    let kiln = project(&control);
    let image = format!("{}/{repository}:1.0", registry.addr);
    kiln.run(&["deploy", "--image", &image, "--detach"]).ok();

    let run = kiln.run(&["rollback", "1", "--detach", "--json", "--verbose"]);

    assert!(
        run.stderr.contains(r#""target":{"release_version":1}"#),
        "{}",
        run.stderr
    );
    run.ok();
    kiln.run(&["rollback", "v0"]).expect_code(2);
}

#[test]
fn interrupt_detaches_from_deploy() {
    let control = Control::start();
    let registry = Registry::start();
    let repository = unique_repository("web");
    registry.push_image(&repository, "1.0", b"v1");
    let kiln = project(&control);
    let image = format!("{}/{repository}:1.0", registry.addr);
    let mut child = kiln.spawn(&["deploy", "--image", &image]);
    let stderr = child.stderr.take().unwrap();
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let started = receiver
        .recv_timeout(FOLLOW_START_TIMEOUT)
        .expect("kiln deploy printed nothing");
    assert!(started.starts_with("Deploying web/prod v1"), "{started}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    // Read to the end of stderr: the reader thread may not have passed on the last lines yet.
    let rest: Vec<String> = receiver.iter().collect();
    let rest = rest.join("\n");

    assert_eq!(status.code(), Some(130), "{rest}");
    assert!(rest.contains("it continues on the server"), "{rest}");
    assert!(
        rest.contains("hint: follow it again with: kiln deploy --attach dep_"),
        "{rest}"
    );
    let deploys = kiln.run(&["releases", "--json"]);
    assert_eq!(
        deploys.json()["items"].as_array().unwrap().len(),
        1,
        "the deploy was not cancelled"
    );
}

#[test]
fn deploy_without_hosts_says_so() {
    let control = Control::start();
    let registry = Registry::start();
    let repository = unique_repository("web");
    registry.push_image(&repository, "1.0", b"v1");
    let kiln = project(&control);
    let image = format!("{}/{repository}:1.0", registry.addr);

    // The leader plans the deploy as soon as it is created and fails it with the scheduler's
    // explanation, so the deploy ends instead of waiting for a host.
    let run = kiln.run(&["deploy", "--image", &image]);

    run.expect_code(6);
    assert!(run.stderr.contains("no host is ready"), "{}", run.stderr);
    assert!(
        run.stderr.contains("uncordon a host or join a new one"),
        "{}",
        run.stderr
    );
}

#[test]
fn deploy_digest_skips_registry() {
    let control = Control::start();
    let kiln = project(&control);
    let digest = format!("sha256:{}", "ab".repeat(32));
    // Nothing listens on port 9, so any registry request would fail.
    let image = format!("127.0.0.1:9/web@{digest}");

    let run = kiln.run(&["deploy", "--image", &image, "--detach", "--json"]);

    run.ok();
    let created = run.json();
    assert_eq!(created["release"]["image"]["digest"], digest.as_str());
    assert_eq!(created["release"]["image"]["reference"], image.as_str());
}

#[test]
fn scale_logs_plan_after_deploy() {
    let control = Control::start();
    let registry = Registry::start();
    let repository = unique_repository("web");
    registry.push_image(&repository, "1.0", b"v1");
    let kiln = project(&control);
    let image = format!("{}/{repository}:1.0", registry.addr);
    kiln.run(&["deploy", "--image", &image, "--detach"]).ok();

    let scaled = kiln.run(&["scale", "web=3", "--json"]);
    scaled.ok();
    assert_eq!(scaled.json()["scale"]["web"], 3);

    let logs = kiln.run(&["logs"]);
    logs.ok();
    assert!(logs.stdout.is_empty(), "{}", logs.stdout);
    let logs_json = kiln.run(&["logs", "--json", "--since", "15m"]);
    logs_json.ok();
    assert_eq!(logs_json.json()["entries"], serde_json::json!([]));

    // No host runs here, so the plan cannot place anything. The control plane rejects it as a
    // state conflict, as it would while the first deploy was still unfinished.
    let plan = kiln.run(&["plan", "--image", &image, "--json"]);
    plan.expect_code(4);
    assert!(
        plan.stderr
            .contains("POST /v1/orgs/acme/apps/web/envs/prod/plans failed"),
        "{}",
        plan.stderr
    );
    assert!(plan.stdout.is_empty(), "{}", plan.stdout);

    let status = kiln.run(&["status", "--json"]);
    status.ok();
    assert_eq!(status.json()["release"]["version"], 1);
}
