//! Control-plane mode against a stand-in for kiln-control's route watch.
//!
//! The stand-in serves `GET /v1/ingress/routes` with the same contract as kiln-control
//! (bearer ingress token, `after` cursor, `wait` long poll, the whole table in the
//! response), using the kiln-api types, so the real `kiln_api::Client` and the ingress's
//! follower run unchanged.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use kiln_api::{Route as ApiRoute, RouteBackend, RouteMatch, RouteTable, ServiceProtocol};
use kiln_core::{EnvId, Hostname, InstanceId};
use kiln_ingress::control;
use kiln_ingress::{Ingress, RouteSet};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::support::*;

const TOKEN: &str = "kiln-ingress-test-token";

/// Serves the route table in `tables`; each send is one change with a new cursor.
async fn start_route_server(tables: watch::Receiver<RouteTable>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let mut tables = tables.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut reader = BufReader::new(read);
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut authorized = false;
                    loop {
                        let mut header = String::new();
                        reader.read_line(&mut header).await.unwrap();
                        if header == "\r\n" {
                            break;
                        }
                        if header
                            .to_ascii_lowercase()
                            .starts_with("authorization: bearer ")
                            && header.trim_end().ends_with(TOKEN)
                        {
                            authorized = true;
                        }
                    }
                    let query = request_line
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or("")
                        .to_owned();
                    let param = |name: &str| {
                        query
                            .split(['?', '&'])
                            .find_map(|pair| pair.strip_prefix(&format!("{name}=")))
                            .and_then(|value| value.parse::<u64>().ok())
                    };
                    let (status, body) = if !authorized {
                        (
                            "401 Unauthorized",
                            r#"{"code":"unauthenticated","message":"invalid token","details":{}}"#
                                .to_owned(),
                        )
                    } else {
                        let after = param("after").unwrap_or(0);
                        let wait = Duration::from_secs(param("wait").unwrap_or(0));
                        if after != 0 && tables.borrow().cursor <= after {
                            let changed = tables.wait_for(|table| table.cursor > after);
                            let _ = tokio::time::timeout(wait, changed).await;
                        }
                        let table = tables.borrow().clone();
                        ("200 OK", serde_json::to_string(&table).unwrap())
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if write.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

fn api_route(hostname: &str, backend: SocketAddr) -> ApiRoute {
    let IpAddr::V6(address) = backend.ip() else {
        panic!("overlay backends are IPv6")
    };
    ApiRoute {
        env_id: EnvId::new(),
        service: "web".into(),
        matcher: RouteMatch::Sni {
            hostname: Hostname::new(hostname).unwrap(),
        },
        protocol: ServiceProtocol::Tls,
        proxy_protocol: false,
        backends: vec![RouteBackend {
            instance_id: InstanceId::new(),
            address,
            port: backend.port(),
        }],
    }
}

#[tokio::test]
async fn control_routes_followed_atomically() {
    let tls = TestTls::new();
    let blue = Backend::start(&tls, "blue", "[::1]:0", false).await;
    let green = Backend::start(&tls, "green", "[::1]:0", false).await;
    let (tables, receiver) = watch::channel(RouteTable {
        cursor: 7,
        routes: vec![api_route("app.example.test", blue.addr)],
    });
    let url = start_route_server(receiver).await;
    let client = kiln_api::Client::new(&url, TOKEN).unwrap();

    let initial = control::fetch_initial_routes(&client).await.unwrap();
    assert_eq!(initial.cursor, 7);
    let ingress = Arc::new(
        Ingress::start(
            kiln_ingress::IngressConfig {
                listen: vec!["127.0.0.1:0".parse().unwrap()],
                ..Default::default()
            },
            &control::route_set_from_table(&initial),
        )
        .await
        .unwrap(),
    );
    let addr = ingress.listen_addrs()[0];
    assert_eq!(
        ask_once(&tls, addr, "app.example.test").await.unwrap(),
        "blue"
    );
    let mut open = Client::connect(&tls, addr, "app.example.test")
        .await
        .unwrap();

    let follower = {
        let ingress = Arc::clone(&ingress);
        tokio::spawn(async move { control::follow_routes(&client, &ingress, initial.cursor).await })
    };
    tables.send_replace(RouteTable {
        cursor: 9,
        routes: vec![api_route("app.example.test", green.addr)],
    });
    wait_until_async("green routed", || async {
        ask_once(&tls, addr, "app.example.test")
            .await
            .ok()
            .as_deref()
            == Some("green")
    })
    .await;
    assert_eq!(
        open.ask().await.unwrap(),
        "blue",
        "open connection keeps its backend"
    );

    // A table without the route removes it.
    tables.send_replace(RouteTable {
        cursor: 12,
        routes: vec![],
    });
    wait_until_async("route removed", || async {
        ask_once(&tls, addr, "app.example.test").await.is_err()
    })
    .await;
    assert!(!follower.is_finished(), "the follower keeps watching");
    follower.abort();
}

#[tokio::test]
async fn control_bad_token_rejected() {
    let (_tables, receiver) = watch::channel(RouteTable {
        cursor: 1,
        routes: vec![],
    });
    let url = start_route_server(receiver).await;
    let client = kiln_api::Client::new(&url, "wrong-token").unwrap();
    let error = control::fetch_initial_routes(&client).await.unwrap_err();
    assert!(
        matches!(error, control::ControlError::Rejected(_)),
        "{error}"
    );
}

#[test]
fn control_table_maps_to_route_set() {
    let v6: Ipv6Addr = "fd00:6b69:6c6e:1::5".parse().unwrap();
    let dedicated: IpAddr = "2001:db8::17".parse().unwrap();
    let mut tcp = api_route("db.example.test", SocketAddr::new(IpAddr::V6(v6), 5432));
    tcp.matcher = RouteMatch::Tcp {
        address: dedicated,
        port: 5432,
    };
    tcp.protocol = ServiceProtocol::Tcp;
    tcp.proxy_protocol = true;
    let web = api_route("*.apps.example.test", SocketAddr::new(IpAddr::V6(v6), 8443));
    let duplicate = api_route("*.apps.example.test", SocketAddr::new(IpAddr::V6(v6), 9999));
    let table = RouteTable {
        cursor: 3,
        routes: vec![web, tcp, duplicate],
    };

    let set: RouteSet = control::route_set_from_table(&table);
    assert_eq!(set.routes.len(), 1, "the repeated hostname is skipped");
    assert_eq!(set.routes[0].hostname.as_str(), "*.apps.example.test");
    assert_eq!(
        set.routes[0].backends,
        vec![SocketAddr::new(IpAddr::V6(v6), 8443)]
    );
    assert_eq!(set.tcp_services.len(), 1);
    assert_eq!(set.tcp_services[0].listen, SocketAddr::new(dedicated, 5432));
    assert!(set.tcp_services[0].proxy_protocol);
}

/// Builds a TCP route as kiln-control publishes it for a dedicated address of an env.
fn api_tcp_route(env_id: EnvId, address: IpAddr, port: u16, backend: SocketAddr) -> ApiRoute {
    let IpAddr::V6(backend_address) = backend.ip() else {
        panic!("overlay backends are IPv6")
    };
    ApiRoute {
        env_id,
        service: "db".into(),
        matcher: RouteMatch::Tcp { address, port },
        protocol: ServiceProtocol::Tcp,
        proxy_protocol: false,
        backends: vec![RouteBackend {
            instance_id: InstanceId::new(),
            address: backend_address,
            port: backend.port(),
        }],
    }
}

/// Echoes every connection's bytes back.
async fn start_tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("[::1]:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

async fn echo_once(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(b"dedicated").await?;
    let mut answer = vec![0u8; 9];
    tokio::time::timeout(WAIT, stream.read_exact(&mut answer))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok(answer)
}

#[tokio::test]
async fn control_dedicated_ipv4_followed() {
    let backend = start_tcp_echo().await;
    let env_id = EnvId::new();
    let port = closed_port().await.port();
    let ipv6 = SocketAddr::new("::1".parse().unwrap(), port);
    // A loopback address other than 127.0.0.1 replaces the allocated public address.
    let ipv4 = SocketAddr::new("127.0.0.9".parse().unwrap(), port);
    let only_ipv6 = vec![api_tcp_route(env_id, ipv6.ip(), port, backend)];
    let (tables, receiver) = watch::channel(RouteTable {
        cursor: 4,
        routes: only_ipv6.clone(),
    });
    let url = start_route_server(receiver).await;
    let client = kiln_api::Client::new(&url, TOKEN).unwrap();
    let initial = control::fetch_initial_routes(&client).await.unwrap();
    let ingress = Arc::new(
        Ingress::start(
            kiln_ingress::IngressConfig {
                listen: vec!["127.0.0.1:0".parse().unwrap()],
                ..Default::default()
            },
            &control::route_set_from_table(&initial),
        )
        .await
        .unwrap(),
    );
    assert_eq!(echo_once(ipv6).await.unwrap(), b"dedicated");
    assert!(ingress.tcp_service_addr(ipv4).is_none());
    let follower = {
        let ingress = Arc::clone(&ingress);
        tokio::spawn(async move { control::follow_routes(&client, &ingress, initial.cursor).await })
    };

    // Allocating the IPv4 address adds the same TCP route on it.
    let mut both = only_ipv6.clone();
    both.push(api_tcp_route(env_id, ipv4.ip(), port, backend));
    tables.send_replace(RouteTable {
        cursor: 6,
        routes: both,
    });
    wait_until("IPv4 listener opened", || {
        ingress.tcp_service_addr(ipv4).is_some()
    })
    .await;
    assert_eq!(echo_once(ipv4).await.unwrap(), b"dedicated");
    assert_eq!(echo_once(ipv6).await.unwrap(), b"dedicated");

    // Releasing it closes that listener only.
    tables.send_replace(RouteTable {
        cursor: 8,
        routes: only_ipv6,
    });
    wait_until("IPv4 listener closed", || {
        ingress.tcp_service_addr(ipv4).is_none()
    })
    .await;
    wait_until_async("IPv4 address refused", || async {
        tokio::net::TcpStream::connect(ipv4).await.is_err()
    })
    .await;
    assert_eq!(echo_once(ipv6).await.unwrap(), b"dedicated");
    follower.abort();
}
