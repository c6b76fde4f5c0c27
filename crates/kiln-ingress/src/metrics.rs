//! Counters of the ingress and their Prometheus text exposition.
//!
//! Counters are atomics updated on the data path, with no lock there: the only lock guards
//! the map from route name to its counters, taken when a route table is compiled and when
//! metrics are rendered. Route counters are kept after a route is removed, so a counter
//! never goes backwards within one process.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Why the ingress closed a connection before or instead of the peers closing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The ClientHello has no SNI and no fallback route is configured.
    NoSni,
    /// The SNI matches no route and no fallback route is configured.
    UnknownSni,
    /// The ClientHello did not fit the configured cap.
    ClientHelloTooLarge,
    /// The bytes were not a well-formed TLS ClientHello.
    ClientHelloMalformed,
    /// The client did not send its ClientHello in time.
    ClientHelloTimeout,
    /// The client closed or reset the connection before its ClientHello was complete.
    ClientHelloIncomplete,
    /// Neither side sent a byte within the idle timeout.
    IdleTimeout,
    /// The route has no backends.
    NoHealthyBackend,
    /// Every connect attempt to the route's backends failed.
    ConnectFailed,
    /// The client address has reached its connection limit.
    ClientLimit,
    /// The connection was still open when the shutdown deadline passed.
    DrainDeadline,
}

impl CloseReason {
    const ALL: [CloseReason; 11] = [
        CloseReason::NoSni,
        CloseReason::UnknownSni,
        CloseReason::ClientHelloTooLarge,
        CloseReason::ClientHelloMalformed,
        CloseReason::ClientHelloTimeout,
        CloseReason::ClientHelloIncomplete,
        CloseReason::IdleTimeout,
        CloseReason::NoHealthyBackend,
        CloseReason::ConnectFailed,
        CloseReason::ClientLimit,
        CloseReason::DrainDeadline,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::NoSni => "no_sni",
            CloseReason::UnknownSni => "unknown_sni",
            CloseReason::ClientHelloTooLarge => "client_hello_too_large",
            CloseReason::ClientHelloMalformed => "client_hello_malformed",
            CloseReason::ClientHelloTimeout => "client_hello_timeout",
            CloseReason::ClientHelloIncomplete => "client_hello_incomplete",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::NoHealthyBackend => "no_healthy_backend",
            CloseReason::ConnectFailed => "connect_failed",
            CloseReason::ClientLimit => "client_limit",
            CloseReason::DrainDeadline => "drain_deadline",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one route.
#[derive(Debug, Default)]
pub struct RouteMetrics {
    /// Connections routed here.
    pub connections: AtomicU64,
    /// Connections routed here and still open.
    pub active: AtomicU64,
    /// Bytes forwarded from clients to backends.
    pub bytes_from_client: AtomicU64,
    /// Bytes forwarded from backends to clients.
    pub bytes_to_client: AtomicU64,
    /// Failed backend connect attempts, including ones followed by a successful retry.
    pub connect_attempts_failed: AtomicU64,
    errors: [AtomicU64; CloseReason::ALL.len()],
}

impl RouteMetrics {
    /// Counts a connection of this route closed for `reason`.
    pub fn count_error(&self, reason: CloseReason) {
        self.errors[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// All counters of one ingress process.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connections accepted on all listeners.
    pub connections: AtomicU64,
    /// Accepted connections still open.
    pub active: AtomicU64,
    /// Route table reloads applied.
    pub reloads: AtomicU64,
    /// Route reloads rejected because the new route set was invalid.
    pub reloads_failed: AtomicU64,
    errors: [AtomicU64; CloseReason::ALL.len()],
    routes: Mutex<BTreeMap<String, Arc<RouteMetrics>>>,
}

impl Metrics {
    /// Counts a connection closed for `reason`, with the route when it is known.
    pub fn count_error(&self, reason: CloseReason, route: Option<&RouteMetrics>) {
        self.errors[reason.index()].fetch_add(1, Ordering::Relaxed);
        if let Some(route) = route {
            route.count_error(reason);
        }
    }

    /// Total of connections closed for `reason`.
    pub fn errors(&self, reason: CloseReason) -> u64 {
        self.errors[reason.index()].load(Ordering::Relaxed)
    }

    /// Returns the counters of route `name`, creating them on first use.
    pub fn route(&self, name: &str) -> Arc<RouteMetrics> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(routes.entry(name.to_owned()).or_default())
    }

    /// Renders all counters in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);

        let mut single = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        single(
            "kiln_ingress_connections_total",
            "counter",
            "Connections accepted.",
            load(&self.connections),
        );
        single(
            "kiln_ingress_connections_active",
            "gauge",
            "Accepted connections still open.",
            load(&self.active),
        );
        single(
            "kiln_ingress_route_reloads_total",
            "counter",
            "Route tables applied.",
            load(&self.reloads),
        );
        single(
            "kiln_ingress_route_reloads_failed_total",
            "counter",
            "Route reloads rejected as invalid.",
            load(&self.reloads_failed),
        );

        let _ = writeln!(
            out,
            "# HELP kiln_ingress_errors_total Connections closed by the ingress, by reason.\n\
             # TYPE kiln_ingress_errors_total counter"
        );
        for reason in CloseReason::ALL {
            let value = load(&self.errors[reason.index()]);
            let _ = writeln!(
                out,
                "kiln_ingress_errors_total{{reason=\"{}\"}} {value}",
                reason.as_str()
            );
        }

        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let route_family =
            |out: &mut String, name: &str, kind: &str, help: &str, field: RouteField| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (route, metrics) in routes.iter() {
                    let _ = writeln!(
                        out,
                        "{name}{{route=\"{}\"}} {}",
                        escape(route),
                        load(field(metrics))
                    );
                }
            };
        route_family(
            &mut out,
            "kiln_ingress_route_connections_total",
            "counter",
            "Connections routed.",
            |r| &r.connections,
        );
        route_family(
            &mut out,
            "kiln_ingress_route_connections_active",
            "gauge",
            "Routed connections still open.",
            |r| &r.active,
        );
        route_family(
            &mut out,
            "kiln_ingress_route_connect_attempts_failed_total",
            "counter",
            "Failed backend connect attempts, including retried ones.",
            |r| &r.connect_attempts_failed,
        );
        route_family(
            &mut out,
            "kiln_ingress_route_bytes_from_client_total",
            "counter",
            "Bytes forwarded from clients to backends.",
            |r| &r.bytes_from_client,
        );
        route_family(
            &mut out,
            "kiln_ingress_route_bytes_to_client_total",
            "counter",
            "Bytes forwarded from backends to clients.",
            |r| &r.bytes_to_client,
        );

        let name = "kiln_ingress_route_errors_total";
        let _ = writeln!(
            out,
            "# HELP {name} Routed connections closed by the ingress, by reason.\n# TYPE {name} counter"
        );
        for (route, metrics) in routes.iter() {
            for reason in CloseReason::ALL {
                let value = load(&metrics.errors[reason.index()]);
                if value > 0 {
                    let _ = writeln!(
                        out,
                        "{name}{{route=\"{}\",reason=\"{}\"}} {value}",
                        escape(route),
                        reason.as_str()
                    );
                }
            }
        }
        out
    }
}

/// Selects one counter of a route.
type RouteField = fn(&RouteMetrics) -> &AtomicU64;

/// Escapes a label value (backslash, double quote, newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` over plain HTTP/1.1 until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "metrics accept failed");
                continue;
            }
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            // Reads the request head, bounded in size and time; the body, if any, is ignored.
            let read_head = async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            };
            match tokio::time::timeout(std::time::Duration::from_secs(5), read_head).await {
                Ok(true) => {}
                _ => {
                    tracing::debug!(%peer, "metrics request incomplete");
                    return;
                }
            }

            let response = if request.starts_with(b"GET /metrics ") {
                let body = metrics.render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_owned()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
