//! Malformed input gets a 4xx with a stable code, never a 500.

use kiln_api::types::TokenKind;

use crate::harness::{self, TestServer};

struct Case {
    name: &'static str,
    method: &'static str,
    path: String,
    body: Option<Vec<u8>>,
    status: u16,
    code: &'static str,
}

fn case(
    name: &'static str,
    method: &'static str,
    path: &str,
    body: Option<&str>,
    status: u16,
    code: &'static str,
) -> Case {
    Case {
        name,
        method,
        path: path.to_owned(),
        body: body.map(|body| body.as_bytes().to_vec()),
        status,
        code,
    }
}

#[tokio::test]
async fn bad_input_gets_stable_codes() {
    let server = TestServer::start().await;
    harness::create_app_and_env(&server).await;
    let env = "/v1/orgs/acme/apps/web/envs/prod";
    let digest = format!("sha256:{}", "ab".repeat(32));
    let release = |spec: &str, digest: &str| {
        format!(r#"{{"image": {{"reference": "r/x:1", "digest": "{digest}"}}, "spec": {spec}}}"#)
    };
    let good_spec = r#"{"processes": {"web": {"count": 1, "vcpus": 1, "memory_mib": 256}}}"#;

    let mut cases = vec![
        case(
            "malformed json",
            "POST",
            "/v1/orgs/acme/apps",
            Some(r#"{"name":"#),
            400,
            "malformed_json",
        ),
        case(
            "not json at all",
            "POST",
            "/v1/orgs/acme/apps",
            Some("name=web"),
            400,
            "malformed_json",
        ),
        case(
            "empty body",
            "POST",
            "/v1/orgs/acme/apps",
            Some(""),
            400,
            "malformed_json",
        ),
        case(
            "unknown field",
            "POST",
            "/v1/orgs/acme/apps",
            Some(r#"{"name": "x", "colour": "red"}"#),
            400,
            "invalid_body",
        ),
        case(
            "wrong type",
            "POST",
            "/v1/orgs/acme/apps",
            Some(r#"{"name": 5}"#),
            400,
            "invalid_body",
        ),
        case(
            "missing field",
            "POST",
            "/v1/orgs/acme/apps",
            Some("{}"),
            400,
            "invalid_body",
        ),
        case(
            "uppercase name",
            "POST",
            "/v1/orgs/acme/apps",
            Some(r#"{"name": "Web"}"#),
            400,
            "invalid_body",
        ),
        case(
            "name too long",
            "POST",
            "/v1/orgs/acme/apps",
            Some(&format!(r#"{{"name": "{}"}}"#, "a".repeat(64))),
            400,
            "invalid_body",
        ),
        case(
            "bad name in path",
            "GET",
            "/v1/orgs/acme/apps/Bad_Name",
            None,
            400,
            "invalid_value",
        ),
        case(
            "bad env name in path",
            "GET",
            "/v1/orgs/acme/apps/web/envs/-x",
            None,
            400,
            "invalid_value",
        ),
        case(
            "bad release version",
            "GET",
            &format!("{env}/releases/zero"),
            None,
            400,
            "invalid_value",
        ),
        case(
            "release version zero",
            "GET",
            &format!("{env}/releases/0"),
            None,
            400,
            "invalid_value",
        ),
        case(
            "bad deploy id",
            "GET",
            &format!("{env}/deploys/nope"),
            None,
            400,
            "invalid_value",
        ),
        case(
            "bad digest",
            "POST",
            &format!("{env}/releases"),
            Some(&release(good_spec, "sha256:xyz")),
            400,
            "invalid_value",
        ),
        case(
            "no processes",
            "POST",
            &format!("{env}/releases"),
            Some(&release(r#"{"processes": {}}"#, &digest)),
            400,
            "invalid_value",
        ),
        case(
            "memory too small",
            "POST",
            &format!("{env}/releases"),
            Some(&release(
                r#"{"processes": {"web": {"count": 1, "vcpus": 1, "memory_mib": 1}}}"#,
                &digest,
            )),
            400,
            "invalid_value",
        ),
        case(
            "vcpus zero",
            "POST",
            &format!("{env}/releases"),
            Some(&release(
                r#"{"processes": {"web": {"count": 1, "vcpus": 0, "memory_mib": 256}}}"#,
                &digest,
            )),
            400,
            "invalid_value",
        ),
        case(
            "port out of range",
            "POST",
            &format!("{env}/releases"),
            Some(&release(
                r#"{"processes": {"web": {"count": 1, "vcpus": 1, "memory_mib": 256}}, "services": [{"name": "http", "process": "web", "internal_port": 70000, "protocol": "tls"}]}"#,
                &digest,
            )),
            400,
            "invalid_body",
        ),
        case(
            "port zero",
            "POST",
            &format!("{env}/releases"),
            Some(&release(
                r#"{"processes": {"web": {"count": 1, "vcpus": 1, "memory_mib": 256}}, "services": [{"name": "http", "process": "web", "internal_port": 0, "protocol": "tls"}]}"#,
                &digest,
            )),
            400,
            "invalid_value",
        ),
        case(
            "service names no process",
            "POST",
            &format!("{env}/releases"),
            Some(&release(
                r#"{"processes": {"web": {"count": 1, "vcpus": 1, "memory_mib": 256}}, "services": [{"name": "http", "process": "worker", "internal_port": 80, "protocol": "tls"}]}"#,
                &digest,
            )),
            400,
            "invalid_value",
        ),
        case(
            "negative count",
            "POST",
            &format!("{env}/releases"),
            Some(&release(
                r#"{"processes": {"web": {"count": -1, "vcpus": 1, "memory_mib": 256}}}"#,
                &digest,
            )),
            400,
            "invalid_body",
        ),
        case(
            "scale too high",
            "PUT",
            &format!("{env}/scale"),
            Some(r#"{"counts": {"web": 1000}}"#),
            400,
            "invalid_value",
        ),
        case(
            "bad config name",
            "PATCH",
            &format!("{env}/config"),
            Some(r#"{"set": {"1BAD": "x"}}"#),
            400,
            "invalid_value",
        ),
        case(
            "empty config change",
            "PATCH",
            &format!("{env}/config"),
            Some("{}"),
            400,
            "invalid_value",
        ),
        case(
            "bad secret name",
            "PUT",
            &format!("{env}/secrets/bad-name"),
            Some(r#"{"value": "x"}"#),
            400,
            "invalid_value",
        ),
        case(
            "secret too large",
            "PUT",
            &format!("{env}/secrets/BIG"),
            Some(&format!(r#"{{"value": "{}"}}"#, "x".repeat(70 * 1024))),
            400,
            "invalid_value",
        ),
        case(
            "token lifetime too long",
            "POST",
            "/v1/orgs/acme/tokens",
            Some(r#"{"name": "t", "expires_in_secs": 999999999999}"#),
            400,
            "invalid_value",
        ),
        case(
            "token name empty",
            "POST",
            "/v1/orgs/acme/tokens",
            Some(r#"{"name": ""}"#),
            400,
            "invalid_value",
        ),
        case(
            "wait too long",
            "GET",
            "/v1/orgs/acme/events?wait=999",
            None,
            400,
            "invalid_value",
        ),
        case(
            "wait not a number",
            "GET",
            "/v1/orgs/acme/events?wait=soon",
            None,
            400,
            "invalid_value",
        ),
        case(
            "unknown query parameter",
            "GET",
            "/v1/orgs/acme/events?colour=red",
            None,
            400,
            "invalid_value",
        ),
        case(
            "limit zero",
            "GET",
            "/v1/orgs/acme/events?limit=0",
            None,
            400,
            "invalid_value",
        ),
        case(
            "unknown endpoint",
            "GET",
            "/v1/nothing-here",
            None,
            404,
            "not_found",
        ),
        case(
            "wrong method",
            "PATCH",
            "/v1/orgs/acme/apps",
            Some("{}"),
            405,
            "method_not_allowed",
        ),
    ];
    cases.push(Case {
        name: "oversize body",
        method: "POST",
        path: "/v1/orgs/acme/apps".to_owned(),
        body: Some(format!(r#"{{"name": "{}"}}"#, "a".repeat(2 * 1024 * 1024)).into_bytes()),
        status: 413,
        code: "body_too_large",
    });

    for case in &cases {
        let (status, body) = server
            .raw(
                case.method,
                &case.path,
                Some(&server.org_token),
                case.body.clone(),
            )
            .await;
        assert_eq!(status, case.status, "{}: {body}", case.name);
        assert_eq!(body["code"], case.code, "{}: {body}", case.name);
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|message| !message.is_empty()),
            "{}: {body}",
            case.name
        );
    }

    let report = server
        .store
        .rebuild_projections(kiln_control::store::rebuild::RebuildMode::Verify)
        .await
        .unwrap();
    assert!(report.matches(), "{:#?}", report.diffs);
}

#[tokio::test]
async fn bad_tokens_get_401_codes() {
    let server = TestServer::start().await;
    let org_id = server
        .org_client()
        .whoami()
        .await
        .unwrap()
        .token
        .org_id
        .unwrap();

    let mut tx = server.store.begin().await.unwrap();
    let past = kiln_control::store::now() - time::Duration::hours(1);
    let expired = kiln_control::api::tokens::issue(
        &mut tx,
        &kiln_control::store::streams::org(org_id),
        TokenKind::Org,
        Some(org_id),
        None,
        "old",
        Some(past),
        "t",
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let revoked = server
        .org_client()
        .create_token(
            &server.org,
            &kiln_api::types::CreateToken {
                name: "revoke-me".into(),
                expires_in_secs: None,
            },
        )
        .await
        .unwrap();
    server
        .org_client()
        .revoke_token(&server.org, revoked.token.id)
        .await
        .unwrap();

    let mut wrong_secret = revoked.secret.clone();
    wrong_secret.pop();
    wrong_secret.push(if revoked.secret.ends_with('A') {
        'B'
    } else {
        'A'
    });
    let unknown_id = kiln_control::auth::generate(kiln_core::TokenId::new()).text;

    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "unauthenticated"),
        ("garbage", Some("hello".into()), "unauthenticated"),
        ("unknown id", Some(unknown_id), "unauthenticated"),
        ("expired", Some(expired.secret), "token_expired"),
        ("revoked", Some(revoked.secret), "token_revoked"),
    ];
    for (name, token, code) in cases {
        let (status, body) = server
            .raw("GET", "/v1/orgs/acme/apps", token.as_deref(), None)
            .await;
        assert_eq!(status, 401, "{name}: {body}");
        assert_eq!(body["code"], code, "{name}: {body}");
    }

    // A right id with a wrong secret is as unknown as a wrong id.
    let new = server
        .org_client()
        .create_token(
            &server.org,
            &kiln_api::types::CreateToken {
                name: "fresh".into(),
                expires_in_secs: Some(3600),
            },
        )
        .await
        .unwrap();
    let mut tampered = new.secret.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let (status, body) = server
        .raw("GET", "/v1/orgs/acme/apps", Some(&tampered), None)
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "unauthenticated");
    let (status, _) = server
        .raw("GET", "/v1/orgs/acme/apps", Some(&new.secret), None)
        .await;
    assert_eq!(status, 200);
    let _ = wrong_secret;
}

#[tokio::test]
async fn idempotency_key_replays_and_rejects_reuse() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    let send = |body: &'static str| {
        http.post(format!("{}/v1/orgs/acme/apps", server.base_url))
            .bearer_auth(&server.org_token)
            .header("idempotency-key", "key-1")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    let first = send(r#"{"name": "once"}"#).await.unwrap();
    assert_eq!(first.status().as_u16(), 201);
    let first: serde_json::Value = first.json().await.unwrap();

    let replay = send(r#"{"name": "once"}"#).await.unwrap();
    assert_eq!(replay.status().as_u16(), 201);
    assert_eq!(replay.headers().get("idempotent-replay").unwrap(), "true");
    let replay: serde_json::Value = replay.json().await.unwrap();
    assert_eq!(replay, first);

    let apps = server.org_client().list_apps(&server.org).await.unwrap();
    assert_eq!(apps.items.len(), 1);

    let reused = send(r#"{"name": "other"}"#).await.unwrap();
    assert_eq!(reused.status().as_u16(), 422);
    let reused: serde_json::Value = reused.json().await.unwrap();
    assert_eq!(reused["code"], "idempotency_key_reused");
}

#[tokio::test]
async fn nul_in_body_gets_invalid_value() {
    let server = TestServer::start().await;
    harness::create_app_and_env(&server).await;
    let env = "/v1/orgs/acme/apps/web/envs/prod";
    let digest = format!("sha256:{}", "ab".repeat(32));
    let release = |description: &str, env_vars: &str| {
        format!(
            r#"{{"image": {{"reference": "r/x:1", "digest": "{digest}"}}, "description": "{description}", "spec": {{"processes": {{"web": {{"count": 1, "vcpus": 1, "memory_mib": 256}}}}, "env": {env_vars}}}}}"#
        )
    };
    let cases = [
        (
            "PATCH",
            format!("{env}/config"),
            r#"{"set": {"FOO": "a\u0000b"}}"#.to_owned(),
            "set.FOO",
        ),
        (
            "POST",
            format!("{env}/releases"),
            release(r"x\u0000y", "{}"),
            "description",
        ),
        (
            "POST",
            format!("{env}/releases"),
            release("ok", r#"{"K": "a\u0000b"}"#),
            "spec.env.K",
        ),
        (
            "PUT",
            format!("{env}/secrets/TOKEN"),
            r#"{"value": "\u0000"}"#.to_owned(),
            "value",
        ),
    ];
    for (method, path, body, field) in cases {
        let (status, body) = server
            .raw(
                method,
                &path,
                Some(&server.org_token),
                Some(body.into_bytes()),
            )
            .await;
        assert_eq!(status, 400, "{path} {field}: {body}");
        assert_eq!(body["code"], "invalid_value", "{path} {field}: {body}");
        assert_eq!(body["details"]["field"], field, "{path}: {body}");
    }

    let report = server
        .store
        .rebuild_projections(kiln_control::store::rebuild::RebuildMode::Verify)
        .await
        .unwrap();
    assert!(report.matches(), "{:#?}", report.diffs);
}

#[tokio::test]
async fn query_errors_name_parameter() {
    let server = TestServer::start().await;
    harness::create_app_and_env(&server).await;
    let env = "/v1/orgs/acme/apps/web/envs/prod";
    let cases = [
        (format!("{env}/logs?since=yesterday"), "since"),
        ("/v1/orgs/acme/events?wait=soon".to_owned(), "wait"),
        ("/v1/orgs/acme/events?colour=red".to_owned(), "colour"),
        ("/v1/orgs/acme/events?wait=1&wait=2".to_owned(), "wait"),
    ];
    for (path, parameter) in cases {
        let (status, body) = server
            .raw("GET", &path, Some(&server.org_token), None)
            .await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["code"], "invalid_value", "{path}: {body}");
        assert_eq!(body["details"]["field"], parameter, "{path}: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(parameter), "{path}: {body}");
    }
}

#[tokio::test]
async fn scale_rejects_unknown_process() {
    let server = TestServer::start().await;
    harness::create_app_and_env(&server).await;
    let client = server.org_client();
    let path = harness::env_path(&server.org);
    let scale = format!("{}/scale", "/v1/orgs/acme/apps/web/envs/prod");
    let body = || Some(br#"{"counts": {"nosuchproc": 5}}"#.to_vec());

    let (status, response) = server
        .raw("PUT", &scale, Some(&server.org_token), body())
        .await;
    assert_eq!(status, 400, "{response}");
    assert_eq!(response["code"], "invalid_value", "{response}");
    assert!(
        response["message"].as_str().unwrap().contains("no release"),
        "{response}"
    );

    client
        .create_deploy(
            &path,
            &kiln_api::types::CreateDeploy {
                target: kiln_api::types::DeployTarget::NewRelease(Box::new(
                    kiln_api::types::CreateRelease {
                        image: harness::image(),
                        spec: harness::release_spec(),
                        description: String::new(),
                    },
                )),
                strategy: None,
            },
        )
        .await
        .unwrap();
    let (status, response) = server
        .raw("PUT", &scale, Some(&server.org_token), body())
        .await;
    assert_eq!(status, 400, "{response}");
    assert_eq!(response["code"], "invalid_value", "{response}");
    assert_eq!(
        response["details"]["field"], "counts.nosuchproc",
        "{response}"
    );
    let message = response["message"].as_str().unwrap();
    assert!(message.contains("nosuchproc"), "{response}");
    assert!(message.contains("web"), "{response}");

    let (status, response) = server
        .raw(
            "PUT",
            &scale,
            Some(&server.org_token),
            Some(br#"{"counts": {"web": 2}}"#.to_vec()),
        )
        .await;
    assert_eq!(status, 200, "{response}");
}

#[tokio::test]
async fn cursor_past_head_rejected() {
    let server = TestServer::start().await;
    harness::create_app_and_env(&server).await;
    let env = "/v1/orgs/acme/apps/web/envs/prod";
    for path in [
        "/v1/orgs/acme/events?after=18446744073709551615".to_owned(),
        format!("{env}/logs?after=18446744073709551615"),
        format!("{env}/logs?after=1"),
    ] {
        let (status, body) = server
            .raw("GET", &path, Some(&server.org_token), None)
            .await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["code"], "invalid_value", "{path}: {body}");
        assert_eq!(body["details"]["field"], "after", "{path}: {body}");
        assert!(body["details"]["head"].is_u64(), "{path}: {body}");
    }

    let head = server.store.head().await.unwrap();
    let (status, body) = server
        .raw(
            "GET",
            &format!("/v1/orgs/acme/events?after={head}"),
            Some(&server.org_token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["cursor"], head, "{body}");
}
