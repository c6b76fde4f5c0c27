//! Test fixtures: TLS backends and clients on loopback, and bounded waits.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use kiln_ingress::proxy_protocol::{self, ProxyHeader};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Upper bound for any single wait in these tests.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// Hostnames on the test certificate.
pub(crate) const CERT_NAMES: &[&str] = &[
    "app.example.test",
    "shop.example.test",
    "*.apps.example.test",
    "unknown.example.test",
    "fallback.example.test",
];

/// A self-signed certificate for [`CERT_NAMES`], trusted by [`TestTls::client`].
pub(crate) struct TestTls {
    pub(crate) cert_pem: String,
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl TestTls {
    pub(crate) fn new() -> Self {
        let names: Vec<String> = CERT_NAMES.iter().map(|n| (*n).to_owned()).collect();
        let certified = rcgen::generate_simple_self_signed(names).unwrap();
        Self {
            cert_pem: certified.cert.pem(),
            cert: certified.cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()),
        }
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        let config = rustls::ServerConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )
            .unwrap();
        TlsAcceptor::from(Arc::new(config))
    }

    pub(crate) fn client(&self) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

/// The ring crypto provider, deprecated in rustls 0.23 only for lacking post-quantum groups,
/// which these tests do not need.
#[allow(deprecated)]
fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS backend that answers each request line with its own name, and an HTTP GET with
/// a 200 response whose body is its name (for curl).
pub(crate) struct Backend {
    pub(crate) addr: SocketAddr,
    /// PROXY headers received, when the backend expects them.
    pub(crate) proxy_headers: Arc<Mutex<Vec<ProxyHeader>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub(crate) async fn start(
        tls: &TestTls,
        name: &str,
        bind: &str,
        expect_proxy_header: bool,
    ) -> Self {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tls.acceptor();
        let proxy_headers = Arc::new(Mutex::new(Vec::new()));
        let headers = Arc::clone(&proxy_headers);
        let name = name.to_owned();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let name = name.clone();
                let headers = Arc::clone(&headers);
                tokio::spawn(async move {
                    if expect_proxy_header {
                        let Some(header) = read_proxy_header(&mut stream).await else {
                            return;
                        };
                        headers.lock().unwrap().push(header);
                    }
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    serve_lines(tls, &name).await;
                });
            }
        });
        Self {
            addr,
            proxy_headers,
            task,
        }
    }
}

/// Reads exactly one PROXY v2 header, byte by byte so no TLS byte is consumed.
async fn read_proxy_header(stream: &mut TcpStream) -> Option<ProxyHeader> {
    let mut buf = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.ok()?;
        buf.push(byte[0]);
        match proxy_protocol::parse_v2(&buf) {
            Ok(Some((header, _))) => return Some(header),
            Ok(None) => continue,
            Err(_) => return None,
        }
    }
}

async fn serve_lines<S: AsyncRead + AsyncWrite + Unpin>(stream: S, name: &str) {
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = tokio::io::BufReader::new(read);
    loop {
        let mut line = String::new();
        match tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.starts_with("GET ") {
            // Skip the rest of the request head, then answer and close, as HTTP/1.0 would.
            loop {
                let mut header = String::new();
                match tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut header).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) if header == "\r\n" => break,
                    Ok(_) => {}
                }
            }
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
                name.len()
            );
            let _ = write.write_all(response.as_bytes()).await;
            let _ = write.shutdown().await;
            return;
        }
        if write
            .write_all(format!("{name}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// A TLS client connection through the ingress.
pub(crate) struct Client {
    stream: tokio::io::BufReader<tokio_rustls::client::TlsStream<TcpStream>>,
}

impl Client {
    /// Connects and completes the TLS handshake with `server_name` (an IP address sends no SNI).
    pub(crate) async fn connect(
        tls: &TestTls,
        addr: SocketAddr,
        server_name: &str,
    ) -> std::io::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(server_name.to_owned()).unwrap();
        let stream = tokio::time::timeout(WAIT, tls.client().connect(name, tcp))
            .await
            .expect("TLS handshake within the wait bound")?;
        Ok(Self {
            stream: tokio::io::BufReader::new(stream),
        })
    }

    /// Sends a line and returns the backend's answer (its name).
    pub(crate) async fn ask(&mut self) -> std::io::Result<String> {
        self.stream.get_mut().write_all(b"who\n").await?;
        let mut line = String::new();
        let read = tokio::io::AsyncBufReadExt::read_line(&mut self.stream, &mut line);
        let n = tokio::time::timeout(WAIT, read)
            .await
            .expect("answer within the wait bound")?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end().to_owned())
    }
}

/// Connects, asks once, and returns the answering backend's name.
pub(crate) async fn ask_once(
    tls: &TestTls,
    addr: SocketAddr,
    server_name: &str,
) -> std::io::Result<String> {
    Client::connect(tls, addr, server_name).await?.ask().await
}

/// A TCP stream that sends one byte per write, so with TCP_NODELAY each byte tends to leave
/// in its own segment.
pub(crate) struct OneByteWrites(pub TcpStream);

impl AsyncRead for OneByteWrites {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for OneByteWrites {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let len = buf.len().min(1);
        Pin::new(&mut self.0).poll_write(cx, &buf[..len])
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Waits until `stream` is closed by the peer (EOF or reset), bounded by [`WAIT`].
pub(crate) async fn wait_for_close(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let closed = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(WAIT, closed)
        .await
        .expect("connection closed within the wait bound");
}

/// Polls `condition` every 20 ms until it holds, bounded by [`WAIT`].
pub(crate) async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let poll = async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(WAIT, poll).await.is_err() {
        panic!("timed out after {WAIT:?} waiting for {what}");
    }
}

/// An address on which nothing listens: a port bound and released again.
pub(crate) async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Captured ClientHellos from `tests/fixtures`.
pub(crate) const RUSTLS_PQ_HELLO: &[u8] = include_bytes!("../fixtures/rustls-pq.bin");
pub(crate) const CURL_HELLO: &[u8] = include_bytes!("../fixtures/curl.bin");

/// Polls the async `condition` every 20 ms until it holds, bounded by [`WAIT`].
pub(crate) async fn wait_until_async<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let poll = async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(WAIT, poll).await.is_err() {
        panic!("timed out after {WAIT:?} waiting for {what}");
    }
}
