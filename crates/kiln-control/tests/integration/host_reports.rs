//! Batched state reports (`POST /v1/host/instances/states`): order, scoping to the calling
//! host, and the checks on each report.

use kiln_api::types::*;
use kiln_api::{ErrorCode, Event, InstanceState};
use kiln_control::store::streams;
use kiln_core::InstanceId;

use crate::api_resources::{place_instance, register_host};
use crate::harness::{self, TestServer};

fn report(instance_id: InstanceId, state: InstanceState) -> InstanceStateReport {
    InstanceStateReport {
        instance_id,
        state,
        detail: None,
        exit_code: None,
        output: Vec::new(),
    }
}

/// Creates a release of the minimal spec in the env at `path`.
async fn create_release(client: &kiln_api::Client, path: &kiln_api::client::EnvPath) -> Release {
    let request = CreateRelease {
        image: harness::image(),
        spec: harness::release_spec(),
        description: String::new(),
    };
    client.create_release(path, &request).await.unwrap()
}

/// Returns the states appended to an instance's stream, oldest first.
async fn reported_states(server: &TestServer, instance: InstanceId) -> Vec<InstanceState> {
    let payloads: Vec<serde_json::Value> = sqlx::query_scalar(
        "SELECT payload FROM events WHERE stream = $1 AND type = 'InstanceStateChanged'
         ORDER BY stream_version",
    )
    .bind(streams::instance(instance))
    .fetch_all(server.store.pool())
    .await
    .unwrap();
    payloads
        .into_iter()
        .map(|payload| match serde_json::from_value(payload).unwrap() {
            Event::InstanceStateChanged { state, .. } => state,
            other => panic!("not a state report: {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn batch_keeps_order_drops_foreign() {
    let server = TestServer::start().await;
    let client = server.org_client();
    let env = harness::create_app_and_env(&server).await;
    let path = harness::env_path(&server.org);
    let release = create_release(&client, &path).await;
    let first = register_host(&server, "h1").await;
    let second = register_host(&server, "h2").await;
    let a = place_instance(&server, &env, &release, &first.host, 10).await;
    let b = place_instance(&server, &env, &release, &first.host, 11).await;
    let foreign = place_instance(&server, &env, &release, &second.host, 12).await;
    let never_placed = InstanceId::new();

    let mut exited = report(b, InstanceState::Exited);
    exited.exit_code = Some(3);
    exited.output = vec!["migration 7 failed".to_owned()];
    let reported = first
        .client
        .report_instance_states(&ReportInstanceStates {
            reports: vec![
                report(a, InstanceState::Running),
                report(b, InstanceState::Preparing),
                report(foreign, InstanceState::Failed),
                report(a, InstanceState::Healthy),
                exited,
                report(never_placed, InstanceState::Running),
                report(foreign, InstanceState::Exited),
            ],
        })
        .await
        .unwrap();

    assert_eq!(reported.recorded, 4);
    assert_eq!(reported.unknown, vec![foreign, never_placed]);
    assert_eq!(
        reported_states(&server, a).await,
        vec![InstanceState::Running, InstanceState::Healthy]
    );
    assert_eq!(
        reported_states(&server, b).await,
        vec![InstanceState::Preparing, InstanceState::Exited]
    );
    assert!(reported_states(&server, foreign).await.is_empty());
    let instances = client.list_instances(&path).await.unwrap();
    let state_of = |id: InstanceId| {
        instances
            .items
            .iter()
            .find(|instance| instance.id == id)
            .map(|instance| instance.state)
    };
    assert_eq!(state_of(a), Some(InstanceState::Healthy));
    assert_eq!(state_of(b), Some(InstanceState::Exited));
    assert_eq!(state_of(foreign), Some(InstanceState::Pending));

    let empty = first
        .client
        .report_instance_states(&ReportInstanceStates {
            reports: Vec::new(),
        })
        .await
        .unwrap();
    assert_eq!(empty.recorded, 0);

    // An org token is not a host token.
    let rejected = client
        .report_instance_states(&ReportInstanceStates {
            reports: vec![report(a, InstanceState::Failed)],
        })
        .await
        .unwrap_err();
    assert_eq!(rejected.code(), Some(ErrorCode::Forbidden));

    let rebuilt = server
        .store
        .rebuild_projections(kiln_control::store::rebuild::RebuildMode::Verify)
        .await
        .unwrap();
    assert!(rebuilt.matches(), "{:#?}", rebuilt.diffs);
}

#[tokio::test]
async fn invalid_batch_names_report() {
    let server = TestServer::start().await;
    let client = server.org_client();
    let env = harness::create_app_and_env(&server).await;
    let path = harness::env_path(&server.org);
    let release = create_release(&client, &path).await;
    let host = register_host(&server, "h1").await;
    let instance = place_instance(&server, &env, &release, &host.host, 10).await;

    let mut long_detail = report(instance, InstanceState::Unhealthy);
    long_detail.detail = Some("x".repeat(5000));
    let mut long_line = report(instance, InstanceState::Exited);
    long_line.output = vec!["y".repeat(2000)];
    let mut many_lines = report(instance, InstanceState::Exited);
    many_lines.output = vec!["line".to_owned(); MAX_REPORTED_OUTPUT_LINES + 1];
    let cases = [
        (
            vec![report(instance, InstanceState::Running); MAX_STATE_REPORTS + 1],
            "reports",
        ),
        (
            vec![report(instance, InstanceState::Running), long_detail],
            "reports[1].detail",
        ),
        (vec![long_line], "reports[0].output"),
        (
            vec![report(instance, InstanceState::Running), many_lines],
            "reports[1].output",
        ),
    ];
    for (reports, field) in cases {
        let error = host
            .client
            .report_instance_states(&ReportInstanceStates { reports })
            .await
            .unwrap_err();
        let kiln_api::ClientError::Api { body, .. } = error else {
            panic!("{field}: not an API error: {error}");
        };
        assert_eq!(body.code, ErrorCode::InvalidValue, "{field}");
        assert_eq!(body.details["field"], field);
    }

    let token = {
        let created = server
            .operator()
            .create_host(&CreateHost { name: "h2".into() })
            .await
            .unwrap();
        created.token.secret
    };
    let malformed = [
        br#"{"reports": [{"instance_id": "nope", "state": "running"}]}"#.to_vec(),
        br#"{"reports": [{"state": "running"}]}"#.to_vec(),
        br#"{"reports": {}}"#.to_vec(),
        br#"{"reports": [], "extra": 1}"#.to_vec(),
    ];
    for body in malformed {
        let (status, json) = server
            .raw(
                "POST",
                kiln_api::routes::HOST_SELF_INSTANCE_STATES,
                Some(&token),
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
        assert!(json["code"].is_string(), "{json}");
    }

    assert!(reported_states(&server, instance).await.is_empty());
}

#[tokio::test]
async fn deleted_env_instances_report_stop() {
    let server = TestServer::start().await;
    let client = server.org_client();
    let env = harness::create_app_and_env(&server).await;
    let path = harness::env_path(&server.org);
    let release = create_release(&client, &path).await;
    let host = register_host(&server, "h1").await;
    let single = place_instance(&server, &env, &release, &host.host, 10).await;
    let batched = place_instance(&server, &env, &release, &host.host, 11).await;

    client.delete_env(&path).await.unwrap();

    let exited = ReportInstanceState {
        state: InstanceState::Exited,
        detail: None,
        exit_code: Some(0),
        output: Vec::new(),
    };
    host.client
        .report_instance_state(single, &exited)
        .await
        .unwrap();
    let reported = host
        .client
        .report_instance_states(&ReportInstanceStates {
            reports: vec![report(batched, InstanceState::Exited)],
        })
        .await
        .unwrap();
    assert_eq!(reported.recorded, 1);
    assert!(reported.unknown.is_empty());

    // The reports belong to the org, so its event listing still shows them.
    for instance in [single, batched] {
        assert_eq!(
            reported_states(&server, instance).await,
            vec![InstanceState::Exited]
        );
        let org: Option<uuid::Uuid> = sqlx::query_scalar(
            "SELECT org_id FROM events WHERE stream = $1 AND type = 'InstanceStateChanged'",
        )
        .bind(streams::instance(instance))
        .fetch_one(server.store.pool())
        .await
        .unwrap();
        assert_eq!(org, Some(env.org_id.as_uuid()));
    }
}
