//! Health checks (TCP connect or HTTP GET) and the explanation of a failure in the user's
//! terms, from the sockets the guest listens on.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kiln_api::types::{HealthCheck, HealthCheckKind};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::runtime::ListeningSocket;

/// Timings used when a service has no health check of its own.
pub const DEFAULT_CHECK: HealthCheck = HealthCheck {
    kind: HealthCheckKind::Tcp,
    interval_secs: 2,
    timeout_secs: 2,
    grace_period_secs: 30,
};

/// Longest HTTP status line read from a health endpoint.
const MAX_STATUS_LINE: usize = 1024;

/// Why one probe failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeFailure {
    /// The connection was refused or reset.
    #[error("connection to {target} failed: {reason}")]
    Connect {
        /// The probed address.
        target: SocketAddr,
        /// The operating system's message.
        reason: String,
    },
    /// No answer within the timeout.
    #[error("no answer from {target} within {timeout:?}")]
    Timeout {
        /// The probed address.
        target: SocketAddr,
        /// The timeout.
        timeout: Duration,
    },
    /// The TLS handshake of an HTTPS check failed.
    #[error(
        "TLS handshake with {target} failed: {reason}; if the app serves plain HTTP, set tls = false in the health check"
    )]
    Tls {
        /// The probed address.
        target: SocketAddr,
        /// The TLS library's message.
        reason: String,
    },
    /// The HTTP response did not have the expected status.
    #[error("GET {path} on {target} returned {status_line:?}, expected {expected}")]
    HttpStatus {
        /// The probed address.
        target: SocketAddr,
        /// The request path.
        path: String,
        /// The status line received.
        status_line: String,
        /// The status that counts as healthy, in words (`status 204`, `a 2xx or 3xx status`).
        expected: String,
    },
}

/// Probes `target` once as `check` says.
pub async fn probe(target: SocketAddr, check: &HealthCheck) -> Result<(), ProbeFailure> {
    let timeout = Duration::from_secs(u64::from(check.timeout_secs.max(1)));
    probe_within(target, check, timeout, None).await
}

/// Probes `target` once with the kind of `check`, and `timeout` in place of its timeout. An
/// HTTPS check sends `hostname` (the environment's hostname) as SNI, because an app may pick
/// its certificate by it; without one it sends none.
pub async fn probe_within(
    target: SocketAddr,
    check: &HealthCheck,
    timeout: Duration,
    hostname: Option<&str>,
) -> Result<(), ProbeFailure> {
    match tokio::time::timeout(timeout, probe_inner(target, &check.kind, hostname)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeFailure::Timeout { target, timeout }),
    }
}

async fn probe_inner(
    target: SocketAddr,
    kind: &HealthCheckKind,
    hostname: Option<&str>,
) -> Result<(), ProbeFailure> {
    let connect_failed = |error: std::io::Error| ProbeFailure::Connect {
        target,
        reason: error.to_string(),
    };
    let stream = TcpStream::connect(target).await.map_err(connect_failed)?;
    let HealthCheckKind::Http {
        path,
        expected_status,
        tls,
    } = kind
    else {
        return Ok(());
    };

    let status_line = if *tls {
        // The certificate names the public hostname, not the instance address, so there is
        // nothing to verify it against. The check only asks whether the app responds.
        let name = hostname
            .and_then(|hostname| ServerName::try_from(hostname.to_owned()).ok())
            .unwrap_or_else(|| ServerName::IpAddress(target.ip().into()));
        let tls_failed = |reason: String| ProbeFailure::Tls { target, reason };
        let mut stream = tls_connector()
            .map_err(tls_failed)?
            .connect(name, stream)
            .await
            .map_err(|error| tls_failed(error.to_string()))?;
        status_line(&mut stream, target, path)
            .await
            .map_err(connect_failed)?
    } else {
        let mut stream = stream;
        status_line(&mut stream, target, path)
            .await
            .map_err(connect_failed)?
    };

    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .filter(|_| status_line.starts_with("HTTP/"));
    let healthy = match (status, expected_status) {
        (Some(status), Some(expected)) => status == *expected,
        (Some(status), None) => (200..=399).contains(&status),
        (None, _) => false,
    };
    if healthy {
        return Ok(());
    }
    Err(ProbeFailure::HttpStatus {
        target,
        path: path.clone(),
        status_line,
        expected: match expected_status {
            Some(status) => format!("status {status}"),
            None => "a 2xx or 3xx status".to_owned(),
        },
    })
}

/// Sends `GET path` over `stream` and returns the first line of the response.
async fn status_line<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    target: SocketAddr,
    path: &str,
) -> std::io::Result<String> {
    let host = match target.ip() {
        IpAddr::V6(ip) => format!("[{ip}]:{}", target.port()),
        IpAddr::V4(ip) => format!("{ip}:{}", target.port()),
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kiln-agent\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;

    let mut buffer = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buffer.contains(&b'\n') && buffer.len() < MAX_STATUS_LINE {
        let read = match stream.read(&mut chunk).await {
            Ok(read) => read,
            // A TLS peer that closes without close_notify still sent its status line.
            Err(error) if !buffer.is_empty() => {
                tracing::debug!(%target, %error, "health endpoint closed the connection uncleanly");
                0
            }
            Err(error) => return Err(error),
        };
        if read == 0 {
            break;
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
    Ok(String::from_utf8_lossy(&buffer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Returns the TLS client of HTTPS checks, built once, or why it cannot be built.
fn tls_connector() -> Result<TlsConnector, String> {
    static CONNECTOR: OnceLock<Result<TlsConnector, String>> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            // ring is the workspace's TLS provider. Its default lacks post-quantum key
            // exchange, which does not matter for a probe over the host's own TAP device.
            #[allow(deprecated)]
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let verifier = Arc::new(AnyCertificate {
                algorithms: provider.signature_verification_algorithms,
            });
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|error| format!("the TLS client cannot be built: {error}"))?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth();
            Ok(TlsConnector::from(Arc::new(config)))
        })
        .clone()
}

/// Accepts any server certificate, still checking that the handshake is signed by its key.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Explains why `port` is unreachable from the host, given the sockets the guest listens on.
///
/// The agent probes the guest's IPv6 address, so an app that listens on IPv4 only, on
/// loopback only, or on another port is unreachable even though it runs.
pub fn diagnose(port: u16, listening: &[ListeningSocket]) -> String {
    let on_port: Vec<&ListeningSocket> = listening.iter().filter(|s| s.port() == port).collect();
    if on_port.is_empty() {
        let mut others: Vec<u16> = listening.iter().map(|s| s.port()).collect();
        others.sort_unstable();
        others.dedup();
        if others.is_empty() {
            return format!(
                "the app is not listening on any TCP port; it should listen on [::]:{port}"
            );
        }
        let list = others
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        return format!(
            "the app listens on port {list}, not on the service port {port}; make it listen on \
             [::]:{port} or change the service's internal_port"
        );
    }

    if on_port.iter().all(|s| s.ip().is_loopback()) {
        let addresses = join(&on_port);
        return format!(
            "the app listens on {addresses} only (loopback), so nothing outside the microVM can \
             reach it; listen on [::]:{port}"
        );
    }
    if on_port.iter().all(|s| s.is_ipv4()) {
        let addresses = join(&on_port);
        return format!(
            "the app listens on {addresses} (IPv4 only); Kiln reaches instances over IPv6, so \
             listen on [::]:{port}"
        );
    }
    format!("the app listens on port {port} but does not answer the health check")
}

fn join(sockets: &[&ListeningSocket]) -> String {
    sockets
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    fn check(kind: HealthCheckKind) -> HealthCheck {
        HealthCheck {
            kind,
            interval_secs: 1,
            timeout_secs: 2,
            grace_period_secs: 0,
        }
    }

    async fn http_server(response: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("[::1]:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        address
    }

    #[tokio::test]
    async fn tcp_probe_passes_on_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        probe(target, &check(HealthCheckKind::Tcp)).await.unwrap();
    }

    #[tokio::test]
    async fn tcp_probe_fails_when_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        drop(listener);
        let failure = probe(target, &check(HealthCheckKind::Tcp))
            .await
            .unwrap_err();
        assert!(matches!(failure, ProbeFailure::Connect { .. }), "{failure}");
    }

    #[tokio::test]
    async fn http_probe_accepts_2xx() {
        let target = http_server("HTTP/1.1 204 No Content\r\n\r\n").await;
        let kind = HealthCheckKind::Http {
            path: "/healthz".to_owned(),
            expected_status: None,
            tls: false,
        };
        probe(target, &check(kind)).await.unwrap();
    }

    #[tokio::test]
    async fn http_probe_rejects_5xx() {
        let target = http_server("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let kind = HealthCheckKind::Http {
            path: "/healthz".to_owned(),
            expected_status: None,
            tls: false,
        };
        let failure = probe(target, &check(kind)).await.unwrap_err();
        assert!(failure.to_string().contains("503"), "{failure}");
    }

    #[tokio::test]
    async fn http_probe_rejects_garbage() {
        let target = http_server("SSH-2.0-OpenSSH\r\n").await;
        let kind = HealthCheckKind::Http {
            path: "/".to_owned(),
            expected_status: None,
            tls: false,
        };
        let failure = probe(target, &check(kind)).await.unwrap_err();
        assert!(
            matches!(failure, ProbeFailure::HttpStatus { .. }),
            "{failure}"
        );
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        let kind = HealthCheckKind::Http {
            path: "/".to_owned(),
            expected_status: None,
            tls: false,
        };
        let mut check = check(kind);
        check.timeout_secs = 1;
        let failure = probe(target, &check).await.unwrap_err();
        assert!(matches!(failure, ProbeFailure::Timeout { .. }), "{failure}");
        drop(listener);
    }

    fn http(path: &str, expected_status: Option<u16>, tls: bool) -> HealthCheckKind {
        HealthCheckKind::Http {
            path: path.to_owned(),
            expected_status,
            tls,
        }
    }

    #[tokio::test]
    async fn http_probe_matches_expected_status() {
        let target = http_server("HTTP/1.1 204 No Content\r\n\r\n").await;
        probe(target, &check(http("/healthz", Some(204), false)))
            .await
            .unwrap();

        let failure = probe(target, &check(http("/healthz", Some(200), false)))
            .await
            .unwrap_err();
        assert!(
            failure.to_string().contains("expected status 200"),
            "{failure}"
        );
    }

    /// Starts a TLS server with a self-signed certificate for another name that responds
    /// with `response`.
    async fn https_server(response: &'static str) -> SocketAddr {
        let certified =
            rcgen::generate_simple_self_signed(vec!["app.example.com".to_owned()]).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            #[allow(deprecated)]
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("[::1]:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let Ok(mut stream) = acceptor.accept(stream).await else {
                    continue;
                };
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            }
        });
        address
    }

    #[tokio::test]
    async fn https_probe_skips_certificate_verification() {
        let target = https_server("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        probe(target, &check(http("/", Some(200), true)))
            .await
            .unwrap();

        // Plain HTTP to a TLS port gets no status line.
        let failure = probe(target, &check(http("/", None, false)))
            .await
            .unwrap_err();
        assert!(
            matches!(
                failure,
                ProbeFailure::HttpStatus { .. } | ProbeFailure::Connect { .. }
            ),
            "{failure}"
        );
    }

    #[tokio::test]
    async fn https_probe_sends_hostname_as_sni() {
        let certified =
            rcgen::generate_simple_self_signed(vec!["app.example.com".to_owned()]).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signing = provider.key_provider.load_private_key(key).unwrap();
        let mut resolver = rustls::server::ResolvesServerCertUsingSni::new();
        resolver
            .add(
                "app.example.com",
                rustls::sign::CertifiedKey::new(vec![certified.cert.der().clone()], signing),
            )
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("[::1]:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let Ok(mut stream) = acceptor.accept(stream).await else {
                    continue;
                };
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
                let _ = stream.shutdown().await;
            }
        });
        let check = check(http("/", Some(200), true));
        let timeout = Duration::from_secs(2);

        probe_within(target, &check, timeout, Some("app.example.com"))
            .await
            .unwrap();
        let failure = probe_within(target, &check, timeout, None)
            .await
            .unwrap_err();
        assert!(matches!(failure, ProbeFailure::Tls { .. }), "{failure}");
    }

    #[tokio::test]
    async fn https_probe_of_plain_server_names_the_setting() {
        let target = http_server("HTTP/1.1 200 OK\r\n\r\n").await;
        let failure = probe(target, &check(http("/", None, true)))
            .await
            .unwrap_err();
        assert!(matches!(failure, ProbeFailure::Tls { .. }), "{failure}");
        assert!(failure.to_string().contains("tls = false"), "{failure}");
    }

    #[test]
    fn diagnose_names_each_case() {
        let sockets = |list: &[&str]| -> Vec<SocketAddr> {
            list.iter().map(|s| s.parse().unwrap()).collect()
        };
        let cases = [
            (sockets(&[]), "not listening on any TCP port"),
            (
                sockets(&["[::]:9090"]),
                "listens on port 9090, not on the service port 8080",
            ),
            (
                sockets(&["127.0.0.1:8080"]),
                "127.0.0.1:8080 only (loopback)",
            ),
            (sockets(&["[::1]:8080", "127.0.0.1:8080"]), "(loopback)"),
            (sockets(&["0.0.0.0:8080"]), "0.0.0.0:8080 (IPv4 only)"),
            (sockets(&["[::]:8080"]), "does not answer the health check"),
        ];
        for (listening, expected) in cases {
            let text = diagnose(8080, &listening);
            assert!(text.contains(expected), "{listening:?}: {text}");
        }
    }
}
