//! Plans, apply, restart and rollback against a real kiln-control whose hosts are simulated
//! agents (`kiln_testkit::simagent`), so deploys run to the end.

use insta::assert_snapshot;
use kiln_api::{Client, CreateHost};
use kiln_testkit::simagent::{SimAgent, SimAgentConfig};

use crate::harness::{Kiln, redact};
use crate::registry::{Registry, unique_repository};
use crate::server::Control;

/// A runtime that keeps simulated agents running, and the agents.
pub(crate) struct Hosts {
    _agents: Vec<SimAgent>,
    _runtime: tokio::runtime::Runtime,
}

/// Starts one simulated agent per name, registered with `control`.
pub(crate) fn start_hosts(control: &Control, names: &[&str]) -> Hosts {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let agents = runtime.block_on(async {
        let operator = Client::new(&control.url, &control.operator_token).unwrap();
        let mut agents = Vec::new();
        for name in names {
            let created = operator
                .create_host(&CreateHost {
                    name: (*name).to_owned(),
                })
                .await
                .unwrap();
            let agent = SimAgent::start(
                &control.url,
                &created.token.secret,
                SimAgentConfig::default(),
            )
            .await
            .unwrap();
            agents.push(agent);
        }
        agents
    });
    Hosts {
        _agents: agents,
        _runtime: runtime,
    }
}

pub(crate) fn project(control: &Control) -> Kiln {
    let mut kiln = control.kiln();
    kiln.run(&["init", "--name", "web"]).ok();
    kiln.run(&["apps", "create", "web"]).ok();
    kiln.run(&["envs", "create", "prod"]).ok();
    kiln.set_env("KILN_ENV", "prod");
    kiln
}

#[test]
fn plan_apply_and_conflict() {
    let control = Control::start();
    let registry = Registry::start();
    let _hosts = start_hosts(&control, &["h1"]);
    let repository = unique_repository("web");
    registry.push_image(&repository, "1.0", b"v1");
    let new_digest = registry.push_image(&repository, "2.0", b"v2");
    let kiln = project(&control);
    let old = format!("{}/{repository}:1.0", registry.addr);
    let new = format!("{}/{repository}:2.0", registry.addr);
    kiln.run(&["deploy", "--image", &old]).ok();

    let planned = kiln.run(&["plan", "--image", &new, "--json"]);
    planned.ok();
    let plan = planned.json();
    let plan_id = plan["id"].as_str().unwrap().to_owned();
    assert!(plan_id.starts_with("pln_"), "{plan_id}");
    assert_eq!(plan["release"]["to"]["version"], 2);
    assert_eq!(
        plan["release"]["to"]["image"]["digest"],
        new_digest.as_str()
    );
    assert_eq!(plan["release"]["image_changed"], true);

    // The same request against the same state is the same plan.
    let human = kiln.run(&["plan", "--image", &new]);
    human.ok();
    assert!(human.stdout.contains(&plan_id), "{}", human.stdout);
    assert!(
        human
            .stderr
            .contains(&format!("Apply it with: kiln apply {plan_id} --env prod")),
        "{}",
        human.stderr
    );
    assert_snapshot!("plan_stdout", redact(&human.stdout));

    let applied = kiln.run(&["apply", &plan_id]);
    applied.ok();
    let releases = kiln.run(&["releases", "--json"]);
    releases.ok();
    assert_eq!(releases.json()["items"][0]["version"], 2);

    let again = kiln.run(&["apply", &plan_id]);
    again.expect_code(4);
    assert!(again.stderr.contains("already applied"), "{}", again.stderr);

    // A config change between plan and apply is a conflict with its own exit code.
    let planned = kiln.run(&["plan", "--json"]);
    planned.ok();
    let stale = planned.json()["id"].as_str().unwrap().to_owned();
    kiln.run(&["config", "set", "GREETING=hi"]).ok();
    let conflict = kiln.run(&["apply", &stale, "--json"]);
    conflict.expect_code(4);
    assert!(conflict.stdout.is_empty(), "{}", conflict.stdout);
    assert!(
        conflict
            .stderr
            .contains("the environment changed since the plan was made"),
        "{}",
        conflict.stderr
    );
    assert!(
        conflict.stderr.contains("kiln plan --env prod"),
        "{}",
        conflict.stderr
    );

    kiln.run(&["apply", "not-a-plan"]).expect_code(2);
}

#[test]
fn restart_and_rollback() {
    let control = Control::start();
    let registry = Registry::start();
    let _hosts = start_hosts(&control, &["h1", "h2"]);
    let repository = unique_repository("web");
    let first_digest = registry.push_image(&repository, "1.0", b"v1");
    registry.push_image(&repository, "2.0", b"v2");
    let kiln = project(&control);
    kiln.run(&[
        "deploy",
        "--image",
        &format!("{}/{repository}:1.0", registry.addr),
    ])
    .ok();
    kiln.run(&[
        "deploy",
        "--image",
        &format!("{}/{repository}:2.0", registry.addr),
    ])
    .ok();

    let instances = |kiln: &Kiln| -> Vec<String> {
        let status = kiln.run(&["status", "--json"]);
        status.ok();
        let mut ids: Vec<String> = status.json()["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["desired"] == "running")
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    let before = instances(&kiln);
    assert_eq!(before.len(), 2, "{before:?}");

    let restarted = kiln.run(&["restart", "web"]);
    restarted.ok();
    let after = instances(&kiln);
    assert_eq!(after.len(), 2);
    assert!(after.iter().all(|id| !before.contains(id)), "{after:?}");
    kiln.run(&["restart", "cron"]).expect_code(2);

    let rollback = kiln.run(&["rollback", "1"]);
    rollback.ok();
    assert!(
        rollback.stderr.contains("back to v1 as the new release v3"),
        "{}",
        rollback.stderr
    );
    let releases = kiln.run(&["releases", "--json"]);
    releases.ok();
    let newest = releases.json()["items"][0].clone();
    assert_eq!(newest["version"], 3);
    assert_eq!(newest["image"]["digest"], first_digest.as_str());
    assert!(newest["rollback_of"].as_str().unwrap().starts_with("rel_"));
    let table = kiln.run(&["releases"]);
    table.ok();
    assert_snapshot!("releases_after_rollback_stdout", redact(&table.stdout));
}
