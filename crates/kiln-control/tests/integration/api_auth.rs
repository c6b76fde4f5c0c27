//! Every endpoint, called with a token that may not reach the resource, answers 403 or 404,
//! and the answer is the same whether or not the resource exists.

use kiln_api::routes::{Access, ROUTES, fill};
use kiln_api::types::*;

use crate::api_resources::{place_instance, register_host};
use crate::harness::{self, TestServer};

/// A valid body for each endpoint that takes one, so authorization, not validation, decides.
fn body_for(operation: &str, digest: &str) -> Option<String> {
    let release = format!(
        r#"{{"image": {{"reference": "r/x:1", "digest": "{digest}"}}, "spec": {{"processes": {{"web": {{"count": 1, "vcpus": 1, "memory_mib": 256}}}}}}}}"#
    );
    let body = match operation {
        "create_org" => r#"{"name": "intruder"}"#.to_owned(),
        "create_token" => r#"{"name": "t"}"#.to_owned(),
        "create_app" | "create_env" => r#"{"name": "other"}"#.to_owned(),
        "scale_env" => r#"{"counts": {"web": 1}}"#.to_owned(),
        "update_config" => r#"{"set": {"A": "b"}}"#.to_owned(),
        "set_secret" => r#"{"value": "v"}"#.to_owned(),
        "create_release" => release,
        "create_deploy" | "create_plan" => r#"{"target": {"release_version": 1}}"#.to_owned(),
        "apply_plan" | "restart_env" => "{}".to_owned(),
        "create_host" => r#"{"name": "intruder"}"#.to_owned(),
        "create_ingress_token" => r#"{"name": "intruder"}"#.to_owned(),
        "register_host" => r#"{"capacity": {"vcpus": 1, "memory_mib": 1024}, "driver": "qemu", "overlay_public_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "overlay_endpoint": "127.0.0.1:1"}"#.to_owned(),
        "heartbeat" => "{}".to_owned(),
        "allocate_ip" => r#"{"version": "ipv4"}"#.to_owned(),
        "report_instance_state" => r#"{"state": "healthy"}"#.to_owned(),
        "report_instance_states" => r#"{"reports": []}"#.to_owned(),
        "ship_logs" => r#"{"lines": []}"#.to_owned(),
        _ => return None,
    };
    Some(body)
}

struct Fixture {
    server: TestServer,
    values: Vec<(&'static str, String)>,
    ghost_values: Vec<(&'static str, String)>,
    other_org_token: String,
    host_token: String,
    other_host_token: String,
    ingress_token: String,
}

async fn fixture() -> Fixture {
    let server = TestServer::start().await;
    let client = server.org_client();
    let env = harness::create_app_and_env(&server).await;
    let path = harness::env_path(&server.org);
    client
        .set_secret(&path, "SECRET", &SetSecret { value: "v".into() })
        .await
        .unwrap();
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
    let deploy = client
        .create_deploy(
            &path,
            &CreateDeploy {
                target: DeployTarget::ReleaseVersion(1),
                strategy: None,
            },
        )
        .await
        .unwrap();
    let token = client
        .create_token(
            &server.org,
            &CreateToken {
                name: "victim".into(),
                expires_in_secs: None,
            },
        )
        .await
        .unwrap();

    let created = server
        .operator()
        .create_host(&CreateHost {
            name: "victim-host".into(),
        })
        .await
        .unwrap();
    let host = register_host(&server, "h1").await;
    let instance = place_instance(&server, &env, &release, &host.host, 30).await;
    let other_host = register_host(&server, "h2").await;
    let (_, other_org_token) = server.other_org("mallory").await;
    let ingress = server
        .operator()
        .create_ingress_token(&CreateIngressToken {
            name: "edge".into(),
        })
        .await
        .unwrap();

    let other_host_token = server
        .operator()
        .create_host(&CreateHost { name: "h3".into() })
        .await
        .unwrap()
        .token
        .secret;
    let _ = other_host;
    let host_secret = {
        // The token of h1, recovered by creating h1's client above: re-issue for raw calls.
        let mut tx = server.store.begin().await.unwrap();
        let token = kiln_control::api::tokens::issue(
            &mut tx,
            &kiln_control::store::streams::host(host.host.id),
            TokenKind::Host,
            None,
            Some(host.host.id),
            "h1-raw",
            None,
            "t",
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        token.secret
    };

    let values = vec![
        ("org", "acme".to_owned()),
        ("app", "web".to_owned()),
        ("env", "prod".to_owned()),
        ("token", token.token.id.to_string()),
        ("name", "SECRET".to_owned()),
        ("version", release.version.to_string()),
        ("deploy", deploy.deploy.id.to_string()),
        // No host runs here, so no plan can be made; a well-formed id is enough to check access.
        (
            "plan",
            kiln_api::PlanId::from_uuid(uuid::Uuid::now_v7()).to_string(),
        ),
        ("host", created.host.name.clone()),
        ("instance", instance.to_string()),
        ("address", "192.0.2.1".to_owned()),
    ];
    let ghost_values = vec![
        ("org", "ghost".to_owned()),
        ("app", "nothing".to_owned()),
        ("env", "nowhere".to_owned()),
        ("token", kiln_core::TokenId::new().to_string()),
        ("name", "MISSING".to_owned()),
        ("version", "99".to_owned()),
        ("deploy", kiln_core::DeployId::new().to_string()),
        (
            "plan",
            kiln_api::PlanId::from_uuid(uuid::Uuid::now_v7()).to_string(),
        ),
        ("host", "no-such-host".to_owned()),
        ("instance", kiln_core::InstanceId::new().to_string()),
        ("address", "192.0.2.1".to_owned()),
    ];
    Fixture {
        server,
        values,
        ghost_values,
        other_org_token,
        host_token: host_secret,
        other_host_token,
        ingress_token: ingress.secret,
    }
}

fn path_for(template: &str, values: &[(&'static str, String)]) -> String {
    let names: Vec<&str> = template
        .split('/')
        .filter_map(|segment| {
            segment
                .strip_prefix('{')
                .and_then(|rest| rest.strip_suffix('}'))
        })
        .collect();
    let filled: Vec<&str> = names
        .iter()
        .map(|name| {
            values
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
                .unwrap()
        })
        .collect();
    fill(template, &filled)
}

async fn assert_denied(
    fixture: &Fixture,
    token: &str,
    label: &str,
    min_checked: usize,
    skip: impl Fn(Access) -> bool,
) {
    let digest = format!("sha256:{}", "cd".repeat(32));
    let mut checked = 0;
    for route in ROUTES {
        if route.access == Access::Public || route.access == Access::AnyToken || skip(route.access)
        {
            continue;
        }
        let body = body_for(route.operation, &digest).map(String::into_bytes);
        let real = path_for(route.path, &fixture.values);
        let ghost = path_for(route.path, &fixture.ghost_values);
        let (status, response) = fixture
            .server
            .raw(route.method, &real, Some(token), body.clone())
            .await;
        let (ghost_status, ghost_response) = fixture
            .server
            .raw(route.method, &ghost, Some(token), body)
            .await;

        // Listing orgs is allowed for org tokens but shows only their own org.
        if route.operation == "list_orgs" && status == 200 {
            assert!(
                !response.to_string().contains("\"acme\""),
                "{label} {}: {response}",
                route.operation
            );
            continue;
        }
        assert!(
            status == 403 || status == 404,
            "{label} {} {}: {status} {response}",
            route.method,
            real
        );
        assert_eq!(
            status, ghost_status,
            "{label} {}: existing and missing differ: {response} vs {ghost_response}",
            route.operation
        );
        assert_eq!(
            response["code"], ghost_response["code"],
            "{label} {}",
            route.operation
        );
        checked += 1;
    }
    assert!(
        checked >= min_checked,
        "{label}: only {checked} endpoints checked"
    );
}

#[tokio::test]
async fn other_org_token_reaches_nothing() {
    let fixture = fixture().await;
    assert_denied(
        &fixture,
        &fixture.other_org_token.clone(),
        "other org",
        40,
        |_| false,
    )
    .await;
}

#[tokio::test]
async fn host_token_reaches_only_its_host() {
    let fixture = fixture().await;
    assert_denied(
        &fixture,
        &fixture.host_token.clone(),
        "host token",
        35,
        |access| access == Access::Host,
    )
    .await;

    // Another host's token reaches none of this host's instances.
    let instance = &fixture
        .values
        .iter()
        .find(|(key, _)| *key == "instance")
        .unwrap()
        .1;
    for (method, template, body) in [
        (
            "POST",
            kiln_api::routes::HOST_SELF_INSTANCE_STATE,
            Some(r#"{"state": "failed"}"#),
        ),
        ("GET", kiln_api::routes::HOST_SELF_INSTANCE_SECRETS, None),
    ] {
        let path = fill(template, &[instance]);
        let (status, response) = fixture
            .server
            .raw(
                method,
                &path,
                Some(&fixture.other_host_token),
                body.map(|body| body.as_bytes().to_vec()),
            )
            .await;
        assert_eq!(status, 404, "{path}: {response}");
    }
    let (status, response) = fixture
        .server
        .raw(
            "GET",
            &fill(kiln_api::routes::HOST_SELF_INSTANCE_SECRETS, &[instance]),
            Some(&fixture.host_token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{response}");
}

#[tokio::test]
async fn ingress_token_reads_routes_only() {
    let fixture = fixture().await;
    assert_denied(
        &fixture,
        &fixture.ingress_token.clone(),
        "ingress token",
        40,
        |access| access == Access::Ingress,
    )
    .await;
}

#[tokio::test]
async fn org_token_cannot_use_operator_or_host_endpoints() {
    let fixture = fixture().await;
    let token = fixture.server.org_token.clone();
    assert_denied(&fixture, &token, "own org token", 15, |access| {
        matches!(access, Access::Org | Access::OperatorOrOrg)
    })
    .await;
}

#[tokio::test]
async fn wrong_token_kind_is_forbidden() {
    let server = TestServer::start().await;
    harness::create_app_and_env(&server).await;
    let (_, other_org_token) = server.other_org("mallory").await;
    for org in ["acme", "ghost"] {
        for path in [
            format!("/v1/orgs/{org}/apps"),
            format!("/v1/orgs/{org}/apps/web/envs/prod"),
            format!("/v1/orgs/{org}/events"),
        ] {
            let (status, body) = server
                .raw("GET", &path, Some(&server.operator_token), None)
                .await;
            assert_eq!(status, 403, "operator {path}: {body}");
            assert_eq!(body["code"], "forbidden", "operator {path}: {body}");

            let (status, body) = server.raw("GET", &path, Some(&other_org_token), None).await;
            assert_eq!(status, 404, "other org {path}: {body}");
            assert_eq!(
                body["message"],
                format!("org {org} not found"),
                "other org {path}"
            );
        }
    }
}

#[tokio::test]
async fn operator_creates_first_org_token() {
    let server = TestServer::start().await;
    let operator = server.operator();
    let org = kiln_core::OrgName::new("co").unwrap();
    operator
        .create_org(&CreateOrg { name: org.clone() })
        .await
        .unwrap();
    let created = operator
        .create_token(
            &org,
            &CreateToken {
                name: "admin".into(),
                expires_in_secs: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(created.token.kind, TokenKind::Org);

    let admin = server.client(&created.secret);
    let whoami = admin.whoami().await.unwrap();
    assert_eq!(whoami.org_name.as_deref(), Some("co"));
    admin
        .create_app(
            &org,
            &CreateApp {
                name: kiln_core::AppName::new("web").unwrap(),
            },
        )
        .await
        .unwrap();

    let missing = operator
        .create_token(
            &kiln_core::OrgName::new("ghost").unwrap(),
            &CreateToken {
                name: "admin".into(),
                expires_in_secs: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Some(kiln_api::ErrorCode::NotFound));
}

#[tokio::test]
async fn revoked_token_refused_on_next_request() {
    let server = TestServer::start().await;
    let created = server
        .org_client()
        .create_token(
            &server.org,
            &CreateToken {
                name: "short-lived".into(),
                expires_in_secs: None,
            },
        )
        .await
        .unwrap();
    let client = server.client(&created.secret);
    let whoami = client.whoami().await.unwrap();
    assert_eq!(whoami.token.id, created.token.id);

    server
        .org_client()
        .revoke_token(&server.org, created.token.id)
        .await
        .unwrap();
    let error = client.whoami().await.unwrap_err();
    assert_eq!(error.code(), Some(kiln_api::ErrorCode::TokenRevoked));

    // A mutation is refused the same way, and changes nothing.
    let path = harness::env_path(&server.org);
    harness::create_app_and_env(&server).await;
    let mut update = UpdateConfig::default();
    update.set.insert("A".into(), "b".into());
    let error = client.update_config(&path, &update).await.unwrap_err();
    assert_eq!(error.code(), Some(kiln_api::ErrorCode::TokenRevoked));
    let config = server.org_client().get_config(&path).await.unwrap();
    assert_eq!(config.version, 0);
}
