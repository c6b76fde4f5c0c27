//! Route sets and the compiled route table the proxy looks hostnames up in.
//!
//! A [`RouteSet`] is the desired state, from a static route file or the control plane. It
//! compiles into a [`RouteTable`] that the proxy swaps in atomically, so a connection sees
//! either the old table or the new one. Backend connection counts and per-route metrics live
//! in registries keyed by address and hostname, so they survive a reload and open
//! connections keep counting against the backend they use.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use kiln_core::Hostname;
use serde::Deserialize;
use thiserror::Error;

use crate::metrics::{Metrics, RouteMetrics};

/// Name under which the fallback route appears in metrics and logs.
pub const FALLBACK_ROUTE_NAME: &str = "fallback";

/// The static route file read by `kiln-ingress run --routes FILE`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    /// Routes by SNI hostname.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Route for connections whose SNI is missing or matches no route. Without it such
    /// connections are closed.
    pub fallback: Option<Backends>,
    /// Raw TCP services, each on its own (typically dedicated per-env) address and port.
    #[serde(default)]
    pub tcp_services: Vec<TcpService>,
}

/// A raw TCP service: every connection to `listen` goes to its backends, with no SNI.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpService {
    /// Address and port to accept on, such as an env's dedicated IPv6 address. The address
    /// need not be configured on the host yet (the listener uses IP_FREEBIND).
    pub listen: SocketAddr,
    /// Backend addresses, `ADDR:PORT` with IPv6 in brackets.
    pub backends: Vec<SocketAddr>,
    /// Sends a PROXY protocol v2 header before the client's bytes.
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// A set of backends and how to connect to them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backends {
    /// Backend addresses, `ADDR:PORT` with IPv6 in brackets.
    pub backends: Vec<SocketAddr>,
    /// Sends a PROXY protocol v2 header before the client's bytes, so the backend sees the
    /// client's address.
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// One hostname and where its connections go.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Exact hostname, or `*.example.com` for any single label in front of `example.com`.
    pub hostname: Hostname,
    /// Backend addresses, `ADDR:PORT` with IPv6 in brackets. An empty list makes
    /// connections fail with the reason `no_healthy_backend`.
    pub backends: Vec<SocketAddr>,
    /// Sends a PROXY protocol v2 header before the client's bytes.
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// The complete desired routing state, from a file or the control plane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSet {
    /// Routes by hostname; each hostname appears once.
    pub routes: Vec<Route>,
    /// Route for connections without a matching SNI.
    pub fallback: Option<Backends>,
    /// Raw TCP services on their own listen addresses.
    pub tcp_services: Vec<TcpService>,
}

/// Error loading a route set.
#[derive(Debug, Error)]
pub enum RouteError {
    /// The route file could not be read.
    #[error("failed to read route file {path}")]
    Read {
        /// Path of the route file.
        path: PathBuf,
        /// The I/O failure.
        #[source]
        source: std::io::Error,
    },
    /// The route file is not valid TOML or has unknown or mistyped fields.
    #[error("invalid route file {path} at {location}: {message}")]
    Parse {
        /// Path of the route file.
        path: PathBuf,
        /// `line L, column C` of the offending value.
        location: String,
        /// The TOML parser's message.
        message: String,
    },
    /// Two TCP services share a listen address.
    #[error(
        "listen address {listen} has more than one TCP service; give each service its own address or port"
    )]
    DuplicateListen {
        /// The repeated address.
        listen: SocketAddr,
    },
    /// Two routes name the same hostname, so which one applies would be ambiguous.
    #[error(
        "hostname {hostname} has more than one route; merge their backends into one [[routes]] entry"
    )]
    DuplicateHostname {
        /// The repeated hostname.
        hostname: Hostname,
    },
}

impl RouteSet {
    /// Reads and checks a static route file.
    pub fn from_file(path: &Path) -> Result<Self, RouteError> {
        let text = std::fs::read_to_string(path).map_err(|source| RouteError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file: RouteFile = toml::from_str(&text).map_err(|error| RouteError::Parse {
            path: path.to_owned(),
            location: crate::config::toml_location(&text, &error),
            message: error.message().to_owned(),
        })?;
        let set = RouteSet {
            routes: file.routes,
            fallback: file.fallback,
            tcp_services: file.tcp_services,
        };
        set.validate()?;
        Ok(set)
    }

    /// Checks rules that span routes.
    pub fn validate(&self) -> Result<(), RouteError> {
        let mut seen = std::collections::HashSet::new();
        for route in &self.routes {
            if !seen.insert(route.hostname.as_str()) {
                return Err(RouteError::DuplicateHostname {
                    hostname: route.hostname.clone(),
                });
            }
        }
        let mut listens = std::collections::HashSet::new();
        for service in &self.tcp_services {
            if !listens.insert(service.listen) {
                return Err(RouteError::DuplicateListen {
                    listen: service.listen,
                });
            }
        }
        Ok(())
    }
}

/// A backend address with the state the balancer reads.
#[derive(Debug)]
pub struct Backend {
    /// Address the ingress connects to.
    pub addr: SocketAddr,
    active: AtomicU64,
    /// Milliseconds since `epoch` until which the backend counts as failed; 0 when healthy.
    failed_until_ms: AtomicU64,
    epoch: Instant,
}

impl Backend {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            active: AtomicU64::new(0),
            failed_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Open connections through this ingress to this backend.
    pub fn active_connections(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a connection until the returned guard drops.
    pub fn track(self: &Arc<Self>) -> BackendGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        BackendGuard(Arc::clone(self))
    }

    /// Records a failed connect, so the balancer tries this backend last for `cooldown`.
    pub fn mark_failed(&self, cooldown: Duration) {
        let until = self.epoch.elapsed() + cooldown;
        let until_ms = u64::try_from(until.as_millis()).unwrap_or(u64::MAX);
        self.failed_until_ms
            .store(until_ms.max(1), Ordering::Relaxed);
    }

    /// Records a successful connect.
    pub fn mark_healthy(&self) {
        self.failed_until_ms.store(0, Ordering::Relaxed);
    }

    /// Returns true if a recent connect failed and its cooldown has not passed.
    pub fn is_cooling_down(&self) -> bool {
        let until_ms = self.failed_until_ms.load(Ordering::Relaxed);
        until_ms != 0 && self.epoch.elapsed().as_millis() < u128::from(until_ms)
    }
}

/// Keeps a backend's open connection count while it lives.
#[derive(Debug)]
pub struct BackendGuard(Arc<Backend>);

impl Drop for BackendGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Shares one [`Backend`] per address across route tables, so counts survive reloads.
#[derive(Debug, Default)]
pub struct BackendRegistry {
    backends: Mutex<HashMap<SocketAddr, Weak<Backend>>>,
}

impl BackendRegistry {
    /// Returns the backend for `addr`, creating it if no live table uses it.
    pub fn get(&self, addr: SocketAddr) -> Arc<Backend> {
        let mut backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(backend) = backends.get(&addr).and_then(Weak::upgrade) {
            return backend;
        }
        // Forget backends that no table and no connection references any more.
        backends.retain(|_, backend| backend.strong_count() > 0);
        let backend = Arc::new(Backend::new(addr));
        backends.insert(addr, Arc::downgrade(&backend));
        backend
    }
}

/// A route as the proxy uses it.
#[derive(Debug)]
pub struct RouteTarget {
    /// Hostname of the route as configured, or `fallback`.
    pub name: String,
    /// Backends to choose from.
    pub backends: Vec<Arc<Backend>>,
    /// Whether to send a PROXY protocol v2 header.
    pub proxy_protocol: bool,
    /// Counters of this route.
    pub metrics: Arc<RouteMetrics>,
}

/// Compiled, immutable lookup structure for one route set.
#[derive(Debug, Default)]
pub struct RouteTable {
    exact: HashMap<String, Arc<RouteTarget>>,
    /// Wildcard routes keyed by the part after `*.`.
    wildcard: HashMap<String, Arc<RouteTarget>>,
    fallback: Option<Arc<RouteTarget>>,
    /// TCP services keyed by their configured listen address.
    tcp: HashMap<SocketAddr, Arc<RouteTarget>>,
}

impl RouteTable {
    /// Compiles a checked route set, sharing backend state and metrics with earlier tables.
    pub fn compile(set: &RouteSet, registry: &BackendRegistry, metrics: &Metrics) -> Self {
        let target = |name: &str, backends: &[SocketAddr], proxy_protocol: bool| {
            Arc::new(RouteTarget {
                name: name.to_owned(),
                backends: backends.iter().map(|addr| registry.get(*addr)).collect(),
                proxy_protocol,
                metrics: metrics.route(name),
            })
        };

        let mut table = RouteTable::default();
        for route in &set.routes {
            let name = route.hostname.as_str();
            let compiled = target(name, &route.backends, route.proxy_protocol);
            match name.strip_prefix("*.") {
                Some(suffix) => table.wildcard.insert(suffix.to_owned(), compiled),
                None => table.exact.insert(name.to_owned(), compiled),
            };
        }
        table.fallback = set.fallback.as_ref().map(|fallback| {
            target(
                FALLBACK_ROUTE_NAME,
                &fallback.backends,
                fallback.proxy_protocol,
            )
        });
        for service in &set.tcp_services {
            let name = format!("tcp:{}", service.listen);
            let compiled = target(&name, &service.backends, service.proxy_protocol);
            table.tcp.insert(service.listen, compiled);
        }
        table
    }

    /// Finds the route for a lowercase SNI hostname: an exact route first, then a wildcard
    /// covering its first label. Does not consult the fallback.
    pub fn lookup(&self, hostname: &str) -> Option<&Arc<RouteTarget>> {
        if let Some(route) = self.exact.get(hostname) {
            return Some(route);
        }
        let (_, parent) = hostname.split_once('.')?;
        self.wildcard.get(parent)
    }

    /// Returns the route for connections without a matching SNI, if configured.
    pub fn fallback(&self) -> Option<&Arc<RouteTarget>> {
        self.fallback.as_ref()
    }

    /// Returns the TCP service configured on `listen`, if any.
    pub fn tcp_service(&self, listen: SocketAddr) -> Option<&Arc<RouteTarget>> {
        self.tcp.get(&listen)
    }

    /// Listen addresses of all TCP services.
    pub fn tcp_listen_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.tcp.keys().copied()
    }

    /// Number of hostname routes.
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    /// Returns true if the table has no hostname routes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RouteSet, RouteError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, text).unwrap();
        RouteSet::from_file(&path)
    }

    const EXAMPLE: &str = r#"
        [[routes]]
        hostname = "app.example.test"
        backends = ["127.0.0.1:8443", "[::1]:8443"]

        [[routes]]
        hostname = "*.apps.example.test"
        backends = ["127.0.0.1:9443"]
        proxy_protocol = true

        [fallback]
        backends = ["127.0.0.1:7443"]

        [[tcp_services]]
        listen = "[fd00:6b69:6c6e::5]:5432"
        backends = ["[fd00:6b69:6c6e:1::9]:5432"]
        proxy_protocol = true
    "#;

    #[test]
    fn route_file_parses() {
        let set = parse(EXAMPLE).unwrap();
        assert_eq!(set.routes.len(), 2);
        assert_eq!(set.routes[0].backends[1], "[::1]:8443".parse().unwrap());
        assert!(set.routes[1].proxy_protocol);
        assert!(!set.fallback.unwrap().proxy_protocol);
    }

    #[test]
    fn route_lookup_exact_then_wildcard() {
        let set = parse(EXAMPLE).unwrap();
        let table = RouteTable::compile(&set, &BackendRegistry::default(), &Metrics::default());

        assert_eq!(
            table.lookup("app.example.test").unwrap().name,
            "app.example.test"
        );
        assert_eq!(
            table.lookup("shop.apps.example.test").unwrap().name,
            "*.apps.example.test"
        );
        assert!(
            table.lookup("apps.example.test").is_none(),
            "wildcard needs a label"
        );
        assert!(
            table.lookup("a.b.apps.example.test").is_none(),
            "wildcard covers one label"
        );
        assert!(table.lookup("other.example.test").is_none());
        assert_eq!(table.fallback().unwrap().name, FALLBACK_ROUTE_NAME);
        let tcp = table
            .tcp_service("[fd00:6b69:6c6e::5]:5432".parse().unwrap())
            .unwrap();
        assert_eq!(tcp.name, "tcp:[fd00:6b69:6c6e::5]:5432");
        assert!(tcp.proxy_protocol);
    }

    #[test]
    fn route_file_duplicate_listen_rejected() {
        let service = "[[tcp_services]]\nlisten = \"127.0.0.1:5432\"\nbackends = []\n";
        let error = parse(&service.repeat(2)).unwrap_err();
        assert!(
            matches!(error, RouteError::DuplicateListen { .. }),
            "{error}"
        );
    }

    #[test]
    fn route_file_unknown_field_rejected() {
        let error = parse("[[routes]]\nhostname = \"a.example.test\"\nbackend = []\n").unwrap_err();
        let message = error.to_string();
        assert!(message.contains("at line 3, column 1"), "{message}");
        assert!(message.contains("unknown field `backend`"), "{message}");
    }

    #[test]
    fn route_file_bad_backend_rejected() {
        let error = parse("[[routes]]\nhostname = \"a.example.test\"\nbackends = [\"::1:443\"]\n")
            .unwrap_err();
        let chain = error.to_string();
        assert!(chain.contains("invalid socket address"), "{chain}");
    }

    #[test]
    fn route_file_bad_hostname_rejected() {
        let error = parse("[[routes]]\nhostname = \"a.*.test\"\nbackends = []\n").unwrap_err();
        let chain = error.to_string();
        assert!(chain.contains("a.*.test"), "{chain}");
    }

    #[test]
    fn route_file_duplicate_hostname_rejected() {
        let text = "[[routes]]\nhostname = \"a.example.test\"\nbackends = []\n".repeat(2);
        let error = parse(&text).unwrap_err();
        assert!(
            matches!(error, RouteError::DuplicateHostname { .. }),
            "{error}"
        );
    }

    #[test]
    fn backend_state_survives_recompile() {
        let set = parse(EXAMPLE).unwrap();
        let registry = BackendRegistry::default();
        let metrics = Metrics::default();
        let old = RouteTable::compile(&set, &registry, &metrics);
        let guard = old.lookup("app.example.test").unwrap().backends[0].track();

        let new = RouteTable::compile(&set, &registry, &metrics);
        drop(old);
        assert_eq!(
            new.lookup("app.example.test").unwrap().backends[0].active_connections(),
            1
        );
        drop(guard);
        assert_eq!(
            new.lookup("app.example.test").unwrap().backends[0].active_connections(),
            0
        );
    }
}
