//! `kiln deploy --image` resolves a tag to its digest through a real registry before any
//! call to the control plane.

use crate::harness::Kiln;
use crate::registry::{Registry, unique_repository};

fn project(kiln: &mut Kiln) {
    kiln.set_env("KILN_TOKEN", "kiln_unused");
    // Nothing listens on port 9, so the deploy request itself fails after resolution.
    kiln.set_env("KILN_API_URL", "http://127.0.0.1:9");
    kiln.set_env("KILN_ORG", "acme");
    kiln.run(&["init", "--name", "web"]).ok();
}

#[test]
fn deploy_pins_tag_to_digest() {
    let registry = Registry::start();
    let repository = unique_repository("team/web");
    let digest = registry.push_image(&repository, "1.0", b"layer one");
    let mut kiln = Kiln::new();
    project(&mut kiln);
    let image = format!("{}/{repository}:1.0", registry.addr);

    let run = kiln.run(&["deploy", "--env", "prod", "--image", &image, "--verbose"]);

    run.expect_code(1);
    let body_line = run
        .stderr
        .lines()
        .find(|line| line.starts_with("> {"))
        .unwrap_or_else(|| panic!("no request body logged:\n{}", run.stderr));
    let body: serde_json::Value = serde_json::from_str(&body_line[2..]).unwrap();
    let sent = &body["target"]["new_release"]["image"];
    assert_eq!(sent["digest"], digest.as_str());
    assert_eq!(sent["reference"], image.as_str());
}

#[test]
fn deploy_retag_changes_digest() {
    let registry = Registry::start();
    let repository = unique_repository("web");
    registry.push_image(&repository, "stable", b"old");
    let newer = registry.push_image(&repository, "stable", b"new");
    let mut kiln = Kiln::new();
    project(&mut kiln);
    let image = format!("{}/{repository}:stable", registry.addr);

    let run = kiln.run(&["deploy", "--env", "prod", "--image", &image, "--verbose"]);

    assert!(
        run.stderr.contains(&newer),
        "expected {newer}:\n{}",
        run.stderr
    );
}

#[test]
fn deploy_missing_tag_is_not_found() {
    let registry = Registry::start();
    let repository = unique_repository("web");
    registry.push_image(&repository, "1.0", b"layer");
    let mut kiln = Kiln::new();
    project(&mut kiln);
    let image = format!("{}/{repository}:2.0", registry.addr);

    let run = kiln.run(&["deploy", "--env", "prod", "--image", &image]);

    run.expect_code(3);
    assert!(
        run.stderr
            .contains(&format!("cannot resolve image {image}")),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("404"), "{}", run.stderr);
    assert!(
        run.stderr.contains("hint: check the repository and tag"),
        "{}",
        run.stderr
    );
}

#[test]
fn deploy_digest_sent_unchanged() {
    let registry = Registry::start();
    let repository = unique_repository("web");
    let digest = registry.push_image(&repository, "1.0", b"layer");
    let mut kiln = Kiln::new();
    project(&mut kiln);
    let image = format!("{}/{repository}@{digest}", registry.addr);

    let run = kiln.run(&["deploy", "--env", "prod", "--image", &image, "--verbose"]);

    assert!(
        run.stderr.contains(&format!("\"digest\":\"{digest}\"")),
        "{}",
        run.stderr
    );
}
