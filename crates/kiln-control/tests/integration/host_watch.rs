//! The assignments long poll over the host change feed: which events end a host's wait.

use kiln_api::Event;
use kiln_api::types::*;
use kiln_control::store::{ExpectedVersion, NewEvent, streams};
use kiln_core::InstanceId;

use crate::api_resources::{
    RegisteredHost, place_instance, place_named_instance, register_host, registration,
};
use crate::harness::{self, TestServer};

/// Long-poll wait of the watches that must end, in seconds; the tests fail if one times out.
const WAIT_SECS: u64 = 30;

#[tokio::test]
async fn host_watch_wakes_for_its_changes() {
    let server = TestServer::start().await;
    let client = server.org_client();
    let env = harness::create_app_and_env(&server).await;
    let path = harness::env_path(&server.org);
    let release = harness::create_release(&server, harness::release_spec()).await;
    let first = register_host(&server, "h1").await;
    let second = register_host(&server, "h2").await;
    let initial = first
        .client
        .watch_assignments(&AssignmentsQuery::default())
        .await
        .unwrap();
    assert!(initial.assignments.is_empty());

    // A placement names its host.
    let watch = {
        let client = first.client.clone();
        let after = initial.cursor;
        tokio::spawn(async move {
            client
                .watch_assignments(&AssignmentsQuery {
                    after: Some(after),
                    wait: Some(WAIT_SECS),
                    ..AssignmentsQuery::default()
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
                .watch_assignments(&AssignmentsQuery {
                    after: Some(after),
                    wait: Some(WAIT_SECS),
                    ..AssignmentsQuery::default()
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
        .watch_assignments(&AssignmentsQuery {
            after: Some(initial.cursor),
            wait: Some(1),
            ..AssignmentsQuery::default()
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
        .watch_assignments(&AssignmentsQuery {
            after: Some(1),
            wait: Some(WAIT_SECS),
            ..AssignmentsQuery::default()
        })
        .await
        .unwrap();
    assert!(changed.cursor > 1);
    assert!(changed.assignments.is_empty());
}

/// Requests the changes after `set`'s cursor, waiting for one, and applies them to `set`.
/// Returns the response as received.
async fn apply_changes(host: &RegisteredHost, set: &mut HostAssignments) -> HostAssignments {
    let page = host
        .client
        .watch_assignments(&AssignmentsQuery {
            after: Some(set.cursor),
            wait: Some(WAIT_SECS),
            changes: Some(true),
        })
        .await
        .unwrap();
    set.apply(page.clone());
    page
}

/// Applies changes to `set` until it contains `count` assignments. Each call waits for a
/// change, so the test fails on a lost change instead of looping.
async fn apply_until(host: &RegisteredHost, set: &mut HostAssignments, count: usize) {
    for _ in 0..10 {
        if set.assignments.len() == count {
            return;
        }
        apply_changes(host, set).await;
    }
    assert_eq!(set.assignments.len(), count, "{set:#?}");
}

/// Returns the instance ids of `set`, sorted.
fn ids(set: &HostAssignments) -> Vec<InstanceId> {
    let mut ids: Vec<InstanceId> = set.assignments.iter().map(|a| a.instance_id).collect();
    ids.sort();
    ids
}

/// Checks that `set`, built from changes, equals the complete set read now.
async fn assert_matches_complete(host: &RegisteredHost, set: &HostAssignments) {
    let complete = host
        .client
        .watch_assignments(&AssignmentsQuery::default())
        .await
        .unwrap();
    assert!(complete.complete);
    let mut expected = complete.assignments;
    let mut actual = set.assignments.clone();
    expected.sort_by_key(|a| a.instance_id);
    actual.sort_by_key(|a| a.instance_id);
    assert_eq!(actual, expected);
}

#[tokio::test]
async fn host_watch_returns_changes_only() {
    let server = TestServer::start().await;
    let client = server.org_client();
    let env = harness::create_app_and_env(&server).await;
    let path = harness::env_path(&server.org);
    let release = harness::create_release(&server, harness::release_spec()).await;
    let first = register_host(&server, "h1").await;
    let second = register_host(&server, "h2").await;

    // Cursor 0 always gets the complete set, even when changes are asked for.
    let mut set = first
        .client
        .watch_assignments(&AssignmentsQuery {
            changes: Some(true),
            ..AssignmentsQuery::default()
        })
        .await
        .unwrap();
    assert!(set.complete);
    assert!(set.assignments.is_empty());

    // Placements on h1 arrive as changes; one on h2 never shows on h1.
    let a = place_instance(&server, &env, &release, &first.host, 10).await;
    let b = place_instance(&server, &env, &release, &first.host, 11).await;
    place_instance(&server, &env, &release, &second.host, 12).await;
    let page = apply_changes(&first, &mut set).await;
    assert!(!page.complete);
    assert!(page.removed.is_empty());
    apply_until(&first, &mut set, 2).await;
    let mut expected = vec![a, b];
    expected.sort();
    assert_eq!(ids(&set), expected);
    assert_matches_complete(&first, &set).await;

    // A config change of the env changes both of its instances on h1.
    let mut update = UpdateConfig::default();
    update.set.insert("MODE".into(), "changed".into());
    client.update_config(&path, &update).await.unwrap();
    let page = apply_changes(&first, &mut set).await;
    assert!(!page.complete);
    let mut changed: Vec<InstanceId> = page.assignments.iter().map(|a| a.instance_id).collect();
    changed.sort();
    assert_eq!(changed, expected);
    assert!(
        set.assignments
            .iter()
            .all(|a| a.env_vars["MODE"] == "changed")
    );
    assert_matches_complete(&first, &set).await;

    // A stop request changes the instance's desired state; its removal takes it out of the
    // set and lists it as removed.
    let append = |event: Event| {
        let store = server.store.clone();
        let org_id = env.org_id;
        async move {
            store
                .append(
                    &streams::instance(a),
                    ExpectedVersion::Any,
                    vec![NewEvent::org(org_id, event)],
                    "system:scheduler",
                )
                .await
                .unwrap();
        }
    };
    append(Event::InstanceStopRequested {
        instance_id: a,
        env_id: env.id,
        host_id: first.host.id,
        reason: "scale".into(),
    })
    .await;
    let page = apply_changes(&first, &mut set).await;
    assert_eq!(page.assignments.len(), 1, "{page:#?}");
    assert_eq!(page.assignments[0].instance_id, a);
    assert_eq!(page.assignments[0].desired, DesiredState::Stopped);
    assert_matches_complete(&first, &set).await;

    append(Event::InstanceRemoved {
        instance_id: a,
        env_id: env.id,
        host_id: first.host.id,
    })
    .await;
    let mut removed = Vec::new();
    for _ in 0..10 {
        if set.assignments.len() == 1 {
            break;
        }
        removed.extend(apply_changes(&first, &mut set).await.removed);
    }
    assert_eq!(removed, vec![a]);
    assert_eq!(ids(&set), vec![b]);
    assert_matches_complete(&first, &set).await;

    // A registration changes the host itself (its network prefix): the complete set.
    first.client.register_host(&registration()).await.unwrap();
    let page = apply_changes(&first, &mut set).await;
    assert!(page.complete, "{page:#?}");
    assert_eq!(ids(&set), vec![b]);
    assert_matches_complete(&first, &set).await;

    // A deleted env's instances leave the set at once, while their rows remain until they
    // are stopped and removed. The event is appended alone, without the stop requests the
    // API adds, so the removal comes from the env's own change.
    server
        .store
        .append(
            &streams::env(env.id),
            ExpectedVersion::Any,
            vec![NewEvent::org(
                env.org_id,
                Event::EnvDeleted { env_id: env.id },
            )],
            "test",
        )
        .await
        .unwrap();
    let mut removed = Vec::new();
    for _ in 0..10 {
        if set.assignments.is_empty() {
            break;
        }
        removed.extend(apply_changes(&first, &mut set).await.removed);
    }
    assert_eq!(removed, vec![b]);
    assert_matches_complete(&first, &set).await;
}

#[tokio::test]
async fn host_watch_rejects_bad_changes_flag() {
    let server = TestServer::start().await;
    let host = register_host(&server, "h1").await;

    let (status, body) = server
        .raw(
            "GET",
            "/v1/host/assignments?changes=maybe",
            Some(&host.token),
            None,
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid_value", "{body}");
    assert_eq!(body["details"]["field"], "changes", "{body}");

    let (status, body) = server
        .raw(
            "GET",
            "/v1/host/assignments?changes=true",
            Some(&host.token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["complete"], true, "{body}");
}

#[tokio::test]
async fn finished_release_command_ignores_live_reports() {
    let server = TestServer::start().await;
    let env = harness::create_app_and_env(&server).await;
    let mut spec = harness::release_spec();
    spec.release_command = Some(vec!["/app/migrate".to_owned()]);
    spec.release_command_limits = Some(ReleaseCommandLimits {
        timeout_secs: 60,
        vcpus: 1,
        memory_mib: 256,
    });
    let release = harness::create_release(&server, spec).await;
    let host = register_host(&server, "h1").await;
    let mut set = host
        .client
        .watch_assignments(&AssignmentsQuery::default())
        .await
        .unwrap();
    let job =
        place_named_instance(&server, &env, &release, &host.host, 20, "release-command").await;
    let other =
        place_named_instance(&server, &env, &release, &host.host, 21, "release-command").await;
    apply_until(&host, &mut set, 2).await;
    let report = |state: InstanceState, exit_code: Option<i32>| ReportInstanceState {
        state,
        detail: None,
        exit_code,
        output: Vec::new(),
    };

    // A live state after the exit, one call each: the exit remains.
    host.client
        .report_instance_state(job, &report(InstanceState::Exited, Some(0)))
        .await
        .unwrap();
    let after_live = host
        .client
        .report_instance_state(job, &report(InstanceState::Running, None))
        .await
        .unwrap();
    assert_eq!(after_live.state, InstanceState::Exited);

    // In one batch: the exit is recorded, the live state after it is not.
    let batch = ReportInstanceStates {
        reports: vec![
            InstanceStateReport::new(other, report(InstanceState::Failed, None)),
            InstanceStateReport::new(other, report(InstanceState::Healthy, None)),
            InstanceStateReport::new(job, report(InstanceState::Booting, None)),
        ],
    };
    let recorded = host.client.report_instance_states(&batch).await.unwrap();
    assert_eq!(recorded.recorded, 1);
    assert!(recorded.unknown.is_empty());

    // Both stay stopped in the complete set and in the set built from changes.
    for _ in 0..10 {
        let stopped = set
            .assignments
            .iter()
            .filter(|a| a.desired == DesiredState::Stopped)
            .count();
        if stopped == 2 {
            break;
        }
        apply_changes(&host, &mut set).await;
    }
    assert!(
        set.assignments
            .iter()
            .all(|a| a.desired == DesiredState::Stopped),
        "{set:#?}"
    );
    assert_matches_complete(&host, &set).await;
}
