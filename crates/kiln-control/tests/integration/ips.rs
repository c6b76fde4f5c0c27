//! Dedicated IP addresses: allocate, list and release through the API, pool exhaustion,
//! another org's token, the billing events, the ingress route feed, and environment deletion.

use std::net::IpAddr;

use kiln_api::client::EnvPath;
use kiln_api::events::EventQuery;
use kiln_api::types::*;
use kiln_api::{ErrorCode, Event};
use kiln_control::store::{ExpectedVersion, NewEvent, streams};
use kiln_core::{AppName, EnvName, InstanceId};

use crate::harness::{self, TestServer};

const POOL: &str = "198.51.100.0/30";

async fn server_with_pool(prefixes: &[&str]) -> (TestServer, Env, EnvPath) {
    let server = TestServer::start().await;
    let prefixes: Vec<ipnet::Ipv4Net> = prefixes.iter().map(|p| p.parse().unwrap()).collect();
    kiln_control::api::ips::configure_pool(server.store.pool(), &prefixes)
        .await
        .unwrap();
    let env = harness::create_app_and_env(&server).await;
    let path = EnvPath::new(
        server.org.clone(),
        AppName::new("web").unwrap(),
        EnvName::new("prod").unwrap(),
    );
    (server, env, path)
}

fn ipv4() -> AllocateIp {
    AllocateIp {
        version: IpVersion::Ipv4,
    }
}

async fn event_types(server: &TestServer) -> Vec<Event> {
    let page = server
        .org_client()
        .org_events(&server.org, &EventQuery::default())
        .await
        .unwrap();
    page.events.into_iter().map(|e| e.event).collect()
}

#[tokio::test]
async fn ips_allocate_list_release() {
    let (server, env, path) = server_with_pool(&[POOL]).await;
    let client = server.org_client();

    let first = client.allocate_ip(&path, &ipv4()).await.unwrap();
    assert_eq!(first.address, "198.51.100.1".parse::<IpAddr>().unwrap());
    assert_eq!(first.version, IpVersion::Ipv4);
    assert!(first.billed);
    assert_eq!(first.pool.as_deref(), Some(POOL));
    let second = client.allocate_ip(&path, &ipv4()).await.unwrap();
    assert_eq!(second.address, "198.51.100.2".parse::<IpAddr>().unwrap());

    let listed = client.list_ips(&path).await.unwrap().items;
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0].address, IpAddr::V6(env.ipv6_address));
    assert_eq!(listed[0].version, IpVersion::Ipv6);
    assert!(!listed[0].billed);
    assert_eq!(listed[0].pool, None);
    assert_eq!(listed[1], first);
    assert_eq!(listed[2], second);
    let addresses = client.list_addresses(&path).await.unwrap().items;
    assert!(
        addresses
            .iter()
            .any(|a| a.address == first.address && a.kind == AddressKind::DedicatedIpv4),
        "{addresses:?}"
    );

    client.release_ip(&path, first.address).await.unwrap();
    let listed = client.list_ips(&path).await.unwrap().items;
    assert_eq!(listed.len(), 2);
    assert!(!listed.contains(&first));

    // A released address goes back to the pool.
    let again = client.allocate_ip(&path, &ipv4()).await.unwrap();
    assert_eq!(again.address, first.address);

    let billing: Vec<Event> = event_types(&server)
        .await
        .into_iter()
        .filter(|event| {
            matches!(
                event,
                Event::Ipv4AddressAllocated { .. } | Event::Ipv4AddressReleased { .. }
            )
        })
        .collect();
    let expected = |allocated: bool, address: &str| {
        let address = address.parse().unwrap();
        let pool = POOL.to_owned();
        if allocated {
            Event::Ipv4AddressAllocated {
                env_id: env.id,
                address,
                pool,
            }
        } else {
            Event::Ipv4AddressReleased {
                env_id: env.id,
                address,
                pool,
            }
        }
    };
    assert_eq!(
        billing,
        vec![
            expected(true, "198.51.100.1"),
            expected(true, "198.51.100.2"),
            expected(false, "198.51.100.1"),
            expected(true, "198.51.100.1"),
        ]
    );

    // Replaying the log rebuilds the same `addresses` rows, pool included.
    let report = server
        .store
        .rebuild_projections(kiln_control::store::rebuild::RebuildMode::Verify)
        .await
        .unwrap();
    assert!(report.matches(), "{:#?}", report.diffs);
}

#[tokio::test]
async fn ips_pool_exhausted_names_pool() {
    let (server, _env, path) = server_with_pool(&[POOL]).await;
    let client = server.org_client();
    client.allocate_ip(&path, &ipv4()).await.unwrap();
    client.allocate_ip(&path, &ipv4()).await.unwrap();

    let body = serde_json::to_vec(&ipv4()).unwrap();
    let url = "/v1/orgs/acme/apps/web/envs/prod/ips";
    let (status, error) = server
        .raw("POST", url, Some(&server.org_token), Some(body))
        .await;
    assert_eq!(status, 409, "{error}");
    assert_eq!(error["code"], "failed_precondition");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(POOL), "{message}");
    assert!(message.contains("exhausted"), "{message}");
    assert_eq!(error["details"]["pool"][0], POOL);
    assert_eq!(error["details"]["allocated"], 2);
}

#[tokio::test]
async fn ips_without_pool_rejected() {
    let (server, _env, path) = server_with_pool(&[]).await;
    let error = server
        .org_client()
        .allocate_ip(&path, &ipv4())
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::FailedPrecondition));
    assert!(error.to_string().contains("dedicated_ipv4_pool"), "{error}");
}

#[tokio::test]
async fn ips_pool_shared_between_envs() {
    let (server, _env, path) = server_with_pool(&["198.51.100.0/31", "203.0.113.8/31"]).await;
    let client = server.org_client();
    client
        .create_env(
            &server.org,
            &AppName::new("web").unwrap(),
            &CreateEnv {
                name: EnvName::new("staging").unwrap(),
            },
        )
        .await
        .unwrap();
    let staging = EnvPath::new(
        server.org.clone(),
        AppName::new("web").unwrap(),
        EnvName::new("staging").unwrap(),
    );

    // Concurrent allocations from two environments never share an address.
    let mut tasks = Vec::new();
    for index in 0..4 {
        let client = client.clone();
        let target = if index % 2 == 0 {
            path.clone()
        } else {
            staging.clone()
        };
        tasks.push(tokio::spawn(async move {
            client.allocate_ip(&target, &ipv4()).await.unwrap().address
        }));
    }
    let mut addresses = Vec::new();
    for task in tasks {
        addresses.push(task.await.unwrap().to_string());
    }
    addresses.sort();
    assert_eq!(
        addresses,
        ["198.51.100.0", "198.51.100.1", "203.0.113.8", "203.0.113.9"]
    );
    let error = client.allocate_ip(&staging, &ipv4()).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::FailedPrecondition));
}

#[tokio::test]
async fn ips_other_org_not_found() {
    let (server, _env, path) = server_with_pool(&[POOL]).await;
    let allocated = server
        .org_client()
        .allocate_ip(&path, &ipv4())
        .await
        .unwrap();
    let (_, mallory_token) = server.other_org("mallory").await;
    let mallory = server.client(&mallory_token);

    let list = mallory.list_ips(&path).await.unwrap_err();
    assert_eq!(list.code(), Some(ErrorCode::NotFound), "{list}");
    let allocate = mallory.allocate_ip(&path, &ipv4()).await.unwrap_err();
    assert_eq!(allocate.code(), Some(ErrorCode::NotFound), "{allocate}");
    let release = mallory
        .release_ip(&path, allocated.address)
        .await
        .unwrap_err();
    assert_eq!(release.code(), Some(ErrorCode::NotFound), "{release}");

    let listed = server.org_client().list_ips(&path).await.unwrap().items;
    assert_eq!(listed.len(), 2, "mallory released nothing: {listed:?}");
}

#[tokio::test]
async fn ips_release_bad_input() {
    let (server, env, path) = server_with_pool(&[POOL]).await;
    let client = server.org_client();

    let unknown = client
        .release_ip(&path, "198.51.100.1".parse().unwrap())
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Some(ErrorCode::NotFound));
    assert!(unknown.to_string().contains("198.51.100.1"), "{unknown}");

    let ipv6 = client
        .release_ip(&path, IpAddr::V6(env.ipv6_address))
        .await
        .unwrap_err();
    assert_eq!(ipv6.code(), Some(ErrorCode::FailedPrecondition));
    assert!(ipv6.to_string().contains("IPv6"), "{ipv6}");

    let (status, error) = server
        .raw(
            "DELETE",
            "/v1/orgs/acme/apps/web/envs/prod/ips/not-an-ip",
            Some(&server.org_token),
            None,
        )
        .await;
    assert_eq!(status, 400, "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("not-an-ip"),
        "{error}"
    );

    let body = br#"{"version": "ipv6"}"#.to_vec();
    let (status, error) = server
        .raw(
            "POST",
            "/v1/orgs/acme/apps/web/envs/prod/ips",
            Some(&server.org_token),
            Some(body),
        )
        .await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["details"]["field"], "version");
}

#[tokio::test]
async fn ips_released_with_env() {
    let (server, env, path) = server_with_pool(&[POOL]).await;
    let client = server.org_client();
    let allocated = client.allocate_ip(&path, &ipv4()).await.unwrap();

    client.delete_env(&path).await.unwrap();
    let released = event_types(&server).await.into_iter().any(|event| {
        event
            == Event::Ipv4AddressReleased {
                env_id: env.id,
                address: "198.51.100.1".parse().unwrap(),
                pool: POOL.to_owned(),
            }
    });
    assert!(
        released,
        "env deletion ends the billing of {}",
        allocated.address
    );

    // The address is free again for another environment.
    client
        .create_env(
            &server.org,
            &AppName::new("web").unwrap(),
            &CreateEnv {
                name: EnvName::new("next").unwrap(),
            },
        )
        .await
        .unwrap();
    let next = EnvPath::new(
        server.org.clone(),
        AppName::new("web").unwrap(),
        EnvName::new("next").unwrap(),
    );
    let again = client.allocate_ip(&next, &ipv4()).await.unwrap();
    assert_eq!(again.address, allocated.address);

    let report = server
        .store
        .rebuild_projections(kiln_control::store::rebuild::RebuildMode::Verify)
        .await
        .unwrap();
    assert!(report.matches(), "{:#?}", report.diffs);
}

#[tokio::test]
async fn ips_in_ingress_route_feed() {
    let (server, env, path) = server_with_pool(&[POOL]).await;
    let client = server.org_client();
    let tcp_route = Route {
        env_id: env.id,
        service: "db".into(),
        matcher: RouteMatch::Tcp {
            address: IpAddr::V6(env.ipv6_address),
            port: 5433,
        },
        protocol: ServiceProtocol::Tcp,
        proxy_protocol: true,
        backends: vec![RouteBackend {
            instance_id: InstanceId::new(),
            address: "fd12:3456:789a:1::5".parse().unwrap(),
            port: 5432,
        }],
    };
    server
        .store
        .append(
            &streams::env(env.id),
            ExpectedVersion::Any,
            vec![NewEvent::org(
                env.org_id,
                Event::RoutesChanged {
                    env_id: env.id,
                    routes: vec![tcp_route.clone()],
                },
            )],
            "system:orchestrator",
        )
        .await
        .unwrap();
    let ingress_token = server
        .operator()
        .create_ingress_token(&CreateIngressToken {
            name: "edge".into(),
        })
        .await
        .unwrap();
    let ingress = server.client(&ingress_token.secret);
    let before = ingress.watch_routes(&WatchQuery::default()).await.unwrap();
    assert_eq!(before.routes, vec![tcp_route.clone()]);

    // The allocation wakes the watch, and the table then serves the TCP route on the
    // IPv4 address too, with the same port and backends.
    let watch = {
        let ingress = ingress.clone();
        let cursor = before.cursor;
        tokio::spawn(async move {
            ingress
                .watch_routes(&WatchQuery {
                    after: Some(cursor),
                    wait: Some(30),
                })
                .await
                .unwrap()
        })
    };
    let allocated = client.allocate_ip(&path, &ipv4()).await.unwrap();
    let after = watch.await.unwrap();
    assert!(after.cursor > before.cursor);
    let on_ipv4 = Route {
        matcher: RouteMatch::Tcp {
            address: allocated.address,
            port: 5433,
        },
        ..tcp_route.clone()
    };
    assert_eq!(after.routes, vec![tcp_route.clone(), on_ipv4.clone()]);
    let env_routes = client.list_env_routes(&path).await.unwrap().items;
    assert_eq!(env_routes, vec![tcp_route.clone(), on_ipv4]);

    client.release_ip(&path, allocated.address).await.unwrap();
    let released = ingress
        .watch_routes(&WatchQuery {
            after: Some(after.cursor),
            wait: Some(30),
        })
        .await
        .unwrap();
    assert_eq!(released.routes, vec![tcp_route]);
}
