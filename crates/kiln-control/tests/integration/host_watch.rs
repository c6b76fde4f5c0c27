//! The assignments long poll over the host change feed: which events end a host's wait.

use kiln_api::types::*;

use crate::api_resources::{place_instance, register_host};
use crate::harness::{self, TestServer};

/// Long-poll wait of the watches that must end, in seconds; the tests fail if one times out.
const WAIT_SECS: u64 = 30;

#[tokio::test]
async fn host_watch_wakes_for_its_changes() {
    let server = TestServer::start().await;
    let client = server.org_client();
    let env = harness::create_app_and_env(&server).await;
    let path = harness::env_path(&server.org);
    let release = client
        .create_release(
            &path,
            &CreateRelease {
                image: harness::image(),
                spec: harness::release_spec(),
                description: String::new(),
            },
        )
        .await
        .unwrap();
    let first = register_host(&server, "h1").await;
    let second = register_host(&server, "h2").await;
    let initial = first
        .client
        .watch_assignments(&WatchQuery::default())
        .await
        .unwrap();
    assert!(initial.assignments.is_empty());

    // A placement names its host.
    let watch = {
        let client = first.client.clone();
        let after = initial.cursor;
        tokio::spawn(async move {
            client
                .watch_assignments(&WatchQuery {
                    after: Some(after),
                    wait: Some(WAIT_SECS),
                })
                .await
                .unwrap()
        })
    };
    let instance = place_instance(&server, &env, &release, &first.host, 10).await;
    let placed = watch.await.unwrap();
    assert!(placed.cursor > initial.cursor);
    assert_eq!(placed.assignments.len(), 1);
    assert_eq!(placed.assignments[0].instance_id, instance);

    // A config change names no host, but its env has an instance on h1.
    let watch = {
        let client = first.client.clone();
        let after = placed.cursor;
        tokio::spawn(async move {
            client
                .watch_assignments(&WatchQuery {
                    after: Some(after),
                    wait: Some(WAIT_SECS),
                })
                .await
                .unwrap()
        })
    };
    let mut update = UpdateConfig::default();
    update.set.insert("MODE".into(), "changed".into());
    client.update_config(&path, &update).await.unwrap();
    let configured = watch.await.unwrap();
    assert!(configured.cursor > placed.cursor);
    assert_eq!(configured.assignments[0].env_vars["MODE"], "changed");

    // h2 runs no instance of the env, so the same changes leave its set empty.
    let other = second
        .client
        .watch_assignments(&WatchQuery {
            after: Some(initial.cursor),
            wait: Some(1),
        })
        .await
        .unwrap();
    assert!(other.assignments.is_empty());
}

#[tokio::test]
async fn host_watch_cursor_before_feed() {
    let server = TestServer::start().await;
    let first = register_host(&server, "h1").await;

    // The feed starts with this first watch, so cursor 1 is older than it and is checked
    // against the log, where h1's registration (after seq 1) names h1.
    let changed = first
        .client
        .watch_assignments(&WatchQuery {
            after: Some(1),
            wait: Some(WAIT_SECS),
        })
        .await
        .unwrap();
    assert!(changed.cursor > 1);
    assert!(changed.assignments.is_empty());
}
