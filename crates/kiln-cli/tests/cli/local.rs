//! Behaviour that needs no control plane: usage errors, non-terminal rules, `init` and
//! `completion`, and the errors of a CLI that is not logged in.

use crate::harness::Kiln;

#[test]
fn help_lists_exit_codes() {
    let run = Kiln::new().run(&["--help"]);

    run.ok();
    for line in [
        "0    success",
        "3    not found",
        "5    authentication",
        "6    deploy failed",
    ] {
        assert!(
            run.stdout.contains(line),
            "missing {line:?} in:\n{}",
            run.stdout
        );
    }
}

#[test]
fn unknown_flag_is_usage_error() {
    let run = Kiln::new().run(&["apps", "list", "--colour"]);

    run.expect_code(2);
    assert!(run.stderr.contains("--colour"), "{}", run.stderr);
    assert!(run.stdout.is_empty());
}

#[test]
fn not_logged_in_is_auth_error() {
    let run = Kiln::new().run(&["apps", "list", "--org", "acme"]);

    run.expect_code(5);
    assert!(run.stderr.contains("not logged in"), "{}", run.stderr);
    assert!(
        run.stderr.contains("hint: run `kiln login"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty());
}

#[test]
fn missing_org_names_flag() {
    let mut kiln = Kiln::new();
    kiln.set_env("KILN_TOKEN", "kiln_unused");
    kiln.set_env("KILN_API_URL", "http://127.0.0.1:9");

    let run = kiln.run(&["apps", "list"]);

    run.expect_code(2);
    assert!(run.stderr.contains("error: no org given"), "{}", run.stderr);
    assert!(
        run.stderr.contains("pass --org, set KILN_ORG"),
        "{}",
        run.stderr
    );
}

#[test]
fn invalid_app_name_is_usage_error() {
    let mut kiln = Kiln::new();
    kiln.set_env("KILN_TOKEN", "kiln_unused");
    kiln.set_env("KILN_API_URL", "http://127.0.0.1:9");

    let run = kiln.run(&["apps", "create", "Web_App", "--org", "acme"]);

    run.expect_code(2);
    assert!(
        run.stderr.contains("invalid app name \"Web_App\""),
        "{}",
        run.stderr
    );
}

#[test]
fn unreachable_server_is_failure_with_hint() {
    let mut kiln = Kiln::new();
    kiln.set_env("KILN_TOKEN", "kiln_unused");
    // Port 9 (discard) on loopback: nothing listens there on a test machine.
    kiln.set_env("KILN_API_URL", "http://127.0.0.1:9");

    let run = kiln.run(&["apps", "list", "--org", "acme"]);

    run.expect_code(1);
    assert!(
        run.stderr.contains("request GET /v1/orgs/acme/apps"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("caused by:"), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("hint: check that kiln-control is reachable"),
        "{}",
        run.stderr
    );
}

#[test]
fn destroy_without_terminal_needs_yes() {
    let mut kiln = Kiln::new();
    kiln.set_env("KILN_TOKEN", "kiln_unused");
    kiln.set_env("KILN_API_URL", "http://127.0.0.1:9");

    let run = kiln.run(&["apps", "destroy", "web", "--org", "acme"]);

    run.expect_code(2);
    assert!(
        run.stderr.contains("stdin is not a terminal"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("pass --yes"), "{}", run.stderr);
}

#[test]
fn login_without_terminal_names_flags() {
    let run = Kiln::new().run(&["login", "--api-url", "http://127.0.0.1:9"]);

    run.expect_code(2);
    assert!(
        run.stderr.contains("cannot prompt for API token"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("--token-stdin"), "{}", run.stderr);
}

#[test]
fn login_without_url_names_flag() {
    let run = Kiln::new().run(&["login", "--token", "kiln_x"]);

    run.expect_code(2);
    assert!(run.stderr.contains("pass --api-url"), "{}", run.stderr);
}

#[test]
fn unknown_context_is_not_found() {
    let mut kiln = Kiln::new();
    kiln.set_env("KILN_TOKEN", "kiln_unused");

    let run = kiln.run(&["whoami", "--context", "staging"]);

    run.expect_code(3);
    assert!(
        run.stderr.contains("context \"staging\" not found"),
        "{}",
        run.stderr
    );
}

#[test]
fn invalid_api_url_is_usage_error() {
    let mut kiln = Kiln::new();
    kiln.set_env("KILN_TOKEN", "kiln_unused");

    for url in ["not a url", "ftp://127.0.0.1:9", "127.0.0.1:9"] {
        let run = kiln.run(&["apps", "list", "--org", "acme", "--api-url", url]);

        run.expect_code(2);
        assert!(
            run.stderr.contains(&format!(
                "invalid --api-url {url:?}: expected http(s)://HOST[:PORT]"
            )),
            "{}",
            run.stderr
        );
        assert!(!run.stderr.contains("builder error"), "{}", run.stderr);
    }
}

#[test]
fn tokens_help_says_app_ignored() {
    let run = Kiln::new().run(&["tokens", "create", "--help"]);

    run.ok();
    let help = run.stdout.replace('\n', " ");
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        help.contains("login, logout, whoami, tokens and hosts ignore it"),
        "{}",
        run.stdout
    );
}

#[test]
fn scale_rejects_bad_count() {
    let run = Kiln::new().run(&["scale", "web=three", "--env", "prod"]);

    run.expect_code(2);
    assert!(
        run.stderr.contains("invalid count \"web=three\""),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("with a count from 0 to 100\n"),
        "{}",
        run.stderr
    );
}

#[test]
fn init_writes_manifest_once() {
    let kiln = Kiln::new();

    let run = kiln.run(&["init", "--name", "web", "--image", "127.0.0.1:5000/web:1"]);

    run.ok();
    let text = std::fs::read_to_string(kiln.workdir().join("kiln.toml")).unwrap();
    assert!(text.contains("app = \"web\""), "{text}");
    assert!(text.contains("--image 127.0.0.1:5000/web:1"), "{text}");
    insta::assert_snapshot!("init_stdout", run.stdout);

    let again = kiln.run(&["init", "--name", "web"]);
    again.expect_code(2);
    assert!(
        again.stderr.contains("kiln.toml already exists"),
        "{}",
        again.stderr
    );
    assert!(again.stderr.contains("--force"), "{}", again.stderr);
}

#[test]
fn init_rejects_bad_image() {
    let kiln = Kiln::new();

    let run = kiln.run(&["init", "--name", "web", "--image", "Web:latest"]);

    run.expect_code(2);
    assert!(
        run.stderr.contains("invalid --image \"Web:latest\""),
        "{}",
        run.stderr
    );
    assert!(!kiln.workdir().join("kiln.toml").exists());
}

#[test]
fn app_read_from_manifest() {
    let mut kiln = Kiln::new();
    kiln.set_env("KILN_TOKEN", "kiln_unused");
    kiln.set_env("KILN_API_URL", "http://127.0.0.1:9");
    kiln.run(&["init", "--name", "shop"]).ok();

    let run = kiln.run(&["envs", "list", "--org", "acme"]);

    // The request fails (nothing listens), but it names the app from kiln.toml.
    assert!(
        run.stderr.contains("/v1/orgs/acme/apps/shop/envs"),
        "{}",
        run.stderr
    );
}

#[test]
fn completion_scripts_generate() {
    let kiln = Kiln::new();

    for (shell, marker) in [
        ("bash", "_kiln()"),
        ("zsh", "#compdef kiln"),
        ("fish", "complete -c kiln"),
    ] {
        let run = kiln.run(&["completion", shell]);

        run.ok();
        assert!(
            run.stdout.contains(marker),
            "{shell}: {}",
            &run.stdout[..200.min(run.stdout.len())]
        );
        assert!(
            run.stdout.contains("deploy"),
            "{shell} script lacks subcommands"
        );
    }
}

#[test]
fn every_command_has_example() {
    let kiln = Kiln::new();

    for path in crate::docs::command_paths(&kiln) {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let run = kiln.run(&args);

        run.ok();
        assert!(
            run.stdout.contains("Examples:\n  kiln"),
            "`kiln {}` has no example in --help",
            path.join(" ")
        );
    }
}

#[test]
fn deploy_shows_manifest_errors() {
    let mut kiln = Kiln::new();
    kiln.set_env("KILN_TOKEN", "kiln_unused");
    kiln.set_env("KILN_API_URL", "http://127.0.0.1:9");
    kiln.run(&["init", "--name", "web"]).ok();
    let path = kiln.workdir().join("kiln.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("memory = \"512MiB\"", "memory = \"64MiB\""),
    )
    .unwrap();

    let run = kiln.run(&[
        "deploy",
        "--env",
        "prod",
        "--org",
        "acme",
        "--image",
        "127.0.0.1:5000/web:1",
    ]);

    run.expect_code(1);
    assert!(
        run.stderr
            .contains("error: kiln.toml is not a valid manifest: 1 error"),
        "{}",
        run.stderr
    );
    assert_eq!(
        run.stderr.matches("is not a valid manifest").count(),
        1,
        "the headline repeats:\n{}",
        run.stderr
    );
    assert!(run.stderr.contains("[kiln.toml:16:10]"), "{}", run.stderr);
    assert!(run.stderr.contains("memory = \"64MiB\""), "{}", run.stderr);
    assert!(run.stderr.contains("^^^"), "no underline:\n{}", run.stderr);
    assert!(
        run.stderr.contains("below the minimum of 128 MiB"),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("request"),
        "no request may be sent:\n{}",
        run.stderr
    );
}

#[test]
fn deploy_without_manifest_says_init() {
    let mut kiln = Kiln::new();
    kiln.set_env("KILN_TOKEN", "kiln_unused");
    kiln.set_env("KILN_API_URL", "http://127.0.0.1:9");

    let run = kiln.run(&["deploy", "--env", "prod", "--org", "acme"]);

    run.expect_code(1);
    assert!(
        run.stderr.contains("cannot read manifest kiln.toml"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("run `kiln init`"), "{}", run.stderr);
}
