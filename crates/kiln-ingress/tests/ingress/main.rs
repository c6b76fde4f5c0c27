//! Integration tests: real rustls clients and servers, and curl, through a real ingress on
//! loopback.

// Fixture helpers outside `#[test]` functions panic on setup failures, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod binary;
mod control;
mod data_path;
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kiln_core::Hostname;
use kiln_ingress::metrics::CloseReason;
use kiln_ingress::proxy_protocol::ProxyHeader;
use kiln_ingress::{Backends, Ingress, IngressConfig, Route, RouteSet};
use rustls::pki_types::ServerName;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(listen: &[&str]) -> IngressConfig {
    IngressConfig {
        listen: listen.iter().map(|a| a.parse().unwrap()).collect(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..IngressConfig::default()
    }
}

fn route(hostname: &str, backends: &[SocketAddr]) -> Route {
    Route {
        hostname: Hostname::new(hostname).unwrap(),
        backends: backends.to_vec(),
        proxy_protocol: false,
    }
}

fn routes(routes: Vec<Route>) -> RouteSet {
    RouteSet {
        routes,
        fallback: None,
        tcp_services: Vec::new(),
    }
}

#[tokio::test]
async fn sni_routes_to_matching_backend() {
    let tls = TestTls::new();
    let app = Backend::start(&tls, "app", "127.0.0.1:0", false).await;
    let shop = Backend::start(&tls, "shop", "127.0.0.1:0", false).await;
    let wild = Backend::start(&tls, "wild", "127.0.0.1:0", false).await;
    let set = routes(vec![
        route("app.example.test", &[app.addr]),
        route("shop.example.test", &[shop.addr]),
        route("*.apps.example.test", &[wild.addr]),
    ]);
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &set)
        .await
        .unwrap();
    let addr = ingress.listen_addrs()[0];

    for _ in 0..3 {
        assert_eq!(
            ask_once(&tls, addr, "app.example.test").await.unwrap(),
            "app"
        );
        assert_eq!(
            ask_once(&tls, addr, "shop.example.test").await.unwrap(),
            "shop"
        );
        assert_eq!(
            ask_once(&tls, addr, "x.apps.example.test").await.unwrap(),
            "wild"
        );
    }
    let metrics = ingress.metrics().render();
    assert!(
        metrics.contains("kiln_ingress_route_connections_total{route=\"app.example.test\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kiln_ingress_route_connections_total{route=\"*.apps.example.test\"} 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn sni_spreads_over_backends() {
    let tls = TestTls::new();
    let one = Backend::start(&tls, "one", "127.0.0.1:0", false).await;
    let two = Backend::start(&tls, "two", "127.0.0.1:0", false).await;
    let set = routes(vec![route("app.example.test", &[one.addr, two.addr])]);
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &set)
        .await
        .unwrap();
    let addr = ingress.listen_addrs()[0];

    // Least connections: while the first connection stays open, the second goes elsewhere.
    let mut first = Client::connect(&tls, addr, "app.example.test")
        .await
        .unwrap();
    let first_name = first.ask().await.unwrap();
    let mut second = Client::connect(&tls, addr, "app.example.test")
        .await
        .unwrap();
    let second_name = second.ask().await.unwrap();
    assert_ne!(first_name, second_name);
}

#[tokio::test]
async fn curl_resolve_through_ingress() {
    let tls = TestTls::new();
    let app = Backend::start(&tls, "app-backend", "127.0.0.1:0", false).await;
    let shop = Backend::start(&tls, "shop-backend", "127.0.0.1:0", false).await;
    let set = routes(vec![
        route("app.example.test", &[app.addr]),
        route("shop.example.test", &[shop.addr]),
    ]);
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &set)
        .await
        .unwrap();
    let port = ingress.listen_addrs()[0].port();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &tls.cert_pem).unwrap();

    for (host, expected) in [
        ("app.example.test", "app-backend"),
        ("shop.example.test", "shop-backend"),
    ] {
        let output = tokio::process::Command::new("curl")
            .args([
                "--silent",
                "--show-error",
                "--http1.1",
                "--max-time",
                "20",
                "--cacert",
            ])
            .arg(&ca)
            .arg("--resolve")
            .arg(format!("{host}:{port}:127.0.0.1"))
            .arg(format!("https://{host}:{port}/"))
            .output()
            .await
            .expect("curl is installed");
        assert!(
            output.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout), expected);
    }
}

#[tokio::test]
async fn hello_split_byte_by_byte() {
    let tls = TestTls::new();
    let app = Backend::start(&tls, "app", "127.0.0.1:0", false).await;
    let set = routes(vec![route("app.example.test", &[app.addr])]);
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &set)
        .await
        .unwrap();

    let tcp = TcpStream::connect(ingress.listen_addrs()[0]).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = ServerName::try_from("app.example.test").unwrap();
    let mut stream = tls
        .client()
        .connect(name, OneByteWrites(tcp))
        .await
        .unwrap();
    stream.write_all(b"who\n").await.unwrap();
    let mut answer = [0u8; 4];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"app\n");
}

#[tokio::test]
async fn post_quantum_hello_in_small_records() {
    // A rustls post-quantum hello (1.4 KiB) re-sent in 100-byte segments: the ingress must
    // reassemble it and forward it unchanged.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let set = routes(vec![route("pq.example.test", &[backend])]);
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &set)
        .await
        .unwrap();

    let mut client = TcpStream::connect(ingress.listen_addrs()[0]).await.unwrap();
    client.set_nodelay(true).unwrap();
    for chunk in RUSTLS_PQ_HELLO.chunks(100) {
        client.write_all(chunk).await.unwrap();
        client.flush().await.unwrap();
    }
    let (mut accepted, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut received = vec![0u8; RUSTLS_PQ_HELLO.len()];
    tokio::time::timeout(WAIT, accepted.read_exact(&mut received))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(received, RUSTLS_PQ_HELLO);
}

#[tokio::test]
async fn no_sni_closed_without_fallback() {
    let tls = TestTls::new();
    let app = Backend::start(&tls, "app", "127.0.0.1:0", false).await;
    let set = routes(vec![route("app.example.test", &[app.addr])]);
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &set)
        .await
        .unwrap();

    // rustls sends no SNI when the server name is an IP address.
    let result = ask_once(&tls, ingress.listen_addrs()[0], "127.0.0.1").await;
    assert!(result.is_err(), "connection without SNI must be closed");
    wait_until("no_sni counted", || {
        ingress.metrics().errors(CloseReason::NoSni) == 1
    })
    .await;
}

#[tokio::test]
async fn unknown_sni_closed_without_fallback() {
    let tls = TestTls::new();
    let app = Backend::start(&tls, "app", "127.0.0.1:0", false).await;
    let set = routes(vec![route("app.example.test", &[app.addr])]);
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &set)
        .await
        .unwrap();

    let result = ask_once(&tls, ingress.listen_addrs()[0], "unknown.example.test").await;
    assert!(
        result.is_err(),
        "connection with an unknown SNI must be closed"
    );
    wait_until("unknown_sni counted", || {
        ingress.metrics().errors(CloseReason::UnknownSni) == 1
    })
    .await;
}

#[tokio::test]
async fn fallback_takes_no_and_unknown_sni() {
    let tls = TestTls::new();
    let app = Backend::start(&tls, "app", "127.0.0.1:0", false).await;
    let fallback = Backend::start(&tls, "fallback", "127.0.0.1:0", false).await;
    let set = RouteSet {
        routes: vec![route("app.example.test", &[app.addr])],
        fallback: Some(Backends {
            backends: vec![fallback.addr],
            proxy_protocol: false,
        }),
        tcp_services: Vec::new(),
    };
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &set)
        .await
        .unwrap();
    let addr = ingress.listen_addrs()[0];

    assert_eq!(
        ask_once(&tls, addr, "unknown.example.test").await.unwrap(),
        "fallback"
    );
    // Without SNI the client cannot verify a hostname certificate, so check the bytes reach
    // the fallback backend raw: it answers the hello with a TLS alert or handshake record.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(include_bytes!("../fixtures/rustls-no-sni.bin"))
        .await
        .unwrap();
    let mut first = [0u8; 1];
    tokio::time::timeout(WAIT, raw.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert!(
        first[0] == 22 || first[0] == 21,
        "TLS record type {}",
        first[0]
    );
    assert_eq!(
        ask_once(&tls, addr, "app.example.test").await.unwrap(),
        "app"
    );
    assert_eq!(ingress.metrics().errors(CloseReason::NoSni), 0);
    assert_eq!(ingress.metrics().errors(CloseReason::UnknownSni), 0);
}

#[tokio::test]
async fn hello_above_cap_closed() {
    let backend = closed_port().await;
    let set = routes(vec![route("pq.example.test", &[backend])]);
    let ingress = Ingress::start(
        IngressConfig {
            client_hello_max_bytes: 1024,
            ..config(&["127.0.0.1:0"])
        },
        &set,
    )
    .await
    .unwrap();

    let mut client = TcpStream::connect(ingress.listen_addrs()[0]).await.unwrap();
    // The write may fail once the ingress has closed; only the close matters.
    let _ = client.write_all(RUSTLS_PQ_HELLO).await;
    wait_for_close(&mut client).await;
    wait_until("too-large counted", || {
        ingress.metrics().errors(CloseReason::ClientHelloTooLarge) == 1
    })
    .await;
    assert_eq!(
        ingress.metrics().errors(CloseReason::ConnectFailed),
        0,
        "no backend was tried"
    );
}

#[tokio::test]
async fn slow_client_times_out() {
    let tls = TestTls::new();
    let app = Backend::start(&tls, "app", "127.0.0.1:0", false).await;
    let set = routes(vec![route("app.example.test", &[app.addr])]);
    let ingress = Ingress::start(
        IngressConfig {
            client_hello_timeout_ms: 300,
            ..config(&["127.0.0.1:0"])
        },
        &set,
    )
    .await
    .unwrap();

    let mut client = TcpStream::connect(ingress.listen_addrs()[0]).await.unwrap();
    client
        .write_all(&CURL_HELLO[..CURL_HELLO.len() / 2])
        .await
        .unwrap();
    wait_for_close(&mut client).await;
    wait_until("timeout counted", || {
        ingress.metrics().errors(CloseReason::ClientHelloTimeout) == 1
    })
    .await;
}

#[tokio::test]
async fn garbage_closed_as_malformed() {
    let set = routes(vec![]);
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &set)
        .await
        .unwrap();
    let mut client = TcpStream::connect(ingress.listen_addrs()[0]).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: app.example.test\r\n\r\n")
        .await
        .unwrap();
    wait_for_close(&mut client).await;
    wait_until("malformed counted", || {
        ingress.metrics().errors(CloseReason::ClientHelloMalformed) == 1
    })
    .await;
}

#[tokio::test]
async fn backend_down_uses_other() {
    let tls = TestTls::new();
    let live = Backend::start(&tls, "live", "127.0.0.1:0", false).await;
    let dead = closed_port().await;
    let set = routes(vec![route("app.example.test", &[dead, live.addr])]);
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &set)
        .await
        .unwrap();
    let addr = ingress.listen_addrs()[0];

    for _ in 0..10 {
        assert_eq!(
            ask_once(&tls, addr, "app.example.test").await.unwrap(),
            "live"
        );
    }
    assert_eq!(ingress.metrics().errors(CloseReason::ConnectFailed), 0);
    let metrics = ingress.metrics().render();
    assert!(
        metrics.contains(
            "kiln_ingress_route_connect_attempts_failed_total{route=\"app.example.test\"} 1"
        ),
        "the dead backend is tried once, then cools down: {metrics}"
    );
}

#[tokio::test]
async fn all_backends_down_counted() {
    let tls = TestTls::new();
    let set = routes(vec![
        route(
            "app.example.test",
            &[closed_port().await, closed_port().await],
        ),
        route("shop.example.test", &[]),
    ]);
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &set)
        .await
        .unwrap();
    let addr = ingress.listen_addrs()[0];

    assert!(ask_once(&tls, addr, "app.example.test").await.is_err());
    assert!(ask_once(&tls, addr, "shop.example.test").await.is_err());
    wait_until("connect_failed counted", || {
        ingress.metrics().errors(CloseReason::ConnectFailed) == 1
    })
    .await;
    wait_until("no_healthy_backend counted", || {
        ingress.metrics().errors(CloseReason::NoHealthyBackend) == 1
    })
    .await;
}

#[tokio::test]
async fn route_change_under_load_drops_nothing() {
    let tls = Arc::new(TestTls::new());
    let blue = Backend::start(&tls, "blue", "127.0.0.1:0", false).await;
    let green = Backend::start(&tls, "green", "127.0.0.1:0", false).await;
    let to_blue = routes(vec![route("app.example.test", &[blue.addr])]);
    let to_green = routes(vec![route("app.example.test", &[green.addr])]);
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &to_blue)
        .await
        .unwrap();
    let addr = ingress.listen_addrs()[0];

    // A long-lived connection opened before the changes must keep working through them.
    let mut long_lived = Client::connect(&tls, addr, "app.example.test")
        .await
        .unwrap();
    assert_eq!(long_lived.ask().await.unwrap(), "blue");

    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (tls, stop, completed) = (Arc::clone(&tls), Arc::clone(&stop), Arc::clone(&completed));
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match ask_once(&tls, addr, "app.example.test").await {
                    Ok(name) if name == "blue" || name == "green" => {}
                    other => failures.push(format!("{other:?}")),
                }
                completed.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }

    for round in 0..20u64 {
        let set = if round % 2 == 0 { &to_green } else { &to_blue };
        ingress.apply_routes(set).unwrap();
        // Let at least a few connections run against each table.
        let target = completed.load(Ordering::Relaxed) + 5;
        wait_until("connections under the new routes", || {
            completed.load(Ordering::Relaxed) >= target
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);

    for worker in workers {
        let failures = worker.await.unwrap();
        assert!(failures.is_empty(), "failed connections: {failures:?}");
    }
    assert_eq!(
        long_lived.ask().await.unwrap(),
        "blue",
        "open connection keeps its backend"
    );
    assert_eq!(
        ask_once(&tls, addr, "app.example.test").await.unwrap(),
        "blue"
    );
}

#[tokio::test]
async fn proxy_v2_header_reaches_backend() {
    let tls = TestTls::new();
    let backend = Backend::start(&tls, "app", "127.0.0.1:0", true).await;
    let set = routes(vec![Route {
        proxy_protocol: true,
        ..route("app.example.test", &[backend.addr])
    }]);
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &set)
        .await
        .unwrap();
    let ingress_addr = ingress.listen_addrs()[0];

    let tcp = TcpStream::connect(ingress_addr).await.unwrap();
    let client_addr = tcp.local_addr().unwrap();
    let name = ServerName::try_from("app.example.test").unwrap();
    let mut stream = tls.client().connect(name, tcp).await.unwrap();
    stream.write_all(b"who\n").await.unwrap();
    let mut answer = [0u8; 4];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"app\n");

    let headers = backend.proxy_headers.lock().unwrap().clone();
    assert_eq!(
        headers,
        vec![ProxyHeader::Proxy {
            client: client_addr,
            destination: ingress_addr
        }]
    );
}

#[tokio::test]
async fn ipv6_and_ipv4_listeners() {
    let tls = TestTls::new();
    let v6_backend = Backend::start(&tls, "v6", "[::1]:0", false).await;
    let v4_backend = Backend::start(&tls, "v4", "127.0.0.1:0", false).await;
    let set = routes(vec![
        route("app.example.test", &[v6_backend.addr]),
        route("shop.example.test", &[v4_backend.addr]),
    ]);
    let ingress = Ingress::start(config(&["[::1]:0", "127.0.0.1:0"]), &set)
        .await
        .unwrap();
    let (v6, v4) = (ingress.listen_addrs()[0], ingress.listen_addrs()[1]);
    assert!(v6.is_ipv6());
    assert!(v4.is_ipv4());

    for listener in [v6, v4] {
        assert_eq!(
            ask_once(&tls, listener, "app.example.test").await.unwrap(),
            "v6"
        );
        assert_eq!(
            ask_once(&tls, listener, "shop.example.test").await.unwrap(),
            "v4"
        );
    }
}

#[tokio::test]
async fn same_port_on_both_families() {
    let tls = TestTls::new();
    let backend = Backend::start(&tls, "app", "127.0.0.1:0", false).await;
    let set = routes(vec![route("app.example.test", &[backend.addr])]);
    let first = Ingress::start(config(&["[::]:0"]), &set).await.unwrap();
    let port = first.listen_addrs()[0].port();
    // IPv6 listeners are IPv6-only, so IPv4 can take the same port.
    let second = Ingress::start(config(&[&format!("127.0.0.1:{port}")]), &set)
        .await
        .unwrap();
    assert_eq!(second.listen_addrs()[0].port(), port);
    assert_eq!(
        ask_once(&tls, second.listen_addrs()[0], "app.example.test")
            .await
            .unwrap(),
        "app"
    );
}

#[tokio::test]
async fn client_limit_per_address() {
    let tls = TestTls::new();
    let backend = Backend::start(&tls, "app", "127.0.0.1:0", false).await;
    let set = routes(vec![route("app.example.test", &[backend.addr])]);
    let ingress = Ingress::start(
        IngressConfig {
            max_connections_per_client: 2,
            ..config(&["127.0.0.1:0"])
        },
        &set,
    )
    .await
    .unwrap();
    let addr = ingress.listen_addrs()[0];

    let mut first = Client::connect(&tls, addr, "app.example.test")
        .await
        .unwrap();
    let mut second = Client::connect(&tls, addr, "app.example.test")
        .await
        .unwrap();
    assert!(
        ask_once(&tls, addr, "app.example.test").await.is_err(),
        "third connection is over the limit"
    );
    wait_until("client_limit counted", || {
        ingress.metrics().errors(CloseReason::ClientLimit) == 1
    })
    .await;
    assert_eq!(first.ask().await.unwrap(), "app");
    assert_eq!(second.ask().await.unwrap(), "app");

    drop(first);
    wait_until("slot released", || {
        ingress.metrics().active.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(
        ask_once(&tls, addr, "app.example.test").await.unwrap(),
        "app"
    );
}

#[tokio::test]
async fn idle_connection_closed() {
    let tls = TestTls::new();
    let backend = Backend::start(&tls, "app", "127.0.0.1:0", false).await;
    let set = routes(vec![route("app.example.test", &[backend.addr])]);
    let ingress = Ingress::start(
        IngressConfig {
            idle_timeout_secs: 1,
            ..config(&["127.0.0.1:0"])
        },
        &set,
    )
    .await
    .unwrap();

    let mut client = Client::connect(&tls, ingress.listen_addrs()[0], "app.example.test")
        .await
        .unwrap();
    assert_eq!(client.ask().await.unwrap(), "app");
    wait_until("idle_timeout counted", || {
        ingress.metrics().errors(CloseReason::IdleTimeout) == 1
    })
    .await;
    assert!(client.ask().await.is_err(), "idle connection is closed");
}

#[tokio::test]
async fn half_close_delivers_response() {
    // A raw backend that reads until the client's FIN, then answers with the byte count:
    // the answer only arrives if the ingress forwards the FIN and keeps the other way open.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut received = Vec::new();
        stream.read_to_end(&mut received).await.unwrap();
        stream
            .write_all(format!("{}", received.len()).as_bytes())
            .await
            .unwrap();
    });
    let set = routes(vec![route("app.example.test", &[backend])]);
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &set)
        .await
        .unwrap();

    let mut client = TcpStream::connect(ingress.listen_addrs()[0]).await.unwrap();
    client.write_all(CURL_HELLO).await.unwrap();
    client.write_all(&[7u8; 100_000]).await.unwrap();
    client.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, client.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, (CURL_HELLO.len() + 100_000).to_string());
}

#[tokio::test]
async fn drain_lets_open_connections_finish() {
    let tls = TestTls::new();
    let backend = Backend::start(&tls, "app", "127.0.0.1:0", false).await;
    let set = routes(vec![route("app.example.test", &[backend.addr])]);
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &set)
        .await
        .unwrap();
    let addr = ingress.listen_addrs()[0];

    let mut open = Client::connect(&tls, addr, "app.example.test")
        .await
        .unwrap();
    let shutdown = tokio::spawn(ingress.shutdown());
    wait_until("listener closed", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    assert_eq!(
        open.ask().await.unwrap(),
        "app",
        "open connection still served while draining"
    );
    drop(open);
    let report = tokio::time::timeout(WAIT, shutdown).await.unwrap().unwrap();
    assert_eq!(report.closed_at_deadline, 0);
}

#[tokio::test]
async fn drain_deadline_closes_connections() {
    let tls = TestTls::new();
    let backend = Backend::start(&tls, "app", "127.0.0.1:0", false).await;
    let set = routes(vec![route("app.example.test", &[backend.addr])]);
    let ingress = Ingress::start(
        IngressConfig {
            drain_timeout_secs: 1,
            ..config(&["127.0.0.1:0"])
        },
        &set,
    )
    .await
    .unwrap();
    let mut open = Client::connect(&tls, ingress.listen_addrs()[0], "app.example.test")
        .await
        .unwrap();
    assert_eq!(open.ask().await.unwrap(), "app");

    let report = tokio::time::timeout(WAIT, ingress.shutdown())
        .await
        .unwrap();
    assert_eq!(report.closed_at_deadline, 1);
    assert!(
        open.ask().await.is_err(),
        "connection closed at the deadline"
    );
}

#[tokio::test]
async fn metrics_endpoint_serves_prometheus_text() {
    let tls = TestTls::new();
    let backend = Backend::start(&tls, "app", "127.0.0.1:0", false).await;
    let set = routes(vec![route("app.example.test", &[backend.addr])]);
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &set)
        .await
        .unwrap();
    assert_eq!(
        ask_once(&tls, ingress.listen_addrs()[0], "app.example.test")
            .await
            .unwrap(),
        "app"
    );
    let _ = ask_once(&tls, ingress.listen_addrs()[0], "unknown.example.test").await;
    wait_until("unknown_sni counted", || {
        ingress.metrics().errors(CloseReason::UnknownSni) == 1
    })
    .await;

    let body = http_get(ingress.metrics_addr().unwrap(), "/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(
        body.contains("kiln_ingress_errors_total{reason=\"unknown_sni\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("kiln_ingress_route_connections_total{route=\"app.example.test\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("# TYPE kiln_ingress_route_bytes_to_client_total counter"),
        "{body}"
    );
    assert!(
        http_get(ingress.metrics_addr().unwrap(), "/other")
            .await
            .starts_with("HTTP/1.1 404")
    );
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: metrics\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    response
}

/// Starts a raw TCP backend that expects a PROXY v2 header, records it, then echoes bytes.
async fn start_echo_backend() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<ProxyHeader>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let sender = sender.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                let (header, len) = loop {
                    let n = stream.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "connection closed before the PROXY header");
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(parsed) = kiln_ingress::proxy_protocol::parse_v2(&buf).unwrap() {
                        break parsed;
                    }
                };
                sender.send(header).unwrap();
                stream.write_all(&buf[len..]).await.unwrap();
                let (mut read, mut write) = stream.split();
                tokio::io::copy(&mut read, &mut write).await.unwrap();
            });
        }
    });
    (addr, receiver)
}

fn tcp_service(listen: SocketAddr, backend: SocketAddr) -> kiln_ingress::TcpService {
    kiln_ingress::TcpService {
        listen,
        backends: vec![backend],
        proxy_protocol: true,
    }
}

#[tokio::test]
async fn tcp_service_forwards_without_sni() {
    let (backend, mut headers) = start_echo_backend().await;
    let listen = closed_port().await;
    let set = RouteSet {
        tcp_services: vec![tcp_service(listen, backend)],
        ..RouteSet::default()
    };
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &set)
        .await
        .unwrap();
    assert_eq!(ingress.tcp_service_addr(listen), Some(listen));

    let mut client = TcpStream::connect(listen).await.unwrap();
    let client_addr = client.local_addr().unwrap();
    client.write_all(b"not TLS at all\n").await.unwrap();
    let mut echo = [0u8; 15];
    tokio::time::timeout(WAIT, client.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"not TLS at all\n");
    let header = tokio::time::timeout(WAIT, headers.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        header,
        ProxyHeader::Proxy {
            client: client_addr,
            destination: listen
        }
    );
    let metrics = ingress.metrics().render();
    assert!(
        metrics.contains(&format!(
            "kiln_ingress_route_connections_total{{route=\"tcp:{listen}\"}} 1"
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn tcp_service_listener_follows_routes() {
    let (backend, _headers) = start_echo_backend().await;
    let listen = closed_port().await;
    let without = RouteSet::default();
    let with = RouteSet {
        tcp_services: vec![tcp_service(listen, backend)],
        ..RouteSet::default()
    };
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &without)
        .await
        .unwrap();
    assert!(
        TcpStream::connect(listen).await.is_err(),
        "no listener before the service exists"
    );

    ingress.apply_routes(&with).unwrap();
    let mut open = TcpStream::connect(listen).await.unwrap();
    open.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(WAIT, open.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();

    ingress.apply_routes(&without).unwrap();
    wait_until("listener closed", || {
        std::net::TcpStream::connect(listen).is_err()
    })
    .await;
    open.write_all(b"pong").await.unwrap();
    tokio::time::timeout(WAIT, open.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        &echo, b"pong",
        "open connection survives the service's removal"
    );
}

#[tokio::test]
async fn tcp_service_binds_unconfigured_address() {
    // A dedicated address may reach the host after the listener opens: IP_FREEBIND allows it.
    let listen: SocketAddr = "[fd00:6b69:6c6e:ffff::99]:5432".parse().unwrap();
    let set = RouteSet {
        tcp_services: vec![tcp_service(listen, closed_port().await)],
        ..RouteSet::default()
    };
    let ingress = Ingress::start(config(&["127.0.0.1:0"]), &set)
        .await
        .unwrap();
    assert_eq!(ingress.tcp_service_addr(listen), Some(listen));
}

#[tokio::test]
async fn tcp_service_on_sni_listener_rejected() {
    let port = closed_port().await.port();
    let sni_listen = format!("127.0.0.1:{port}");
    let ingress = Ingress::start(config(&[&sni_listen]), &RouteSet::default())
        .await
        .unwrap();
    let set = RouteSet {
        tcp_services: vec![tcp_service(
            sni_listen.parse().unwrap(),
            closed_port().await,
        )],
        ..RouteSet::default()
    };
    let error = ingress.apply_routes(&set).unwrap_err();
    assert!(
        matches!(error, kiln_ingress::ApplyError::ListenConflict { .. }),
        "{error}"
    );
    assert_eq!(ingress.metrics().reloads_failed.load(Ordering::Relaxed), 1);
}
