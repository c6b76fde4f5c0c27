//! The data path after the ClientHello, run on both `splice` and `copy`: large transfers
//! both ways, half-close in each direction, the idle timeout, and the byte counters.

use std::net::SocketAddr;

use kiln_ingress::metrics::CloseReason;
use kiln_ingress::{DataPath, Ingress, IngressConfig, Route, RouteSet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::support::{CURL_HELLO, WAIT, wait_until};

const HOSTNAME: &str = "app.example.test";
const PATHS: [DataPath; 2] = [DataPath::Splice, DataPath::Copy];

async fn start_ingress(data_path: DataPath, backend: SocketAddr, idle_secs: u64) -> Ingress {
    let config = IngressConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        data_path,
        idle_timeout_secs: idle_secs,
        ..IngressConfig::default()
    };
    let routes = RouteSet {
        routes: vec![Route {
            hostname: kiln_core::Hostname::new(HOSTNAME).unwrap(),
            backends: vec![backend],
            proxy_protocol: false,
        }],
        ..RouteSet::default()
    };
    Ingress::start(config, &routes).await.unwrap()
}

/// Deterministic bytes that differ at every offset modulo 251, so a lost, repeated or
/// reordered chunk changes the content.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ seed)
        .collect::<Vec<u8>>()
}

/// Accepts one connection and hands it to the test.
async fn one_connection_backend() -> (SocketAddr, oneshot::Receiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sender, receiver) = oneshot::channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let _ = sender.send(stream);
    });
    (addr, receiver)
}

async fn read_exact_len(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    tokio::time::timeout(WAIT, stream.read_exact(&mut buf))
        .await
        .expect("timed out reading")
        .unwrap();
    buf
}

async fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut buf))
        .await
        .expect("timed out reading to end of stream")
        .unwrap();
    buf
}

#[tokio::test]
async fn large_transfer_both_ways() {
    const UP: usize = 6 * 1024 * 1024 + 7;
    const DOWN: usize = 8 * 1024 * 1024 + 13;

    for data_path in PATHS {
        let (backend_addr, backend) = one_connection_backend().await;
        let ingress = start_ingress(data_path, backend_addr, 600).await;
        let mut client = TcpStream::connect(ingress.listen_addrs()[0]).await.unwrap();

        // Both directions run at once, so a path that serializes them would deadlock once
        // the socket buffers fill, and the bounded reads would fail.
        let client_task = tokio::spawn(async move {
            client.write_all(CURL_HELLO).await.unwrap();
            let (mut read, mut write) = client.split();
            let send = async {
                write.write_all(&pattern(UP, 0x5a)).await.unwrap();
                write.shutdown().await.unwrap();
            };
            let receive = async {
                let mut received = Vec::new();
                read.read_to_end(&mut received).await.unwrap();
                received
            };
            let ((), received) = tokio::time::timeout(WAIT, async { tokio::join!(send, receive) })
                .await
                .expect("client transfer timed out");
            received
        });
        let mut backend = tokio::time::timeout(WAIT, backend).await.unwrap().unwrap();
        let hello = read_exact_len(&mut backend, CURL_HELLO.len()).await;
        assert_eq!(
            hello, CURL_HELLO,
            "{data_path:?}: ClientHello bytes changed"
        );
        let (mut read, mut write) = backend.split();
        let send = async {
            write.write_all(&pattern(DOWN, 0xa5)).await.unwrap();
            write.shutdown().await.unwrap();
        };
        let receive = async {
            let mut received = Vec::new();
            read.read_to_end(&mut received).await.unwrap();
            received
        };
        let ((), from_client) = tokio::time::timeout(WAIT, async { tokio::join!(send, receive) })
            .await
            .expect("backend transfer timed out");
        let to_client = client_task.await.unwrap();

        assert_eq!(from_client.len(), UP, "{data_path:?}: bytes to backend");
        assert!(
            from_client == pattern(UP, 0x5a),
            "{data_path:?}: bytes to backend changed"
        );
        assert_eq!(to_client.len(), DOWN, "{data_path:?}: bytes to client");
        assert!(
            to_client == pattern(DOWN, 0xa5),
            "{data_path:?}: bytes to client changed"
        );

        let route = ingress.metrics().route(HOSTNAME);
        wait_until("connection counted as closed", || {
            route.active.load(std::sync::atomic::Ordering::Relaxed) == 0
        })
        .await;
        assert_eq!(
            route
                .bytes_from_client
                .load(std::sync::atomic::Ordering::Relaxed),
            (CURL_HELLO.len() + UP) as u64,
            "{data_path:?}: bytes_from_client counter"
        );
        assert_eq!(
            route
                .bytes_to_client
                .load(std::sync::atomic::Ordering::Relaxed),
            DOWN as u64,
            "{data_path:?}: bytes_to_client counter"
        );
        let rendered = ingress.metrics().render();
        assert!(
            rendered.contains(&format!(
                "kiln_ingress_route_bytes_to_client_total{{route=\"{HOSTNAME}\"}} {DOWN}"
            )),
            "{data_path:?}: rendered metrics lack the byte count:\n{rendered}"
        );
    }
}

#[tokio::test]
async fn client_half_close_keeps_response() {
    for data_path in PATHS {
        let (backend_addr, backend) = one_connection_backend().await;
        let ingress = start_ingress(data_path, backend_addr, 600).await;
        let mut client = TcpStream::connect(ingress.listen_addrs()[0]).await.unwrap();
        client.write_all(CURL_HELLO).await.unwrap();
        client.write_all(&pattern(300_000, 1)).await.unwrap();
        client.shutdown().await.unwrap();

        // The backend reads end of stream only if the ingress forwarded the client's FIN.
        // It then replies on the direction that is still open.
        let mut backend = tokio::time::timeout(WAIT, backend).await.unwrap().unwrap();
        let received = read_to_end(&mut backend).await;
        assert_eq!(received.len(), CURL_HELLO.len() + 300_000, "{data_path:?}");
        backend
            .write_all(format!("got {}", received.len()).as_bytes())
            .await
            .unwrap();
        backend.shutdown().await.unwrap();

        let answer = read_to_end(&mut client).await;
        assert_eq!(
            String::from_utf8(answer).unwrap(),
            format!("got {}", received.len()),
            "{data_path:?}"
        );
    }
}

#[tokio::test]
async fn backend_half_close_keeps_request() {
    for data_path in PATHS {
        let (backend_addr, backend) = one_connection_backend().await;
        let ingress = start_ingress(data_path, backend_addr, 600).await;
        let mut client = TcpStream::connect(ingress.listen_addrs()[0]).await.unwrap();
        client.write_all(CURL_HELLO).await.unwrap();

        let mut backend = tokio::time::timeout(WAIT, backend).await.unwrap().unwrap();
        read_exact_len(&mut backend, CURL_HELLO.len()).await;
        backend.write_all(&pattern(200_000, 2)).await.unwrap();
        backend.shutdown().await.unwrap();

        // The client sees the backend's FIN, then still sends on its open direction.
        let received = read_to_end(&mut client).await;
        assert_eq!(received, pattern(200_000, 2), "{data_path:?}");
        client.write_all(&pattern(150_000, 3)).await.unwrap();
        client.shutdown().await.unwrap();

        let late = read_to_end(&mut backend).await;
        assert_eq!(late.len(), 150_000, "{data_path:?}");
        assert!(late == pattern(150_000, 3), "{data_path:?}: bytes changed");
    }
}

#[tokio::test]
async fn idle_timeout_closes_both_sides() {
    for data_path in PATHS {
        let (backend_addr, backend) = one_connection_backend().await;
        let ingress = start_ingress(data_path, backend_addr, 1).await;
        let mut client = TcpStream::connect(ingress.listen_addrs()[0]).await.unwrap();
        client.write_all(CURL_HELLO).await.unwrap();
        let mut backend = tokio::time::timeout(WAIT, backend).await.unwrap().unwrap();
        read_exact_len(&mut backend, CURL_HELLO.len()).await;

        // Nothing moves, so the ingress closes both sockets after the idle timeout.
        assert!(read_to_end(&mut client).await.is_empty(), "{data_path:?}");
        assert!(read_to_end(&mut backend).await.is_empty(), "{data_path:?}");
        assert_eq!(
            ingress.metrics().errors(CloseReason::IdleTimeout),
            1,
            "{data_path:?}"
        );
    }
}

#[tokio::test]
async fn backend_reset_ends_connection() {
    for data_path in PATHS {
        let (backend_addr, backend) = one_connection_backend().await;
        let ingress = start_ingress(data_path, backend_addr, 600).await;
        let mut client = TcpStream::connect(ingress.listen_addrs()[0]).await.unwrap();
        client.write_all(CURL_HELLO).await.unwrap();
        let mut backend = tokio::time::timeout(WAIT, backend).await.unwrap().unwrap();
        read_exact_len(&mut backend, CURL_HELLO.len()).await;

        // Linger 0 makes the close a reset, which must end the client's side too.
        socket2::SockRef::from(&backend)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(backend);
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(WAIT, client.read(&mut buf))
            .await
            .expect("client not closed after the backend reset");
        assert!(matches!(read, Ok(0) | Err(_)), "{data_path:?}: {read:?}");
        wait_until("connection closed", || {
            ingress
                .metrics()
                .active
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0
        })
        .await;
    }
}
