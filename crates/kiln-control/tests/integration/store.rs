//! The event store: optimistic concurrency and projection rebuilds over a long history.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use kiln_api::types::{
    DeployState, DeployStrategy, HostCapacity, Release, Route, RouteBackend, RouteMatch,
    ServiceProtocol, TokenKind, VmmDriver,
};
use kiln_api::{Event, InstanceState};
use kiln_control::store::rebuild::RebuildMode;
use kiln_control::store::{ExpectedVersion, NewEvent, Store, StoreError, StreamEvent, streams};
use kiln_core::{
    AppId, AppName, DeployId, EnvId, EnvName, HostId, Hostname, InstanceId, OrgId, OrgName,
    ProcessName, ReleaseId, TokenId,
};

use crate::harness;

/// A small deterministic generator, so the scripted history is the same on every run.
struct Script(u64);

impl Script {
    fn next(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % bound
    }
}

async fn append(store: &Store, stream: &str, org: Option<OrgId>, event: Event) {
    store
        .append(
            stream,
            ExpectedVersion::Any,
            vec![NewEvent { org_id: org, event }],
            "system:test",
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn stale_expected_version_conflicts() {
    let (store, _db) = harness::store().await;
    let org_id = OrgId::new();
    let stream = streams::org(org_id);
    let created = Event::OrgCreated {
        org_id,
        name: OrgName::new("conflict").unwrap(),
    };
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![NewEvent::org(org_id, created.clone())],
            "t",
        )
        .await
        .unwrap();

    let again = store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![NewEvent::org(org_id, created)],
            "t",
        )
        .await;
    assert!(
        matches!(again, Err(StoreError::Conflict { actual: 1, .. })),
        "{again:?}"
    );

    let app = Event::AppCreated {
        app_id: AppId::new(),
        org_id,
        name: AppName::new("a").unwrap(),
    };
    let stale = store
        .append(
            &stream,
            ExpectedVersion::Exact(0),
            vec![NewEvent::org(org_id, app.clone())],
            "t",
        )
        .await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "{stale:?}"
    );
    let fresh = store
        .append(
            &stream,
            ExpectedVersion::Exact(1),
            vec![NewEvent::org(org_id, app)],
            "t",
        )
        .await
        .unwrap();
    assert_eq!(fresh[0].stream_version, 2);
    assert_eq!(store.stream_version(&stream).await.unwrap(), 2);
}

#[tokio::test]
async fn failed_append_leaves_no_trace() {
    let (store, _db) = harness::store().await;
    let org_id = OrgId::new();
    let name = OrgName::new("dup").unwrap();
    append(
        &store,
        &streams::org(org_id),
        Some(org_id),
        Event::OrgCreated {
            org_id,
            name: name.clone(),
        },
    )
    .await;

    let other = OrgId::new();
    let duplicate = store
        .append(
            &streams::org(other),
            ExpectedVersion::NoStream,
            vec![NewEvent::org(
                other,
                Event::OrgCreated {
                    org_id: other,
                    name,
                },
            )],
            "t",
        )
        .await;
    assert!(
        matches!(duplicate, Err(StoreError::Duplicate { .. })),
        "{duplicate:?}"
    );
    assert_eq!(store.stream_version(&streams::org(other)).await.unwrap(), 0);
    assert_eq!(store.head().await.unwrap(), 1);
}

#[tokio::test]
async fn rebuild_matches_long_scripted_history() {
    let (store, _db) = harness::store().await;
    let mut script = Script(7);
    let mut orgs: Vec<OrgId> = Vec::new();
    let mut apps: Vec<(OrgId, AppId)> = Vec::new();
    let mut envs: Vec<(OrgId, EnvId, Vec<ReleaseId>)> = Vec::new();
    let mut hosts: Vec<HostId> = Vec::new();
    let mut instances: Vec<(OrgId, EnvId, HostId, InstanceId)> = Vec::new();
    let mut tokens: Vec<(OrgId, TokenId)> = Vec::new();
    let mut deploys: Vec<(OrgId, EnvId, DeployId)> = Vec::new();
    let mut conflicts = 0;
    let mut counter = 0u32;

    for step in 0..600 {
        counter += 1;
        let choice = if orgs.is_empty() { 0 } else { script.next(20) };
        match choice {
            0 => {
                let org_id = OrgId::new();
                append(
                    &store,
                    &streams::org(org_id),
                    Some(org_id),
                    Event::OrgCreated {
                        org_id,
                        name: OrgName::new(format!("org{counter}")).unwrap(),
                    },
                )
                .await;
                orgs.push(org_id);
            }
            1 => {
                let org_id = orgs[script.next(orgs.len() as u64) as usize];
                let app_id = AppId::new();
                append(
                    &store,
                    &streams::org(org_id),
                    Some(org_id),
                    Event::AppCreated {
                        app_id,
                        org_id,
                        name: AppName::new(format!("app{counter}")).unwrap(),
                    },
                )
                .await;
                apps.push((org_id, app_id));
            }
            2 if !apps.is_empty() => {
                let (org_id, app_id) = apps[script.next(apps.len() as u64) as usize];
                let env_id = EnvId::new();
                let event = Event::EnvCreated {
                    env_id,
                    app_id,
                    org_id,
                    name: EnvName::new(format!("env{counter}")).unwrap(),
                    hostname: Hostname::new(format!("e{counter}.apps.test")).unwrap(),
                    ipv6_address: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, counter as u16),
                };
                append(&store, &streams::env(env_id), Some(org_id), event).await;
                envs.push((org_id, env_id, Vec::new()));
            }
            3 if !envs.is_empty() => {
                let (org_id, env_id, _) = envs[script.next(envs.len() as u64) as usize];
                let mut set = BTreeMap::new();
                set.insert(format!("VAR{}", script.next(4)), format!("value{counter}"));
                let unset = vec![format!("VAR{}", script.next(4))];
                let unset = unset
                    .into_iter()
                    .filter(|name| !set.contains_key(name))
                    .collect();
                append(
                    &store,
                    &streams::env(env_id),
                    Some(org_id),
                    Event::ConfigChanged {
                        env_id,
                        version: counter as u64,
                        set,
                        unset,
                    },
                )
                .await;
            }
            4 if !envs.is_empty() => {
                let (org_id, env_id, _) = envs[script.next(envs.len() as u64) as usize];
                let name = format!("SECRET{}", script.next(3));
                let event = if script.next(3) == 0 {
                    Event::SecretUnset {
                        env_id,
                        name,
                        secrets_version: counter as u64,
                    }
                } else {
                    Event::SecretSet {
                        env_id,
                        name,
                        version: counter as u64,
                        digest: format!("{counter:016x}"),
                        secrets_version: counter as u64,
                    }
                };
                append(&store, &streams::env(env_id), Some(org_id), event).await;
            }
            5 if !envs.is_empty() => {
                let index = script.next(envs.len() as u64) as usize;
                let (org_id, env_id, ref mut releases) = envs[index];
                let release = Release {
                    id: ReleaseId::new(),
                    env_id,
                    version: releases.len() as u64 + 1,
                    image: harness::image(),
                    spec: harness::release_spec(),
                    config_version: 0,
                    rollback_of: releases.first().copied(),
                    description: format!("release {counter}"),
                    created_at: kiln_control::store::now(),
                };
                releases.push(release.id);
                append(
                    &store,
                    &streams::env(env_id),
                    Some(org_id),
                    Event::ReleaseCreated {
                        release: Box::new(release),
                    },
                )
                .await;
            }
            6 if envs.iter().any(|(_, _, releases)| !releases.is_empty()) => {
                let candidates: Vec<_> = envs
                    .iter()
                    .filter(|(_, _, releases)| !releases.is_empty())
                    .collect();
                let (org_id, env_id, releases) =
                    candidates[script.next(candidates.len() as u64) as usize];
                let deploy_id = DeployId::new();
                let release_id = *releases.last().unwrap();
                append(
                    &store,
                    &streams::env(*env_id),
                    Some(*org_id),
                    Event::DeployRequested {
                        deploy_id,
                        env_id: *env_id,
                        release_id,
                        previous_release_id: None,
                        strategy: DeployStrategy::Rolling,
                    },
                )
                .await;
                append(
                    &store,
                    &streams::env(*env_id),
                    Some(*org_id),
                    Event::EnvReleaseChanged {
                        env_id: *env_id,
                        release_id,
                    },
                )
                .await;
                deploys.push((*org_id, *env_id, deploy_id));
            }
            7 if !deploys.is_empty() => {
                let (org_id, env_id, deploy_id) =
                    deploys[script.next(deploys.len() as u64) as usize];
                let stream = streams::deploy(deploy_id);
                append(
                    &store,
                    &stream,
                    Some(org_id),
                    Event::DeployStepCompleted {
                        deploy_id,
                        env_id,
                        step: "start_instances".into(),
                        detail: format!("step {counter}"),
                        output: Vec::new(),
                    },
                )
                .await;
                let state = [
                    DeployState::InProgress,
                    DeployState::Succeeded,
                    DeployState::Failed,
                ][script.next(3) as usize];
                let failure =
                    (state == DeployState::Failed).then(|| "health check failed".to_owned());
                append(
                    &store,
                    &stream,
                    Some(org_id),
                    Event::DeployStateChanged {
                        deploy_id,
                        env_id,
                        state,
                        failure,
                    },
                )
                .await;
            }
            8 => {
                let host_id = HostId::new();
                let stream = streams::host(host_id);
                append(
                    &store,
                    &stream,
                    None,
                    Event::HostCreated {
                        host_id,
                        name: format!("host{counter}"),
                    },
                )
                .await;
                append(
                    &store,
                    &stream,
                    None,
                    Event::HostRegistered {
                        host_id,
                        capacity: HostCapacity {
                            vcpus: 8,
                            memory_mib: 16384,
                        },
                        driver: VmmDriver::Qemu,
                        overlay_public_key: "a".repeat(44),
                        overlay_endpoint: "127.0.0.1:51820".parse().unwrap(),
                        ipv6_prefix: format!("fd00:0:0:{counter:x}::/64"),
                    },
                )
                .await;
                hosts.push(host_id);
            }
            9 if !hosts.is_empty() => {
                let host_id = hosts[script.next(hosts.len() as u64) as usize];
                let event = match script.next(4) {
                    0 => Event::HostCordoned { host_id },
                    1 => Event::HostUncordoned { host_id },
                    2 => Event::HostDrainRequested { host_id },
                    _ => Event::HostLost { host_id },
                };
                append(&store, &streams::host(host_id), None, event).await;
            }
            10 | 11
                if !hosts.is_empty()
                    && envs.iter().any(|(_, _, releases)| !releases.is_empty()) =>
            {
                let candidates: Vec<_> = envs
                    .iter()
                    .filter(|(_, _, releases)| !releases.is_empty())
                    .collect();
                let (org_id, env_id, releases) =
                    candidates[script.next(candidates.len() as u64) as usize];
                let host_id = hosts[script.next(hosts.len() as u64) as usize];
                let instance_id = InstanceId::new();
                let event = Event::InstancePlaced {
                    instance_id,
                    env_id: *env_id,
                    release_id: releases[0],
                    process: ProcessName::new("web").unwrap(),
                    host_id,
                    ipv6: Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 2, counter as u16),
                    ipv4: Ipv4Addr::new(100, 64, (counter >> 8) as u8, counter as u8),
                };
                append(
                    &store,
                    &streams::instance(instance_id),
                    Some(*org_id),
                    event,
                )
                .await;
                instances.push((*org_id, *env_id, host_id, instance_id));
            }
            12 if !instances.is_empty() => {
                let (org_id, env_id, host_id, instance_id) =
                    instances[script.next(instances.len() as u64) as usize];
                let state = [
                    InstanceState::Preparing,
                    InstanceState::Booting,
                    InstanceState::Healthy,
                    InstanceState::Unhealthy,
                    InstanceState::Exited,
                ][script.next(5) as usize];
                append(
                    &store,
                    &streams::instance(instance_id),
                    Some(org_id),
                    Event::InstanceStateChanged {
                        instance_id,
                        env_id,
                        host_id,
                        state,
                        detail: Some(format!("report {counter}")),
                        exit_code: None,
                        output: Vec::new(),
                    },
                )
                .await;
            }
            13 if !instances.is_empty() => {
                let index = script.next(instances.len() as u64) as usize;
                let (org_id, env_id, host_id, instance_id) = instances[index];
                let stream = streams::instance(instance_id);
                append(
                    &store,
                    &stream,
                    Some(org_id),
                    Event::InstanceStopRequested {
                        instance_id,
                        env_id,
                        host_id,
                        reason: "scale".into(),
                    },
                )
                .await;
                if script.next(2) == 0 {
                    append(
                        &store,
                        &stream,
                        Some(org_id),
                        Event::InstanceRemoved {
                            instance_id,
                            env_id,
                            host_id,
                        },
                    )
                    .await;
                    instances.remove(index);
                }
            }
            14 if !instances.is_empty() => {
                let (org_id, env_id, _, instance_id) =
                    instances[script.next(instances.len() as u64) as usize];
                let route = Route {
                    env_id,
                    service: "http".into(),
                    matcher: RouteMatch::Sni {
                        hostname: Hostname::new(format!("r{counter}.apps.test")).unwrap(),
                    },
                    protocol: ServiceProtocol::Tls,
                    proxy_protocol: script.next(2) == 0,
                    backends: vec![RouteBackend {
                        instance_id,
                        address: Ipv6Addr::LOCALHOST,
                        port: 8080,
                    }],
                };
                append(
                    &store,
                    &streams::env(env_id),
                    Some(org_id),
                    Event::RoutesChanged {
                        env_id,
                        routes: vec![route],
                    },
                )
                .await;
            }
            15 => {
                let org_id = orgs[script.next(orgs.len() as u64) as usize];
                if script.next(2) == 0 || tokens.is_empty() {
                    let token_id = TokenId::new();
                    append(
                        &store,
                        &streams::org(org_id),
                        Some(org_id),
                        Event::TokenCreated {
                            token_id,
                            kind: TokenKind::Org,
                            org_id: Some(org_id),
                            host_id: None,
                            name: format!("t{counter}"),
                            expires_at: None,
                        },
                    )
                    .await;
                    tokens.push((org_id, token_id));
                } else {
                    let (org_id, token_id) = tokens[script.next(tokens.len() as u64) as usize];
                    append(
                        &store,
                        &streams::org(org_id),
                        Some(org_id),
                        Event::TokenRevoked { token_id },
                    )
                    .await;
                }
            }
            16 if envs.len() > 3 => {
                let index = script.next(envs.len() as u64) as usize;
                let (org_id, env_id, _) = envs.remove(index);
                instances.retain(|(_, env, _, _)| *env != env_id);
                append(
                    &store,
                    &streams::env(env_id),
                    Some(org_id),
                    Event::EnvDeleted { env_id },
                )
                .await;
            }
            17 if apps.len() > 3 => {
                let index = script.next(apps.len() as u64) as usize;
                let (org_id, app_id) = apps.remove(index);
                append(
                    &store,
                    &streams::org(org_id),
                    Some(org_id),
                    Event::AppDeleted { app_id },
                )
                .await;
            }
            18 if !envs.is_empty() => {
                let (org_id, env_id, _) = envs[script.next(envs.len() as u64) as usize];
                let mut counts = BTreeMap::new();
                counts.insert(ProcessName::new("web").unwrap(), script.next(5) as u32);
                append(
                    &store,
                    &streams::env(env_id),
                    Some(org_id),
                    Event::EnvScaled { env_id, counts },
                )
                .await;
            }
            _ => {
                // A conflicting append: a stale expected version must change nothing.
                let org_id = orgs[script.next(orgs.len() as u64) as usize];
                let stream = streams::org(org_id);
                let version = store.stream_version(&stream).await.unwrap();
                let event = Event::AppCreated {
                    app_id: AppId::new(),
                    org_id,
                    name: AppName::new(format!("lost{step}")).unwrap(),
                };
                let result = store
                    .append(
                        &stream,
                        ExpectedVersion::Exact(version.saturating_sub(1)),
                        vec![NewEvent::org(org_id, event)],
                        "t",
                    )
                    .await;
                assert!(
                    matches!(result, Err(StoreError::Conflict { .. })),
                    "{result:?}"
                );
                conflicts += 1;
            }
        }
    }

    assert!(
        conflicts > 10,
        "the script exercised only {conflicts} conflicts"
    );
    let head = store.head().await.unwrap();
    assert!(head > 500, "the script appended only {head} events");

    let report = store
        .rebuild_projections(RebuildMode::Verify)
        .await
        .unwrap();
    assert_eq!(report.events, head);
    assert!(report.matches(), "{:#?}", report.diffs);

    let lost: i64 = sqlx::query_scalar("SELECT count(*) FROM apps WHERE name LIKE 'lost%'")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(lost, 0);
}

#[tokio::test]
async fn verify_reports_tampered_projection() {
    let (store, _db) = harness::store().await;
    let org_id = OrgId::new();
    append(
        &store,
        &streams::org(org_id),
        Some(org_id),
        Event::OrgCreated {
            org_id,
            name: OrgName::new("tamper").unwrap(),
        },
    )
    .await;
    append(
        &store,
        &streams::org(org_id),
        Some(org_id),
        Event::AppCreated {
            app_id: AppId::new(),
            org_id,
            name: AppName::new("a").unwrap(),
        },
    )
    .await;

    sqlx::query("UPDATE apps SET name = 'changed'")
        .execute(store.pool())
        .await
        .unwrap();
    let report = store
        .rebuild_projections(RebuildMode::Verify)
        .await
        .unwrap();
    assert_eq!(report.diffs.len(), 1, "{:#?}", report.diffs);
    assert_eq!(report.diffs[0].table, "apps");
    assert_eq!(report.diffs[0].only_live_count, 1);
    assert_eq!(report.diffs[0].only_rebuilt_count, 1);

    let replaced = store
        .rebuild_projections(RebuildMode::Replace)
        .await
        .unwrap();
    assert!(replaced.replaced);
    let after = store
        .rebuild_projections(RebuildMode::Verify)
        .await
        .unwrap();
    assert!(after.matches(), "{:#?}", after.diffs);
    let name: String = sqlx::query_scalar("SELECT name FROM apps")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(name, "a");
}

#[tokio::test]
async fn multi_event_append_orders_seq() {
    let (store, _db) = harness::store().await;
    let org_id = OrgId::new();
    let mut events = vec![NewEvent::org(
        org_id,
        Event::OrgCreated {
            org_id,
            name: OrgName::new("many").unwrap(),
        },
    )];
    for index in 0..5 {
        events.push(NewEvent::org(
            org_id,
            Event::AppCreated {
                app_id: AppId::new(),
                org_id,
                name: AppName::new(format!("app{index}")).unwrap(),
            },
        ));
    }
    let expected: Vec<Event> = events.iter().map(|new| new.event.clone()).collect();

    let appended = store
        .append(
            &streams::org(org_id),
            ExpectedVersion::NoStream,
            events,
            "system:test",
        )
        .await
        .unwrap();

    let versions: Vec<u64> = appended.iter().map(|event| event.stream_version).collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5, 6]);
    for pair in appended.windows(2) {
        assert!(pair[0].seq < pair[1].seq, "{appended:?}");
    }
    let (read, _) = store
        .read_page(0, 100, &kiln_control::store::EventFilter::default())
        .await
        .unwrap();
    assert_eq!(read, appended);
    let read_events: Vec<Event> = read.into_iter().map(|envelope| envelope.event).collect();
    assert_eq!(read_events, expected);
}

#[tokio::test]
async fn config_change_sets_and_unsets_together() {
    let (store, _db) = harness::store().await;
    let org_id = OrgId::new();
    let app_id = AppId::new();
    let env_id = EnvId::new();
    append(
        &store,
        &streams::env(env_id),
        Some(org_id),
        Event::EnvCreated {
            env_id,
            app_id,
            org_id,
            name: EnvName::new("prod").unwrap(),
            hostname: Hostname::new("prod.apps.test").unwrap(),
            ipv6_address: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1),
        },
    )
    .await;
    let change = |version: u64, set: &[(&str, &str)], unset: &[&str]| Event::ConfigChanged {
        env_id,
        version,
        set: set
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect(),
        unset: unset.iter().map(|name| name.to_string()).collect(),
    };
    let stream = streams::env(env_id);
    append(
        &store,
        &stream,
        Some(org_id),
        change(1, &[("A", "1"), ("B", "2"), ("C", "3")], &[]),
    )
    .await;
    // B is unset; C is in both lists and ends up set, as if `unset` applied first.
    append(
        &store,
        &stream,
        Some(org_id),
        change(2, &[("A", "10"), ("C", "30")], &["B", "C"]),
    )
    .await;

    let vars: Vec<(String, String)> =
        sqlx::query_as("SELECT name, value FROM config_vars WHERE env_id = $1 ORDER BY name")
            .bind(env_id.as_uuid())
            .fetch_all(store.pool())
            .await
            .unwrap();
    let expected =
        [("A", "10"), ("C", "30")].map(|(name, value)| (name.to_owned(), value.to_owned()));
    assert_eq!(vars, expected);
    let version: i64 = sqlx::query_scalar("SELECT config_version FROM envs WHERE id = $1")
        .bind(env_id.as_uuid())
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(version, 2);
}

#[tokio::test]
async fn append_function_uses_store_constants() {
    let (store, _db) = harness::store().await;
    let definition: String =
        sqlx::query_scalar("SELECT pg_get_functiondef('kiln_append'::regproc)")
            .fetch_one(store.pool())
            .await
            .unwrap();
    let lock = format!(
        "pg_advisory_xact_lock({})",
        kiln_control::store::APPEND_LOCK_KEY
    );
    assert!(definition.contains(&lock), "{definition}");
    let notify = format!("pg_notify('{}'", kiln_control::store::NOTIFY_CHANNEL);
    assert!(definition.contains(&notify), "{definition}");
}

/// Values a quoting bug would mangle or turn into SQL: quotes, dollar quotes, backslashes,
/// comment and statement syntax, non-ASCII text and a value at the API's 32 KiB limit.
fn hostile_values() -> Vec<String> {
    vec![
        "'".to_owned(),
        "''; DROP TABLE events; --".to_owned(),
        "$$ $kiln$ $1 $q$x$q$".to_owned(),
        r"\ \\ \x00 \u0000 E'\n'".to_owned(),
        "\"double\" /* comment */ -- line".to_owned(),
        "tab\tnewline\nreturn\r ünïcödé 🔥".to_owned(),
        "$".repeat(32 * 1024),
        "'".repeat(32 * 1024),
    ]
}

/// Creates an environment for the config tests and returns its org and id.
async fn config_env(store: &Store) -> (OrgId, EnvId) {
    let org_id = OrgId::new();
    let env_id = EnvId::new();
    append(
        store,
        &streams::env(env_id),
        Some(org_id),
        Event::EnvCreated {
            env_id,
            app_id: AppId::new(),
            org_id,
            name: EnvName::new("prod").unwrap(),
            hostname: Hostname::new("prod.quoting.test").unwrap(),
            ipv6_address: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7),
        },
    )
    .await;
    (org_id, env_id)
}

#[tokio::test]
async fn hostile_config_values_stored_verbatim() {
    let (store, _db) = harness::store().await;
    let (org_id, env_id) = config_env(&store).await;
    let set: BTreeMap<String, String> = hostile_values()
        .into_iter()
        .enumerate()
        .map(|(index, value)| (format!("V{index}"), value))
        .collect();
    // The unset names are hostile too; none of them exists, so nothing is removed.
    let unset = vec![
        "'); DELETE FROM config_vars; --".to_owned(),
        "$$".to_owned(),
    ];
    let event = Event::ConfigChanged {
        env_id,
        version: 1,
        set: set.clone(),
        unset,
    };
    let appended = store
        .append(
            &streams::env(env_id),
            ExpectedVersion::Exact(1),
            vec![NewEvent::org(org_id, event.clone())],
            "t",
        )
        .await
        .unwrap();

    let stored: BTreeMap<String, String> = sqlx::query_as::<_, (String, String)>(
        "SELECT name, value FROM config_vars WHERE env_id = $1",
    )
    .bind(env_id.as_uuid())
    .fetch_all(store.pool())
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(stored, set);

    let (events, _) = store
        .read_page(
            appended[0].seq - 1,
            10,
            &kiln_control::store::EventFilter::default(),
        )
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, event);
    let report = store
        .rebuild_projections(RebuildMode::Verify)
        .await
        .unwrap();
    assert!(report.matches(), "{:?}", report.diffs);
}

#[tokio::test]
async fn nul_value_rejected_without_trace() {
    let (store, _db) = harness::store().await;
    let (org_id, env_id) = config_env(&store).await;
    let head = store.head().await.unwrap();
    let event = Event::ConfigChanged {
        env_id,
        version: 1,
        set: BTreeMap::from([("A".to_owned(), "before\0after".to_owned())]),
        unset: Vec::new(),
    };
    let result = store
        .append(
            &streams::env(env_id),
            ExpectedVersion::Any,
            vec![NewEvent::org(org_id, event)],
            "t",
        )
        .await;
    assert!(
        matches!(result, Err(StoreError::Database { .. })),
        "{result:?}"
    );
    assert_eq!(store.head().await.unwrap(), head);
    assert_eq!(
        store.stream_version(&streams::env(env_id)).await.unwrap(),
        1
    );
    let vars: i64 = sqlx::query_scalar("SELECT count(*) FROM config_vars")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(vars, 0);
}

#[tokio::test]
async fn conflict_in_transaction_is_retryable() {
    let (store, _db) = harness::store().await;
    let (org_id, env_id) = config_env(&store).await;
    let stream = streams::env(env_id);
    let change = |version: u64| {
        vec![NewEvent::org(
            org_id,
            Event::ConfigChanged {
                env_id,
                version,
                set: BTreeMap::from([("A".to_owned(), version.to_string())]),
                unset: Vec::new(),
            },
        )]
    };

    let mut tx = store.begin().await.unwrap();
    let stale = Store::append_in(&mut tx, &stream, ExpectedVersion::Exact(5), change(1), "t").await;
    assert!(
        matches!(stale, Err(StoreError::Conflict { actual: 1, .. })),
        "{stale:?}"
    );
    // The conflict wrote nothing and left the transaction usable, so the caller can retry
    // with the version the error names.
    let retried = Store::append_in(&mut tx, &stream, ExpectedVersion::Exact(1), change(1), "t")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(retried[0].stream_version, 2);
    assert_eq!(store.stream_version(&stream).await.unwrap(), 2);
}

#[tokio::test]
async fn concurrent_exact_appends_serialize() {
    let (store, _db) = harness::store().await;
    let (org_id, env_id) = config_env(&store).await;
    const WRITERS: u64 = 6;
    const APPENDS: u64 = 15;

    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let stream = streams::env(env_id);
            let mut conflicts = 0u64;
            for index in 0..APPENDS {
                loop {
                    let version = store.stream_version(&stream).await.unwrap();
                    let event = Event::ConfigChanged {
                        env_id,
                        version,
                        set: BTreeMap::from([(format!("W{writer}"), index.to_string())]),
                        unset: Vec::new(),
                    };
                    let result = store
                        .append(
                            &stream,
                            ExpectedVersion::Exact(version),
                            vec![NewEvent::org(org_id, event)],
                            "t",
                        )
                        .await;
                    match result {
                        Ok(appended) => {
                            assert_eq!(appended[0].stream_version, version + 1);
                            break;
                        }
                        Err(StoreError::Conflict { actual, .. }) => {
                            assert!(actual > version, "{actual} <= {version}");
                            conflicts += 1;
                        }
                        Err(error) => panic!("{error:?}"),
                    }
                }
            }
            conflicts
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }

    let stream = streams::env(env_id);
    let total = 1 + WRITERS * APPENDS;
    assert_eq!(store.stream_version(&stream).await.unwrap(), total);
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT stream_version FROM events WHERE stream = $1 ORDER BY seq")
            .bind(&stream)
            .fetch_all(store.pool())
            .await
            .unwrap();
    let expected: Vec<i64> = (1..=total as i64).collect();
    assert_eq!(versions, expected);
    let report = store
        .rebuild_projections(RebuildMode::Verify)
        .await
        .unwrap();
    assert!(report.matches(), "{:?}", report.diffs);
}

/// Appends `OrgCreated` and `AppCreated` events across streams in one `append_each`.
fn org_and_app(org_id: OrgId, name: &str) -> (StreamEvent, StreamEvent) {
    let org = StreamEvent {
        stream: streams::org(org_id),
        expected: ExpectedVersion::NoStream,
        event: NewEvent::org(
            org_id,
            Event::OrgCreated {
                org_id,
                name: OrgName::new(name).unwrap(),
            },
        ),
    };
    let app_id = AppId::new();
    let app = StreamEvent {
        // Apps live in their org's stream in the API; a stream of their own here makes the
        // batch span three streams.
        stream: format!("test-app-{app_id}"),
        expected: ExpectedVersion::NoStream,
        event: NewEvent::org(
            org_id,
            Event::AppCreated {
                app_id,
                org_id,
                name: AppName::new("web").unwrap(),
            },
        ),
    };
    (org, app)
}

#[tokio::test]
async fn append_each_spans_streams_in_order() {
    let (store, _db) = harness::store().await;
    let org_id = OrgId::new();
    let (org, app) = org_and_app(org_id, "batch");
    let app_stream = app.stream.clone();
    let second_app = StreamEvent {
        expected: ExpectedVersion::Exact(1),
        ..app.clone()
    };
    let renamed = StreamEvent {
        event: NewEvent::org(
            org_id,
            Event::AppDeleted {
                app_id: match app.event.event {
                    Event::AppCreated { app_id, .. } => app_id,
                    _ => unreachable!(),
                },
            },
        ),
        ..second_app
    };

    let appended = store
        .append_each(vec![org, app, renamed], "t")
        .await
        .unwrap();

    let seqs: Vec<u64> = appended.iter().map(|envelope| envelope.seq).collect();
    assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "{seqs:?}");
    let versions: Vec<(String, u64)> = appended
        .iter()
        .map(|envelope| (envelope.stream.clone(), envelope.stream_version))
        .collect();
    assert_eq!(
        versions,
        vec![
            (streams::org(org_id), 1),
            (app_stream.clone(), 1),
            (app_stream.clone(), 2),
        ]
    );
    assert_eq!(store.stream_version(&app_stream).await.unwrap(), 2);
    let apps: i64 = sqlx::query_scalar("SELECT count(*) FROM apps")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(apps, 0, "the app was created and deleted in one batch");
    assert!(store.append_each(Vec::new(), "t").await.unwrap().is_empty());

    let report = store
        .rebuild_projections(RebuildMode::Verify)
        .await
        .unwrap();
    assert!(report.matches(), "{:#?}", report.diffs);
}

#[tokio::test]
async fn append_each_conflict_writes_nothing() {
    let (store, _db) = harness::store().await;
    let existing = OrgId::new();
    let (org, _) = org_and_app(existing, "taken");
    store.append_each(vec![org], "t").await.unwrap();
    let head = store.head().await.unwrap();

    // The second event's stream exists already: neither event may land, nor the projection
    // of the first.
    let fresh = OrgId::new();
    let (fresh_org, fresh_app) = org_and_app(fresh, "fresh");
    let (again, _) = org_and_app(existing, "again");
    let result = store
        .append_each(vec![fresh_org.clone(), again, fresh_app], "t")
        .await;
    match result {
        Err(StoreError::Conflict {
            stream,
            expected,
            actual,
        }) => {
            assert_eq!(stream, streams::org(existing));
            assert_eq!(expected, ExpectedVersion::NoStream);
            assert_eq!(actual, 1);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.head().await.unwrap(), head);
    assert_eq!(store.stream_version(&fresh_org.stream).await.unwrap(), 0);
    let orgs: Vec<String> = sqlx::query_scalar("SELECT name FROM orgs ORDER BY name")
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert_eq!(orgs, vec!["taken".to_owned()]);

    // A stale exact version conflicts the same way.
    let (_, app) = org_and_app(existing, "taken");
    store.append_each(vec![app.clone()], "t").await.unwrap();
    let stale = StreamEvent {
        expected: ExpectedVersion::Exact(5),
        ..app
    };
    let result = store.append_each(vec![stale], "t").await;
    assert!(
        matches!(result, Err(StoreError::Conflict { actual: 1, .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn append_each_in_opposite_orders_does_not_deadlock() {
    let (store, _db) = harness::store().await;
    let orgs: Vec<OrgId> = (0..8).map(|_| OrgId::new()).collect();
    let created: Vec<StreamEvent> = orgs
        .iter()
        .enumerate()
        .map(|(n, org_id)| org_and_app(*org_id, &format!("o{n}")).0)
        .collect();
    store.append_each(created, "t").await.unwrap();

    // Two transactions touch the same streams in opposite orders and hold their row locks
    // until they commit. Without the ordered locking one of them would fail with a deadlock.
    let revoke = |org_id: OrgId| StreamEvent {
        stream: streams::org(org_id),
        expected: ExpectedVersion::Any,
        event: NewEvent::org(
            org_id,
            Event::TokenRevoked {
                token_id: TokenId::new(),
            },
        ),
    };
    let forward = || orgs.iter().map(|org| revoke(*org)).collect::<Vec<_>>();
    let backward: Vec<StreamEvent> = orgs.iter().rev().map(|org| revoke(*org)).collect();
    let mut runs = Vec::new();
    for batch in [forward(), backward, forward()] {
        let store = store.clone();
        runs.push(tokio::spawn(async move {
            let mut tx = store.begin().await.unwrap();
            Store::append_each_in(&mut tx, batch, "t").await?;
            tokio::task::yield_now().await;
            tx.commit().await.unwrap();
            Ok::<_, StoreError>(())
        }));
    }
    for run in runs {
        run.await.unwrap().unwrap();
    }
    for org in &orgs {
        assert_eq!(store.stream_version(&streams::org(*org)).await.unwrap(), 4);
    }
}

#[tokio::test]
async fn fenced_append_writes_only_for_the_current_term() {
    let (store, _db) = harness::store().await;
    let org_id = OrgId::new();
    let created = |name: &str| {
        vec![NewEvent::org(
            org_id,
            Event::OrgCreated {
                org_id,
                name: OrgName::new(name).unwrap(),
            },
        )]
    };
    let stream = streams::org(org_id);

    // No leader has ever been elected: every term is stale.
    let none = store
        .append_fenced(
            "control",
            1,
            &stream,
            ExpectedVersion::Any,
            created("a"),
            "t",
        )
        .await;
    assert!(
        matches!(
            none,
            Err(StoreError::StaleFence {
                held: 1,
                current: 0
            })
        ),
        "{none:?}"
    );

    sqlx::query("INSERT INTO leader_terms (name, term) VALUES ('control', 3)")
        .execute(store.pool())
        .await
        .unwrap();
    let head = store.head().await.unwrap();
    let stale = store
        .append_fenced(
            "control",
            2,
            &stream,
            ExpectedVersion::Any,
            created("b"),
            "t",
        )
        .await;
    assert!(
        matches!(
            stale,
            Err(StoreError::StaleFence {
                held: 2,
                current: 3
            })
        ),
        "{stale:?}"
    );
    assert_eq!(store.head().await.unwrap(), head);
    assert_eq!(store.stream_version(&stream).await.unwrap(), 0);

    let current = store
        .append_fenced(
            "control",
            3,
            &stream,
            ExpectedVersion::NoStream,
            created("c"),
            "t",
        )
        .await
        .unwrap();
    assert_eq!(current[0].stream_version, 1);
    let conflict = store
        .append_fenced(
            "control",
            3,
            &stream,
            ExpectedVersion::NoStream,
            created("d"),
            "t",
        )
        .await;
    assert!(
        matches!(conflict, Err(StoreError::Conflict { actual: 1, .. })),
        "{conflict:?}"
    );
}
