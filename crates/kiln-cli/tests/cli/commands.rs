//! Every command against a real kiln-control: human and `--json` output, errors and exit
//! codes.

use std::os::unix::fs::PermissionsExt;

use insta::assert_snapshot;

use crate::harness::{Kiln, redact};
use crate::server::{Control, ORG};

#[test]
fn login_saves_context_private() {
    let control = Control::start();
    let kiln = Kiln::new();

    let run = kiln.run_with_stdin(
        &["login", "--api-url", &control.url, "--token-stdin"],
        Some(&format!("{}\n", control.org_token)),
    );

    run.ok();
    assert_snapshot!("login_stdout", redact(&run.stdout));
    let mode = std::fs::metadata(kiln.config_file())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let file = std::fs::read_to_string(kiln.config_file()).unwrap();
    assert!(file.contains("current_context = \"default\""), "{file}");
    assert!(file.contains("org = \"acme\""), "{file}");

    let whoami = kiln.run(&["whoami"]);
    whoami.ok();
    assert_snapshot!("whoami_stdout", redact(&whoami.stdout));
    let json = kiln.run(&["whoami", "--json"]);
    json.ok();
    assert_eq!(json.json()["org_name"], ORG);
    assert_eq!(json.json()["token"]["kind"], "org");

    kiln.run(&["logout"]).ok();
    let after = kiln.run(&["whoami"]);
    after.expect_code(5);
    assert!(after.stderr.contains("not logged in"), "{}", after.stderr);
}

#[test]
fn login_named_context() {
    let control = Control::start();
    let kiln = Kiln::new();

    kiln.run(&[
        "login",
        "--api-url",
        &control.url,
        "--token",
        &control.org_token,
        "--context",
        "dev",
    ])
    .ok();

    let run = kiln.run(&["whoami", "--context", "dev", "--json"]);
    run.ok();
    assert_eq!(run.json()["org_name"], ORG);
    let missing = kiln.run(&["whoami", "--context", "prod"]);
    missing.expect_code(3);
    assert!(
        missing.stderr.contains("known contexts: dev"),
        "{}",
        missing.stderr
    );
}

#[test]
fn login_rejects_bad_token() {
    let control = Control::start();
    let kiln = Kiln::new();

    let run = kiln.run(&["login", "--api-url", &control.url, "--token", "kiln_bogus"]);

    run.expect_code(5);
    assert!(
        run.stderr.contains("GET /v1/whoami failed"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("hint: the token was rejected"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("kiln-control bootstrap"),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("kiln tokens create"),
        "creating a token needs a working login:\n{}",
        run.stderr
    );
    assert!(
        !kiln.config_file().exists(),
        "a rejected token must not be saved"
    );
}

#[test]
fn apps_lifecycle() {
    let control = Control::start();
    let kiln = control.kiln();

    let created = kiln.run(&["apps", "create", "web"]);
    created.ok();
    assert_snapshot!("apps_create_stdout", redact(&created.stdout));

    let again = kiln.run(&["apps", "create", "web"]);
    again.expect_code(4);
    assert!(
        again.stderr.contains("POST /v1/orgs/acme/apps failed"),
        "{}",
        again.stderr
    );

    kiln.run(&["apps", "create", "api", "--json"]).ok();
    let list = kiln.run(&["apps", "list"]);
    list.ok();
    assert_snapshot!("apps_list_stdout", redact(&list.stdout));
    let json = kiln.run(&["apps", "list", "--json"]);
    json.ok();
    let items = json.json()["items"].clone();
    let names: Vec<&str> = items
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2);
    assert!(
        names.contains(&"web") && names.contains(&"api"),
        "{names:?}"
    );
    insta::assert_snapshot!("apps_list_json", redact(&json.stdout));

    let show = kiln.run(&["apps", "show", "web"]);
    show.ok();
    assert_snapshot!("apps_show_stdout", redact(&show.stdout));

    kiln.run(&["apps", "destroy", "api"]).expect_code(2);
    kiln.run(&["apps", "destroy", "api", "--yes"]).ok();
    let gone = kiln.run(&["apps", "show", "api"]);
    gone.expect_code(3);
    assert!(
        gone.stderr.contains("hint: check the names"),
        "{}",
        gone.stderr
    );
}

#[test]
fn envs_and_config() {
    let control = Control::start();
    let mut kiln = control.kiln();
    kiln.run(&["apps", "create", "web"]).ok();
    kiln.set_env("KILN_APP", "web");

    let created = kiln.run(&["envs", "create", "prod"]);
    created.ok();
    assert_snapshot!("envs_create_stdout", redact(&created.stdout));
    let list = kiln.run(&["envs", "list", "--json"]);
    list.ok();
    assert_eq!(list.json()["items"][0]["name"], "prod");
    kiln.set_env("KILN_ENV", "prod");

    let set = kiln.run(&["config", "set", "LOG_LEVEL=debug", "PORT=8080"]);
    set.ok();
    assert_snapshot!("config_set_stdout", redact(&set.stdout));
    kiln.run(&["config", "unset", "PORT"]).ok();
    let missing = kiln.run(&["config", "unset", "NOPE"]);
    missing.expect_code(3);
    assert!(
        missing.stderr.contains("config variable NOPE not found"),
        "{}",
        missing.stderr
    );
    let listed = kiln.run(&["config", "list"]);
    listed.ok();
    assert_snapshot!("config_list_stdout", listed.stdout);
    let json = kiln.run(&["config", "list", "--json"]);
    json.ok();
    assert_eq!(json.json()["version"], 2);
    assert_eq!(json.json()["vars"]["LOG_LEVEL"], "debug");

    let bad = kiln.run(&["config", "set", "LOG-LEVEL=x"]);
    bad.expect_code(2);
    assert!(
        bad.stderr.contains("invalid variable name \"LOG-LEVEL\""),
        "{}",
        bad.stderr
    );

    let status = kiln.run(&["status"]);
    status.ok();
    assert_snapshot!("status_new_env", redact(&status.stdout));
    let releases = kiln.run(&["releases", "--json"]);
    releases.ok();
    assert_eq!(releases.json()["items"], serde_json::json!([]));

    let missing = kiln.run(&["status", "--env", "staging"]);
    missing.expect_code(3);

    kiln.run(&["envs", "destroy", "prod", "--yes"]).ok();
    kiln.run(&["status"]).expect_code(3);
}

#[test]
fn tokens_create_list_revoke() {
    let control = Control::start();
    let kiln = control.kiln();

    let created = kiln.run(&["tokens", "create", "--name", "ci", "--expires-in", "1d"]);
    created.ok();
    let secret = created.stdout.trim().to_owned();
    assert!(
        secret.starts_with("kiln_"),
        "stdout must be the secret alone: {:?}",
        created.stdout
    );
    assert_eq!(created.stdout.lines().count(), 1);
    assert!(created.stderr.contains("shown once"), "{}", created.stderr);

    let list = kiln.run(&["tokens", "list", "--json"]);
    list.ok();
    assert!(!list.stdout.contains(&secret), "token list shows a secret");
    let ci = list.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ci")
        .cloned()
        .unwrap();
    assert!(ci["expires_at"].is_string());

    let mut with_new = Kiln::new();
    with_new.set_env("KILN_API_URL", &control.url);
    with_new.set_env("KILN_TOKEN", &secret);
    with_new.set_env("KILN_ORG", ORG);
    with_new.run(&["apps", "list"]).ok();

    let id = ci["id"].as_str().unwrap();
    let revoked = kiln.run(&["tokens", "revoke", id]);
    revoked.ok();
    assert_snapshot!("tokens_revoke_stdout", redact(&revoked.stdout));
    let denied = with_new.run(&["apps", "list"]);
    denied.expect_code(5);
    assert!(denied.stderr.contains("hint:"), "{}", denied.stderr);
    assert!(!denied.all_output().contains(&secret));

    kiln.run(&["tokens", "revoke", "not-an-id"]).expect_code(2);
}

#[test]
fn hosts_need_operator() {
    let control = Control::start();
    let kiln = control.kiln();

    let denied = kiln.run(&["hosts", "list"]);
    denied.expect_code(5);

    let mut operator = Kiln::new();
    operator.set_env("KILN_API_URL", &control.url);
    operator.set_env("KILN_TOKEN", &control.operator_token);
    let list = operator.run(&["hosts", "list"]);
    list.ok();
    assert_snapshot!("hosts_list_empty", list.stdout);
    let json = operator.run(&["hosts", "list", "--json"]);
    json.ok();
    assert_eq!(json.json()["items"], serde_json::json!([]));
    let missing = operator.run(&["hosts", "cordon", "nowhere"]);
    missing.expect_code(3);
}

#[test]
fn events_show_audit_trail() {
    let control = Control::start();
    let kiln = control.kiln();
    kiln.run(&["apps", "create", "web"]).ok();
    kiln.run(&["envs", "create", "prod", "--app", "web"]).ok();

    let all = kiln.run(&["events", "--json"]);
    all.ok();
    let types: Vec<String> = all.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert!(types.contains(&"AppCreated".to_owned()), "{types:?}");
    assert!(types.contains(&"EnvCreated".to_owned()), "{types:?}");

    let table = kiln.run(&["events", "--app", "web"]);
    table.ok();
    assert!(
        table.stdout.contains("AppCreated") || table.stdout.contains("EnvCreated"),
        "{}",
        table.stdout
    );

    kiln.run(&["events", "--env", "prod"]).expect_code(2);
}

#[test]
fn api_url_with_path_blamed() {
    let control = Control::start();
    let kiln = control.kiln();
    let url = format!("{}/kiln", control.url);

    let run = kiln.run(&["apps", "list", "--api-url", &url]);

    run.expect_code(3);
    assert!(run.stderr.contains("looks wrong"), "{}", run.stderr);
    assert!(!run.stderr.contains("kiln apps list"), "{}", run.stderr);
}

#[test]
fn events_env_uses_manifest_app() {
    let control = Control::start();
    let kiln = control.kiln();
    kiln.run(&["init", "--name", "web"]).ok();
    kiln.run(&["apps", "create", "web"]).ok();
    kiln.run(&["envs", "create", "prod"]).ok();

    let run = kiln.run(&["events", "--env", "prod", "--json"]);

    run.ok();
    let types: Vec<String> = run.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert!(types.contains(&"EnvCreated".to_owned()), "{types:?}");
}

#[test]
fn verbose_redacts_token() {
    let control = Control::start();
    let kiln = control.kiln();

    let run = kiln.run(&["apps", "list", "--verbose"]);

    run.ok();
    assert!(
        run.stderr.contains("> GET http://127.0.0.1:"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("authorization: Bearer [redacted]"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("< 200 OK"), "{}", run.stderr);
    assert!(!run.all_output().contains(&control.org_token));
}

#[test]
fn hosts_cordon_and_drain() {
    let control = Control::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = runtime.block_on(async {
        reqwest::Client::new()
            .post(format!("{}/v1/hosts", control.url))
            .bearer_auth(&control.operator_token)
            .header("idempotency-key", "hosts-cordon-test")
            .json(&serde_json::json!({ "name": "host-1" }))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status.as_u16(), 201, "create host");
    let mut operator = Kiln::new();
    operator.set_env("KILN_API_URL", &control.url);
    operator.set_env("KILN_TOKEN", &control.operator_token);

    let cordoned = operator.run(&["hosts", "cordon", "host-1"]);
    cordoned.ok();
    assert_snapshot!("hosts_cordon_stdout", cordoned.stdout);
    let json = operator.run(&["hosts", "uncordon", "host-1", "--json"]);
    json.ok();
    assert_eq!(json.json()["name"], "host-1");
    operator.run(&["hosts", "drain", "host-1"]).ok();
    let list = operator.run(&["hosts", "list", "--json"]);
    list.ok();
    assert_eq!(list.json()["items"][0]["name"], "host-1");

    let denied = control.kiln().run(&["hosts", "drain", "host-1"]);
    denied.expect_code(5);
}
