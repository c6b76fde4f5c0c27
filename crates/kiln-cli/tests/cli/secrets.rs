//! A canary secret never shows up: not in any command's output, `--verbose` log, listing or
//! event.

use crate::harness::Kiln;
use crate::server::Control;

const CANARY: &str = "canary-7f3a9c1e-do-not-print";

fn env_ready(control: &Control) -> Kiln {
    let mut kiln = control.kiln();
    kiln.run(&["apps", "create", "web"]).ok();
    kiln.set_env("KILN_APP", "web");
    kiln.run(&["envs", "create", "prod"]).ok();
    kiln.set_env("KILN_ENV", "prod");
    kiln
}

#[test]
fn canary_never_printed() {
    let control = Control::start();
    let kiln = env_ready(&control);
    let file = kiln.workdir().join("canary.txt");
    std::fs::write(&file, CANARY).unwrap();
    let mut outputs = Vec::new();

    let pair = format!("DB_PASSWORD={CANARY}");
    outputs.push(kiln.run(&["secrets", "set", &pair, "--verbose"]));
    outputs.push(kiln.run(&["secrets", "set", &pair, "--json", "--verbose"]));
    outputs.push(kiln.run_with_stdin(
        &["secrets", "set", "API_KEY", "--verbose"],
        Some(&format!("{CANARY}\n")),
    ));
    outputs.push(kiln.run(&[
        "secrets",
        "set",
        "TLS_KEY",
        "--from-file",
        file.to_str().unwrap(),
        "--verbose",
    ]));
    for run in &outputs {
        run.ok();
    }
    outputs.push(kiln.run(&["secrets", "list", "--verbose"]));
    outputs.push(kiln.run(&["secrets", "list", "--json", "--verbose"]));
    outputs.push(kiln.run(&["events", "--json", "--verbose"]));
    outputs.push(kiln.run(&["events", "--verbose"]));
    outputs.push(kiln.run(&["config", "list", "--json", "--verbose"]));
    outputs.push(kiln.run(&["status", "--json", "--verbose"]));

    for run in &outputs {
        run.ok();
        assert!(
            !run.all_output().contains(CANARY),
            "canary printed:\n{}",
            run.all_output()
        );
        assert!(
            !run.all_output().contains("canary-7f3a"),
            "part of the canary printed"
        );
    }
    let set = &outputs[0];
    assert!(
        set.stderr.contains("\"value\":\"[redacted]\""),
        "{}",
        set.stderr
    );
    assert!(
        set.stdout
            .starts_with("Set secret DB_PASSWORD on web/prod (version 1"),
        "{}",
        set.stdout
    );

    let list = kiln.run(&["secrets", "list", "--json"]);
    let items = list.json()["items"].clone();
    let names: Vec<&str> = items
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["API_KEY", "DB_PASSWORD", "TLS_KEY"]);
    assert_eq!(list.json()["items"][1]["version"], 2);
}

#[test]
fn secret_errors_hide_value() {
    let control = Control::start();
    let kiln = env_ready(&control);

    let both = kiln.run(&[
        "secrets",
        "set",
        &format!("X={CANARY}"),
        "--from-file",
        "/dev/null",
    ]);
    both.expect_code(2);
    assert!(!both.all_output().contains(CANARY), "{}", both.stderr);

    let bad_name = kiln.run(&["secrets", "set", &format!("1X={CANARY}")]);
    bad_name.expect_code(2);
    assert!(
        !bad_name.all_output().contains(CANARY),
        "{}",
        bad_name.stderr
    );

    let empty = kiln.run_with_stdin(&["secrets", "set", "EMPTY"], Some(""));
    empty.expect_code(2);
    assert!(empty.stderr.contains("stdin was empty"), "{}", empty.stderr);

    kiln.run(&["secrets", "unset", "NOPE"]).expect_code(3);
    kiln.run(&["secrets", "set", &format!("GONE={CANARY}")])
        .ok();
    kiln.run(&["secrets", "unset", "GONE"]).ok();
    let list = kiln.run(&["secrets", "list", "--json"]);
    assert_eq!(list.json()["items"], serde_json::json!([]));
}
