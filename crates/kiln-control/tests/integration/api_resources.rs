//! The resource endpoints end to end: org, app, env, config, secrets, releases, deploys,
//! hosts, the host agent's endpoints and the ingress route table.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use kiln_api::types::*;
use kiln_api::{Event, InstanceState};
use kiln_control::store::{ExpectedVersion, NewEvent, streams};
use kiln_core::{AppName, EnvName, InstanceId, ProcessName};

use crate::harness::{self, TestServer};

/// A host created by the operator and registered by its agent.
pub(crate) struct RegisteredHost {
    pub(crate) host: Host,
    pub(crate) client: kiln_api::Client,
    pub(crate) token: String,
}

/// Returns the registration every test host sends: 4 vCPUs, 8 GiB, QEMU.
pub(crate) fn registration() -> RegisterHost {
    RegisterHost {
        capacity: HostCapacity {
            vcpus: 4,
            memory_mib: 8192,
        },
        driver: VmmDriver::Qemu,
        overlay_public_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
        overlay_endpoint: "127.0.0.1:51820".parse().unwrap(),
    }
}

pub(crate) async fn register_host(server: &TestServer, name: &str) -> RegisteredHost {
    let created = server
        .operator()
        .create_host(&CreateHost { name: name.into() })
        .await
        .unwrap();
    let client = server.client(&created.token.secret);
    let lease = client.register_host(&registration()).await.unwrap();
    RegisteredHost {
        host: lease.host,
        client,
        token: created.token.secret,
    }
}

/// Places an instance the way the scheduler does: an `InstancePlaced` event.
pub(crate) async fn place_instance(
    server: &TestServer,
    env: &Env,
    release: &Release,
    host: &Host,
    last_octet: u8,
) -> InstanceId {
    place_named_instance(server, env, release, host, last_octet, "web").await
}

/// Places an instance of process type `process`.
pub(crate) async fn place_named_instance(
    server: &TestServer,
    env: &Env,
    release: &Release,
    host: &Host,
    last_octet: u8,
    process: &str,
) -> InstanceId {
    let instance_id = InstanceId::new();
    let event = Event::InstancePlaced {
        instance_id,
        env_id: env.id,
        release_id: release.id,
        process: ProcessName::new(process).unwrap(),
        host_id: host.id,
        ipv6: Ipv6Addr::new(0xfd12, 0x3456, 0x789a, 1, 0, 0, 0, u16::from(last_octet)),
        ipv4: Ipv4Addr::new(100, 64, 0, last_octet),
    };
    server
        .store
        .append(
            &streams::instance(instance_id),
            ExpectedVersion::Any,
            vec![NewEvent::org(env.org_id, event)],
            "system:scheduler",
        )
        .await
        .unwrap();
    instance_id
}

#[tokio::test]
async fn environment_lifecycle() {
    let server = TestServer::start().await;
    let client = server.org_client();
    let env = harness::create_app_and_env(&server).await;
    let path = harness::env_path(&server.org);

    assert_eq!(env.hostname.as_str(), "prod.web.acme.apps.kiln.test");
    assert!(
        env.ipv6_address
            .to_string()
            .starts_with("fd12:3456:789a:0:"),
        "{}",
        env.ipv6_address
    );
    let listed = client.list_envs(&server.org, &path.app).await.unwrap();
    assert_eq!(listed.items, vec![env.clone()]);

    let duplicate = client
        .create_env(
            &server.org,
            &path.app,
            &CreateEnv {
                name: path.env.clone(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(duplicate.code(), Some(kiln_api::ErrorCode::AlreadyExists));

    let mut update = UpdateConfig::default();
    update.set.insert("LOG_LEVEL".into(), "debug".into());
    update.set.insert("REGION".into(), "eu".into());
    let config = client.update_config(&path, &update).await.unwrap();
    assert_eq!(config.version, 1);
    let config = client
        .update_config(
            &path,
            &UpdateConfig {
                set: Default::default(),
                unset: vec!["REGION".into()],
            },
        )
        .await
        .unwrap();
    assert_eq!(config.version, 2);
    assert_eq!(config.vars.keys().collect::<Vec<_>>(), vec!["LOG_LEVEL"]);

    let release = client
        .create_release(
            &path,
            &CreateRelease {
                image: harness::image(),
                spec: harness::release_spec(),
                description: "first".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(release.version, 1);
    assert_eq!(release.config_version, 2);
    let shown = client.get_release(&path, 1).await.unwrap();
    assert_eq!(shown, release);

    let created = client
        .create_deploy(
            &path,
            &CreateDeploy {
                target: DeployTarget::NewRelease(Box::new(CreateRelease {
                    image: harness::image(),
                    spec: harness::release_spec(),
                    description: "second".into(),
                })),
                strategy: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(created.release.version, 2);
    assert_eq!(created.deploy.state, DeployState::Pending);
    assert_eq!(created.deploy.previous_release_id, None);
    let events = client
        .org_events(
            &server.org,
            &kiln_api::events::EventQuery {
                after: Some(created.cursor),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let types: Vec<&str> = events
        .events
        .iter()
        .map(|event| event.event.type_name())
        .collect();
    assert_eq!(
        types,
        vec!["ReleaseCreated", "DeployRequested", "EnvReleaseChanged"]
    );

    let rollback = client
        .create_deploy(
            &path,
            &CreateDeploy {
                target: DeployTarget::ReleaseVersion(1),
                strategy: Some(DeployStrategy::Immediate),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        rollback.deploy.previous_release_id,
        Some(created.release.id)
    );
    // A rollback is a new release that repeats v1's image and names it.
    assert_eq!(rollback.release.version, 3);
    assert_eq!(rollback.release.rollback_of, Some(release.id));
    assert_eq!(rollback.release.image, release.image);
    assert_eq!(
        client.get_env(&path).await.unwrap().current_release_id,
        Some(rollback.release.id)
    );
    assert_eq!(client.list_deploys(&path).await.unwrap().items.len(), 2);
    assert_eq!(
        client
            .get_deploy(&path, rollback.deploy.id)
            .await
            .unwrap()
            .strategy,
        DeployStrategy::Immediate
    );

    let plan = client
        .create_plan(
            &path,
            &CreatePlan {
                target: DeployTarget::ReleaseVersion(1),
                strategy: None,
            },
        )
        .await
        .unwrap_err();
    // The rollback deploy has not finished (no orchestrator runs here), so no plan is made.
    assert_eq!(plan.code(), Some(kiln_api::ErrorCode::FailedPrecondition));

    let mut counts = std::collections::BTreeMap::new();
    counts.insert(ProcessName::new("web").unwrap(), 3);
    assert_eq!(
        client
            .scale_env(&path, &ScaleEnv { counts })
            .await
            .unwrap()
            .scale[&ProcessName::new("web").unwrap()],
        3
    );

    let blocked = client.delete_app(&server.org, &path.app).await.unwrap_err();
    assert_eq!(
        blocked.code(),
        Some(kiln_api::ErrorCode::FailedPrecondition)
    );
    client.delete_env(&path).await.unwrap();
    assert_eq!(
        client.get_env(&path).await.unwrap_err().code(),
        Some(kiln_api::ErrorCode::NotFound)
    );
    client.delete_app(&server.org, &path.app).await.unwrap();

    let report = server
        .store
        .rebuild_projections(kiln_control::store::rebuild::RebuildMode::Verify)
        .await
        .unwrap();
    assert!(report.matches(), "{:#?}", report.diffs);
}

#[tokio::test]
async fn host_agent_flow() {
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
    let mut update = UpdateConfig::default();
    update.set.insert("MODE".into(), "override".into());
    client.update_config(&path, &update).await.unwrap();

    let first = register_host(&server, "h1").await;
    let second = register_host(&server, "h2").await;
    assert_eq!(
        first.host.ipv6_prefix.as_deref(),
        Some("fd12:3456:789a:1::/64")
    );
    assert_eq!(
        second.host.ipv6_prefix.as_deref(),
        Some("fd12:3456:789a:2::/64")
    );
    assert_eq!(first.host.state, HostState::Ready);
    let lease = second
        .client
        .heartbeat(&Heartbeat {
            running_instances: 0,
        })
        .await
        .unwrap();
    assert_eq!(lease.peers.len(), 1);
    assert_eq!(lease.peers[0].host_id, first.host.id);
    assert_eq!(lease.cluster_prefix, "fd12:3456:789a::/48");

    let initial = first
        .client
        .watch_assignments(&AssignmentsQuery::default())
        .await
        .unwrap();
    assert!(initial.assignments.is_empty());

    let instance = place_instance(&server, &env, &release, &first.host, 10).await;
    let changed = first
        .client
        .watch_assignments(&AssignmentsQuery {
            after: Some(initial.cursor),
            wait: Some(30),
            ..AssignmentsQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(changed.assignments.len(), 1);
    let assignment = &changed.assignments[0];
    assert_eq!(assignment.instance_id, instance);
    assert_eq!(assignment.org.as_str(), "acme");
    assert_eq!(assignment.app.as_str(), "web");
    assert_eq!(assignment.env.as_str(), "prod");
    assert_eq!(assignment.image.digest, harness::image().digest);
    assert_eq!(assignment.command, vec!["/bin/server".to_owned()]);
    assert_eq!(assignment.env_vars["MODE"], "override");
    assert_eq!(assignment.memory_mib, 256);
    assert_eq!(assignment.ports[0].port, 8080);
    assert_eq!(assignment.network.ipv6_prefix, "fd12:3456:789a:1::/64");
    assert_eq!(assignment.desired, DesiredState::Running);

    let other_view = second
        .client
        .watch_assignments(&AssignmentsQuery::default())
        .await
        .unwrap();
    assert!(other_view.assignments.is_empty());

    let reported = first
        .client
        .report_instance_state(
            instance,
            &ReportInstanceState {
                state: InstanceState::Healthy,
                detail: None,
                exit_code: None,
                output: Vec::new(),
            },
        )
        .await
        .unwrap();
    assert_eq!(reported.state, InstanceState::Healthy);
    let stolen = second
        .client
        .report_instance_state(
            instance,
            &ReportInstanceState {
                state: InstanceState::Failed,
                detail: None,
                exit_code: None,
                output: Vec::new(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(stolen.code(), Some(kiln_api::ErrorCode::NotFound));

    let line = LogLine {
        instance_id: instance,
        stream: LogStream::Stdout,
        time: kiln_control::store::now(),
        line: "hello from web".into(),
    };
    first
        .client
        .ship_logs(&LogBatch {
            lines: vec![
                line.clone(),
                LogLine {
                    line: "nul\0byte".into(),
                    ..line.clone()
                },
            ],
        })
        .await
        .unwrap();
    let foreign = second
        .client
        .ship_logs(&LogBatch { lines: vec![line] })
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Some(kiln_api::ErrorCode::NotFound));
    let logs = client.logs(&path, &LogQuery::default()).await.unwrap();
    assert_eq!(logs.entries.len(), 2);
    assert_eq!(logs.entries[0].line, "hello from web");
    // PostgreSQL text cannot store NUL, so log batches get U+FFFD in its place.
    assert_eq!(logs.entries[1].line, "nul\u{FFFD}byte");
    let filtered = client
        .logs(
            &path,
            &LogQuery {
                process: Some(ProcessName::new("worker").unwrap()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(filtered.entries.is_empty());

    let instances = client.list_instances(&path).await.unwrap();
    assert_eq!(instances.items.len(), 1);
    let addresses = client.list_addresses(&path).await.unwrap();
    assert_eq!(addresses.items.len(), 3);

    // Routes: the orchestrator publishes them as events; the ingress reads the table.
    let route = Route {
        env_id: env.id,
        service: "http".into(),
        matcher: RouteMatch::Sni {
            hostname: env.hostname.clone(),
        },
        protocol: ServiceProtocol::Tls,
        proxy_protocol: false,
        backends: vec![RouteBackend {
            instance_id: instance,
            address: assignment.network.ipv6,
            port: 8080,
        }],
    };
    let ingress_token = server
        .operator()
        .create_ingress_token(&CreateIngressToken {
            name: "edge".into(),
        })
        .await
        .unwrap();
    let ingress = server.client(&ingress_token.secret);
    let table = ingress.watch_routes(&WatchQuery::default()).await.unwrap();
    assert!(table.routes.is_empty());
    server
        .store
        .append(
            &streams::env(env.id),
            ExpectedVersion::Any,
            vec![NewEvent::org(
                env.org_id,
                Event::RoutesChanged {
                    env_id: env.id,
                    routes: vec![route.clone()],
                },
            )],
            "system:orchestrator",
        )
        .await
        .unwrap();
    let table = ingress
        .watch_routes(&WatchQuery {
            after: Some(table.cursor),
            wait: Some(30),
        })
        .await
        .unwrap();
    assert_eq!(table.routes, vec![route]);
    assert_eq!(
        ingress.list_apps(&server.org).await.unwrap_err().code(),
        Some(kiln_api::ErrorCode::Forbidden)
    );

    let operator = server.operator();
    assert_eq!(
        operator.cordon_host("h1").await.unwrap().state,
        HostState::Cordoned
    );
    assert_eq!(
        operator.cordon_host("h1").await.unwrap().state,
        HostState::Cordoned
    );
    assert_eq!(
        operator.uncordon_host("h1").await.unwrap().state,
        HostState::Ready
    );
    assert_eq!(
        operator.drain_host("h1").await.unwrap().state,
        HostState::Draining
    );
    assert_eq!(operator.list_hosts().await.unwrap().items.len(), 2);

    let report = server
        .store
        .rebuild_projections(kiln_control::store::rebuild::RebuildMode::Verify)
        .await
        .unwrap();
    assert!(report.matches(), "{:#?}", report.diffs);
}

#[tokio::test]
async fn platform_hostnames_never_collide() {
    let server = TestServer::start().await;
    let mut hostnames = Vec::new();
    for (org, env) in [("co", "prod-shop"), ("shop-co", "prod")] {
        let (org, token) = server.other_org(org).await;
        let client = server.client(&token);
        client
            .create_app(
                &org,
                &CreateApp {
                    name: AppName::new("web").unwrap(),
                },
            )
            .await
            .unwrap();
        let created = client
            .create_env(
                &org,
                &AppName::new("web").unwrap(),
                &CreateEnv {
                    name: EnvName::new(env).unwrap(),
                },
            )
            .await
            .unwrap();
        hostnames.push(created.hostname.as_str().to_owned());
    }
    assert_eq!(
        hostnames,
        vec![
            "prod-shop.web.co.apps.kiln.test".to_owned(),
            "prod.web.shop-co.apps.kiln.test".to_owned(),
        ]
    );
}

#[tokio::test]
async fn config_patch_answers_what_get_reads() {
    let server = TestServer::start().await;
    let client = server.org_client();
    harness::create_app_and_env(&server).await;
    let path = harness::env_path(&server.org);

    let values = [
        "'; DROP TABLE events; --",
        "$$ $kiln$ $1",
        r"\ \\ E'\n' \u0000",
        "ünïcödé 🔥 \"quoted\"",
    ];
    let mut update = UpdateConfig::default();
    for (index, value) in values.iter().enumerate() {
        update.set.insert(format!("V{index}"), (*value).to_owned());
    }
    let first = client.update_config(&path, &update).await.unwrap();
    assert_eq!(first.version, 1);
    assert_eq!(first, client.get_config(&path).await.unwrap());

    // A change to the environment's stream that is not a config change (a secret) moves the
    // stream version; the next PATCH must still append and answer the config it produced.
    client
        .set_secret(
            &path,
            "TOKEN",
            &kiln_api::types::SetSecret {
                value: "s3cr3t".into(),
            },
        )
        .await
        .unwrap();
    let second = client
        .update_config(
            &path,
            &UpdateConfig {
                set: BTreeMap::from([("V0".to_owned(), "replaced".to_owned())]),
                unset: vec!["V1".into()],
            },
        )
        .await
        .unwrap();
    assert_eq!(second.version, 2);
    assert_eq!(second.vars["V0"], "replaced");
    assert!(!second.vars.contains_key("V1"));
    assert_eq!(second.vars["V2"], values[2]);
    assert_eq!(second, client.get_config(&path).await.unwrap());
}

#[tokio::test]
async fn process_stop_settings_reach_assignments() {
    let server = TestServer::start().await;
    let client = server.org_client();
    let env = harness::create_app_and_env(&server).await;
    let path = harness::env_path(&server.org);
    let spec = |worker_signal: &str| -> ReleaseSpec {
        serde_json::from_value(serde_json::json!({
            "processes": {
                "web": {"count": 1, "vcpus": 1, "memory_mib": 256},
                "worker": {"count": 1, "vcpus": 1, "memory_mib": 256,
                           "kill_signal": worker_signal, "kill_timeout_secs": 90},
            },
            "kill_signal": "SIGTERM",
            "kill_timeout_secs": 10,
        }))
        .unwrap()
    };

    // A process type's signal is checked like the release's.
    let error = client
        .create_release(
            &path,
            &CreateRelease {
                image: harness::image(),
                spec: spec("sigquit"),
                description: String::new(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(kiln_api::ErrorCode::InvalidValue));
    assert!(error.to_string().contains("sigquit"), "{error}");
    assert!(
        error
            .to_string()
            .contains("spec.processes.worker.kill_signal"),
        "{error}"
    );

    let release = client
        .create_release(
            &path,
            &CreateRelease {
                image: harness::image(),
                spec: spec("SIGQUIT"),
                description: String::new(),
            },
        )
        .await
        .unwrap();
    let host = register_host(&server, "h1").await;
    let web = place_instance(&server, &env, &release, &host.host, 50).await;
    let worker = place_named_instance(&server, &env, &release, &host.host, 51, "worker").await;
    let assignments = host
        .client
        .watch_assignments(&AssignmentsQuery::default())
        .await
        .unwrap()
        .assignments;
    let stop = |instance| {
        assignments
            .iter()
            .find(|assignment| assignment.instance_id == instance)
            .map(|assignment| (assignment.kill_signal.clone(), assignment.kill_timeout_secs))
    };

    assert_eq!(stop(web), Some(("SIGTERM".to_owned(), 10)));
    assert_eq!(stop(worker), Some(("SIGQUIT".to_owned(), 90)));
}

#[tokio::test]
async fn startup_scripts_reach_their_process_types() {
    let server = TestServer::start().await;
    let client = server.org_client();
    let env = harness::create_app_and_env(&server).await;
    let path = harness::env_path(&server.org);
    // The first script is stored the way releases stored scripts before they had a timeout
    // and process types: a bare command.
    let spec = |only: &str| -> ReleaseSpec {
        serde_json::from_value(serde_json::json!({
            "processes": {
                "web": {"count": 1, "vcpus": 1, "memory_mib": 256},
                "worker": {"count": 1, "vcpus": 1, "memory_mib": 256},
            },
            "startup_scripts": [
                "echo every process",
                {"command": "echo worker only", "timeout_secs": 30, "processes": [only]},
            ],
        }))
        .unwrap()
    };

    let error = client
        .create_release(
            &path,
            &CreateRelease {
                image: harness::image(),
                spec: spec("db"),
                description: String::new(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(kiln_api::ErrorCode::InvalidValue));
    assert!(error.to_string().contains("process type db"), "{error}");

    let release = client
        .create_release(
            &path,
            &CreateRelease {
                image: harness::image(),
                spec: spec("worker"),
                description: String::new(),
            },
        )
        .await
        .unwrap();
    let host = register_host(&server, "h1").await;
    let web = place_instance(&server, &env, &release, &host.host, 60).await;
    let worker = place_named_instance(&server, &env, &release, &host.host, 61, "worker").await;
    let assignments = host
        .client
        .watch_assignments(&AssignmentsQuery::default())
        .await
        .unwrap()
        .assignments;
    let scripts = |instance| -> Vec<(String, Option<u32>)> {
        assignments
            .iter()
            .find(|assignment| assignment.instance_id == instance)
            .map(|assignment| {
                assignment
                    .startup_scripts
                    .iter()
                    .map(|script| (script.command.clone(), script.timeout_secs))
                    .collect()
            })
            .unwrap_or_default()
    };

    assert_eq!(scripts(web), [("echo every process".to_owned(), None)]);
    assert_eq!(
        scripts(worker),
        [
            ("echo every process".to_owned(), None),
            ("echo worker only".to_owned(), Some(30)),
        ]
    );
}
