//! `kiln ips` against a real kiln-control whose dedicated IPv4 pool is [`IPV4_POOL`]:
//! allocate, list, release, pool exhaustion, confirmation and bad input.

use insta::assert_snapshot;

use crate::harness::{Kiln, redact};
use crate::server::{Control, IPV4_POOL};

/// Redacts `text` and collapses each run of spaces to one: the table's column widths follow the
/// length of the environment's random IPv6 address, which the redaction hides.
fn redact_table(text: &str) -> String {
    redact(text)
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn env_ready(control: &Control) -> Kiln {
    let mut kiln = control.kiln();
    kiln.run(&["apps", "create", "web"]).ok();
    kiln.set_env("KILN_APP", "web");
    kiln.run(&["envs", "create", "prod"]).ok();
    kiln.set_env("KILN_ENV", "prod");
    kiln
}

#[test]
fn ips_allocate_list_release() {
    let control = Control::start();
    let kiln = env_ready(&control);

    let allocate = kiln.run(&["ips", "allocate-v4"]);
    allocate.ok();
    assert_snapshot!("ips_allocate_stdout", redact(&allocate.stdout));
    let allocate_json = kiln.run(&["ips", "allocate-v4", "--json"]);
    allocate_json.ok();
    let second = allocate_json.json();
    assert_eq!(second["address"], "192.0.2.2");
    assert_eq!(second["version"], "ipv4");
    assert_eq!(second["billed"], true);
    assert_eq!(second["pool"], IPV4_POOL);

    let list = kiln.run(&["ips", "list"]);
    list.ok();
    assert_snapshot!("ips_list_stdout", redact_table(&list.stdout));
    let list_json = kiln.run(&["ips", "list", "--json"]);
    list_json.ok();
    let items = list_json.json()["items"].as_array().unwrap().clone();
    let addresses: Vec<&str> = items
        .iter()
        .map(|item| item["address"].as_str().unwrap())
        .collect();
    assert_eq!(addresses.len(), 3, "{addresses:?}");
    assert!(addresses[0].starts_with("fd"), "IPv6 first: {addresses:?}");
    assert_eq!(&addresses[1..], ["192.0.2.1", "192.0.2.2"]);
    assert_eq!(items[0]["billed"], false);

    let release = kiln.run(&["ips", "release", "192.0.2.1", "--yes"]);
    release.ok();
    assert_snapshot!("ips_release_stdout", redact(&release.stdout));
    let release_json = kiln.run(&["ips", "release", "192.0.2.2", "--yes", "--json"]);
    release_json.ok();
    assert_eq!(release_json.json()["released"], true);
    let after = kiln.run(&["ips", "list", "--json"]);
    after.ok();
    assert_eq!(after.json()["items"].as_array().unwrap().len(), 1);

    let events = kiln.run(&["events", "--json"]);
    events.ok();
    let allocated = events.stdout.matches("Ipv4AddressAllocated").count();
    let released = events.stdout.matches("Ipv4AddressReleased").count();
    assert_eq!(allocated, 2, "{}", events.stdout);
    assert_eq!(released, 2, "{}", events.stdout);
}

#[test]
fn ips_pool_exhausted_names_pool() {
    let control = Control::start();
    let kiln = env_ready(&control);
    kiln.run(&["ips", "allocate-v4"]).ok();
    kiln.run(&["ips", "allocate-v4"]).ok();

    let exhausted = kiln.run(&["ips", "allocate-v4"]);
    exhausted.expect_code(4);
    assert!(
        exhausted.stderr.contains(IPV4_POOL),
        "error names the pool: {}",
        exhausted.stderr
    );
    assert!(
        exhausted.stderr.contains("exhausted"),
        "{}",
        exhausted.stderr
    );
    assert_snapshot!("ips_allocate_exhausted_stderr", redact(&exhausted.stderr));
}

#[test]
fn ips_release_needs_confirmation() {
    let control = Control::start();
    let kiln = env_ready(&control);
    kiln.run(&["ips", "allocate-v4"]).ok();

    // stdin is not a terminal in tests, so release without --yes must not act.
    let refused = kiln.run(&["ips", "release", "192.0.2.1"]);
    refused.expect_code(2);
    assert!(refused.stderr.contains("--yes"), "{}", refused.stderr);
    let list = kiln.run(&["ips", "list", "--json"]);
    assert_eq!(list.json()["items"].as_array().unwrap().len(), 2);
}

#[test]
fn ips_release_bad_input() {
    let control = Control::start();
    let kiln = env_ready(&control);

    let invalid = kiln.run(&["ips", "release", "192.0.2.999", "--yes"]);
    invalid.expect_code(2);
    assert!(
        invalid.stderr.contains("\"192.0.2.999\""),
        "{}",
        invalid.stderr
    );

    let unknown = kiln.run(&["ips", "release", "192.0.2.1", "--yes"]);
    unknown.expect_code(3);
    assert!(unknown.stderr.contains("192.0.2.1"), "{}", unknown.stderr);

    let ipv6 = kiln.run(&["ips", "list", "--json"]);
    let address = ipv6.json()["items"][0]["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let free = kiln.run(&["ips", "release", &address, "--yes"]);
    free.expect_code(4);
    assert!(free.stderr.contains("IPv6"), "{}", free.stderr);
}
