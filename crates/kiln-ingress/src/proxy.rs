//! The proxy: listeners, per-connection routing, backend connects with retry, and drain.
//!
//! Each accepted connection runs as one task through named steps: reserve a slot for the
//! client address, read the ClientHello, look up the route, connect to a backend (trying
//! another one when a connect fails, which is safe because no byte has been forwarded yet),
//! send the optional PROXY v2 header together with the buffered ClientHello, then move bytes
//! both ways (splice(2) by default, a user-space copy otherwise) until both sides have
//! closed. The route table sits behind an [`ArcSwap`], so a
//! reload replaces it in one atomic store and open connections keep the route they chose.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::balance::{BackendLoad, candidate_order};
use crate::client_hello::{self, HelloError, HelloScan};
use crate::config::{ConfigError, DataPath, IngressConfig};
use crate::copy::{CopyEnd, copy_bidirectional};
use crate::metrics::{self, CloseReason, Metrics};
use crate::proxy_protocol;
use crate::routes::{BackendRegistry, RouteError, RouteSet, RouteTable, RouteTarget};
use crate::splice::splice_bidirectional;

/// Lifecycle phase, broadcast to listeners and connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Listeners are closed; open connections may finish.
    Draining,
    /// The drain deadline passed; open connections are closed.
    Closing,
}

/// Error starting the ingress.
#[derive(Debug, Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The initial route set is invalid.
    #[error(transparent)]
    Routes(#[from] RouteError),
    /// The initial route set could not be applied.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// A listener could not be bound.
    #[error("failed to listen on {addr}")]
    Bind {
        /// The listen address.
        addr: SocketAddr,
        /// The socket failure.
        #[source]
        source: io::Error,
    },
}

/// Error applying a route set. The previous routes stay in effect.
#[derive(Debug, Error)]
pub enum ApplyError {
    /// The route set is invalid.
    #[error(transparent)]
    Routes(#[from] RouteError),
    /// A TCP service wants an address and port the SNI listeners already use.
    #[error(
        "TCP service address {listen} is also an SNI listener; give the service its own address or port"
    )]
    ListenConflict {
        /// The conflicting address.
        listen: SocketAddr,
    },
    /// A TCP service's listener could not be bound.
    #[error("failed to listen on {listen} for a TCP service")]
    Bind {
        /// The service's listen address.
        listen: SocketAddr,
        /// The socket failure.
        #[source]
        source: io::Error,
    },
}

/// Routing mode of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListenerKind {
    /// The SNI of the ClientHello.
    Sni,
    /// Nothing: the TCP service configured on this listen address gets every connection.
    Tcp(SocketAddr),
}

/// A running TCP service listener.
struct TcpListenerEntry {
    local: SocketAddr,
    task: JoinHandle<()>,
}

/// Result of a graceful shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections still open at the drain deadline, which the ingress closed.
    pub closed_at_deadline: u64,
}

/// State shared by the listeners and connection tasks of one ingress.
struct Shared {
    config: IngressConfig,
    routes: ArcSwap<RouteTable>,
    registry: BackendRegistry,
    metrics: Arc<Metrics>,
    clients: Mutex<HashMap<IpAddr, u32>>,
    phase: watch::Sender<Phase>,
    /// Woken whenever a connection ends, for the drain wait.
    connection_ended: Notify,
    /// TCP service listeners by configured listen address; also serializes route applies.
    tcp_listeners: Mutex<HashMap<SocketAddr, TcpListenerEntry>>,
}

/// A running ingress: its bound addresses, route reloads and shutdown.
pub struct Ingress {
    shared: Arc<Shared>,
    listen_addrs: Vec<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    listener_tasks: Vec<JoinHandle<()>>,
    metrics_task: Option<JoinHandle<()>>,
}

impl Ingress {
    /// Validates the config, binds every listener and the metrics endpoint, and starts
    /// accepting connections routed by `routes`.
    pub async fn start(config: IngressConfig, routes: &RouteSet) -> Result<Self, StartError> {
        config.validate()?;
        routes.validate()?;

        let metrics = Arc::new(Metrics::default());
        let registry = BackendRegistry::default();
        let table = RouteTable::compile(routes, &registry, &metrics);
        check_listen_conflicts(&config, routes)?;
        let (phase, _) = watch::channel(Phase::Running);
        let shared = Arc::new(Shared {
            routes: ArcSwap::from_pointee(table),
            registry,
            metrics: Arc::clone(&metrics),
            clients: Mutex::new(HashMap::new()),
            phase,
            connection_ended: Notify::new(),
            tcp_listeners: Mutex::new(HashMap::new()),
            config,
        });

        let mut listeners = Vec::new();
        for addr in &shared.config.listen {
            listeners.push(bind_listener(*addr)?);
        }
        let mut metrics_task = None;
        let mut metrics_addr = None;
        if let Some(addr) = shared.config.metrics_listen {
            let listener = bind_listener(addr)?;
            metrics_addr = Some(
                listener
                    .local_addr()
                    .map_err(|source| StartError::Bind { addr, source })?,
            );
            metrics_task = Some(tokio::spawn(metrics::serve(listener, metrics)));
        }

        let mut listen_addrs = Vec::new();
        let mut listener_tasks = Vec::new();
        for (listener, addr) in listeners.into_iter().zip(&shared.config.listen) {
            let local = listener.local_addr().map_err(|source| StartError::Bind {
                addr: *addr,
                source,
            })?;
            tracing::info!(listen = %local, "listening");
            listen_addrs.push(local);
            listener_tasks.push(tokio::spawn(accept_loop(
                Arc::clone(&shared),
                listener,
                ListenerKind::Sni,
            )));
        }
        let mut tcp_listeners = shared
            .tcp_listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let desired: Vec<SocketAddr> = routes.tcp_services.iter().map(|s| s.listen).collect();
        reconcile_tcp_listeners(&shared, &mut tcp_listeners, &desired)?;
        drop(tcp_listeners);

        Ok(Self {
            shared,
            listen_addrs,
            metrics_addr,
            listener_tasks,
            metrics_task,
        })
    }

    /// Addresses the listeners are bound to, in config order (ports resolved when 0).
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen_addrs
    }

    /// Address of the metrics endpoint, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Returns the ingress counters.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Replaces the route table atomically. New connections use the new routes at once;
    /// open connections keep their backend. TCP service listeners are opened before the
    /// swap and closed after it. On any error the old table and listeners stay in place.
    pub fn apply_routes(&self, routes: &RouteSet) -> Result<(), ApplyError> {
        let result = self.try_apply_routes(routes);
        if result.is_err() {
            self.shared
                .metrics
                .reloads_failed
                .fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn try_apply_routes(&self, routes: &RouteSet) -> Result<(), ApplyError> {
        let shared = &self.shared;
        routes.validate()?;
        check_listen_conflicts(&shared.config, routes)?;

        // Holding the lock serializes applies, so listeners and table change together.
        let mut tcp_listeners = shared
            .tcp_listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let desired: Vec<SocketAddr> = routes.tcp_services.iter().map(|s| s.listen).collect();
        let opened = open_missing_tcp_listeners(shared, &mut tcp_listeners, &desired)?;

        let table = RouteTable::compile(routes, &shared.registry, &shared.metrics);
        let route_count = table.len();
        shared.routes.store(Arc::new(table));
        close_unwanted_tcp_listeners(&mut tcp_listeners, &desired);
        shared.metrics.reloads.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            routes = route_count,
            tcp_services = desired.len(),
            opened,
            "route table applied"
        );
        Ok(())
    }

    /// Bound address of the TCP service configured on `listen`, if it is running.
    pub fn tcp_service_addr(&self, listen: SocketAddr) -> Option<SocketAddr> {
        let tcp_listeners = self
            .shared
            .tcp_listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tcp_listeners.get(&listen).map(|entry| entry.local)
    }

    /// Counts a reload that failed before a route set existed, such as an unreadable file.
    pub fn count_failed_reload(&self) {
        self.shared
            .metrics
            .reloads_failed
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Stops accepting, waits up to the configured drain timeout for open connections to
    /// finish, then closes the rest.
    pub async fn shutdown(self) -> DrainReport {
        let shared = &self.shared;
        shared.phase.send_replace(Phase::Draining);
        // Awaiting the aborted tasks drops their sockets, so the listeners are closed once
        // the drain starts.
        for task in self.listener_tasks {
            task.abort();
            let _ = task.await;
        }
        for task in take_tcp_listener_tasks(shared) {
            task.abort();
            let _ = task.await;
        }
        tracing::info!(
            open = shared.metrics.active.load(Ordering::Relaxed),
            "draining connections"
        );

        let drained = wait_for_no_connections(shared, shared.config.drain_timeout()).await;
        let mut report = DrainReport {
            closed_at_deadline: 0,
        };
        if !drained {
            report.closed_at_deadline = shared.metrics.active.load(Ordering::Relaxed);
            tracing::warn!(
                open = report.closed_at_deadline,
                "drain deadline passed, closing connections"
            );
            shared.phase.send_replace(Phase::Closing);
            // Tasks close their sockets as soon as they see the phase change.
            wait_for_no_connections(shared, Duration::from_secs(5)).await;
        }

        if let Some(task) = &self.metrics_task {
            task.abort();
        }
        tracing::info!("ingress stopped");
        report
    }
}

async fn wait_for_no_connections(shared: &Shared, limit: Duration) -> bool {
    let wait = async {
        loop {
            let ended = shared.connection_ended.notified();
            if shared.metrics.active.load(Ordering::Acquire) == 0 {
                return;
            }
            ended.await;
        }
    };
    tokio::time::timeout(limit, wait).await.is_ok()
}

/// Binds a listening socket; IPv6 sockets are IPv6-only so IPv4 can bind the same port.
fn bind_listener(addr: SocketAddr) -> Result<TcpListener, StartError> {
    bind_socket(addr, false).map_err(|source| StartError::Bind { addr, source })
}

/// Rejects TCP services on an address and port an SNI listener uses.
fn check_listen_conflicts(config: &IngressConfig, routes: &RouteSet) -> Result<(), ApplyError> {
    for service in &routes.tcp_services {
        if config.listen.contains(&service.listen) {
            return Err(ApplyError::ListenConflict {
                listen: service.listen,
            });
        }
    }
    Ok(())
}

/// Opens listeners for the TCP services in `desired` that have none; on failure closes the
/// ones it opened and returns the error. Returns how many it opened.
fn open_missing_tcp_listeners(
    shared: &Arc<Shared>,
    tcp_listeners: &mut HashMap<SocketAddr, TcpListenerEntry>,
    desired: &[SocketAddr],
) -> Result<usize, ApplyError> {
    let mut opened = Vec::new();
    for &listen in desired {
        if tcp_listeners.contains_key(&listen) {
            continue;
        }
        let bound =
            bind_socket(listen, true).and_then(|listener| Ok((listener.local_addr()?, listener)));
        let (local, listener) = match bound {
            Ok(bound) => bound,
            Err(source) => {
                for listen in opened {
                    if let Some(entry) = tcp_listeners.remove(&listen) {
                        entry.task.abort();
                    }
                }
                return Err(ApplyError::Bind { listen, source });
            }
        };
        tracing::info!(%listen, %local, "listening for a TCP service");
        let task = tokio::spawn(accept_loop(
            Arc::clone(shared),
            listener,
            ListenerKind::Tcp(listen),
        ));
        tcp_listeners.insert(listen, TcpListenerEntry { local, task });
        opened.push(listen);
    }
    Ok(opened.len())
}

/// Closes the TCP service listeners not in `desired`. Open connections are not affected.
fn close_unwanted_tcp_listeners(
    tcp_listeners: &mut HashMap<SocketAddr, TcpListenerEntry>,
    desired: &[SocketAddr],
) {
    tcp_listeners.retain(|listen, entry| {
        let keep = desired.contains(listen);
        if !keep {
            tracing::info!(%listen, "closing TCP service listener");
            entry.task.abort();
        }
        keep
    });
}

/// Removes every TCP service listener and returns their tasks.
fn take_tcp_listener_tasks(shared: &Shared) -> Vec<JoinHandle<()>> {
    let mut tcp_listeners = shared
        .tcp_listeners
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    tcp_listeners.drain().map(|(_, entry)| entry.task).collect()
}

fn reconcile_tcp_listeners(
    shared: &Arc<Shared>,
    tcp_listeners: &mut HashMap<SocketAddr, TcpListenerEntry>,
    desired: &[SocketAddr],
) -> Result<(), ApplyError> {
    open_missing_tcp_listeners(shared, tcp_listeners, desired)?;
    close_unwanted_tcp_listeners(tcp_listeners, desired);
    Ok(())
}

/// Creates a listening TCP socket. `freebind` allows an address not (yet) configured on
/// the host, as a dedicated address may be routed here before or after the listener opens.
fn bind_socket(addr: SocketAddr, freebind: bool) -> io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if freebind && addr.is_ipv6() {
        socket.set_freebind_v6(true)?;
    } else if freebind {
        socket.set_freebind_v4(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, kind: ListenerKind) {
    let mut phase = shared.phase.subscribe();
    loop {
        let accepted = tokio::select! {
            _ = phase.wait_for(|p| *p != Phase::Running) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let shared = Arc::clone(&shared);
                let span = tracing::debug_span!("connection", %peer);
                tokio::spawn(handle_connection(shared, stream, peer, kind).instrument(span));
            }
            Err(error) => {
                // Typically EMFILE or ENFILE: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reason a connection ended early, with the route if one was chosen.
struct Closed {
    reason: CloseReason,
    route: Option<Arc<RouteTarget>>,
}

impl Closed {
    fn new(reason: CloseReason) -> Self {
        Self {
            reason,
            route: None,
        }
    }

    fn on(reason: CloseReason, route: &Arc<RouteTarget>) -> Self {
        Self {
            reason,
            route: Some(Arc::clone(route)),
        }
    }
}

/// Decrements the open-connection gauge and wakes the drain wait when dropped.
struct ConnectionGuard(Arc<Shared>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.metrics.active.fetch_sub(1, Ordering::AcqRel);
        self.0.connection_ended.notify_waiters();
    }
}

/// Holds one of a client address's connection slots.
struct ClientSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut clients = self
            .shared
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = clients.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                clients.remove(&self.ip);
            }
        }
    }
}

fn reserve_client_slot(shared: &Arc<Shared>, ip: IpAddr) -> Option<ClientSlot> {
    let mut clients = shared.clients.lock().unwrap_or_else(|e| e.into_inner());
    let count = clients.entry(ip).or_insert(0);
    if *count >= shared.config.max_connections_per_client {
        return None;
    }
    *count += 1;
    Some(ClientSlot {
        shared: Arc::clone(shared),
        ip,
    })
}

async fn handle_connection(
    shared: Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
) {
    shared.metrics.connections.fetch_add(1, Ordering::Relaxed);
    shared.metrics.active.fetch_add(1, Ordering::AcqRel);
    let _connection = ConnectionGuard(Arc::clone(&shared));

    let mut phase = shared.phase.subscribe();
    let result = tokio::select! {
        result = proxy_connection(&shared, client, peer, kind) => result,
        _ = phase.wait_for(|p| *p == Phase::Closing) => Err(Closed::new(CloseReason::DrainDeadline)),
    };

    if let Err(closed) = result {
        let route = closed.route.as_ref().map(|r| &*r.metrics);
        shared.metrics.count_error(closed.reason, route);
        let route_name = closed.route.as_ref().map(|r| r.name.as_str());
        tracing::debug!(
            reason = closed.reason.as_str(),
            route = route_name,
            "connection closed by ingress"
        );
    }
}

async fn proxy_connection(
    shared: &Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
) -> Result<(), Closed> {
    let Some(_slot) = reserve_client_slot(shared, peer.ip()) else {
        return Err(Closed::new(CloseReason::ClientLimit));
    };
    let _ = client.set_nodelay(true);
    let local = client
        .local_addr()
        .map_err(|_| Closed::new(CloseReason::ClientHelloMalformed))?;
    let mut client = client;

    let (hello, route) = match kind {
        ListenerKind::Sni => {
            let (hello, sni) = read_client_hello(&shared.config, &mut client).await?;
            (hello, choose_route(shared, sni.as_deref())?)
        }
        ListenerKind::Tcp(listen) => {
            // The listener is closed right after its service is removed; a connection
            // accepted in between finds no service.
            let table = shared.routes.load();
            let route = table
                .tcp_service(listen)
                .ok_or(Closed::new(CloseReason::NoHealthyBackend))?;
            (Vec::new(), Arc::clone(route))
        }
    };
    route.metrics.connections.fetch_add(1, Ordering::Relaxed);
    route.metrics.active.fetch_add(1, Ordering::Relaxed);
    let _route_active = RouteActiveGuard(Arc::clone(&route));

    let (mut backend_stream, backend) = connect_backend(shared, &route).await?;
    let _backend_active = backend.track();
    let _ = backend_stream.set_nodelay(true);
    tracing::debug!(route = %route.name, backend = %backend.addr, "connected");

    // The header and the buffered ClientHello go out in one write, often one segment.
    let mut first = Vec::with_capacity(hello.len() + 52);
    if route.proxy_protocol {
        first.extend_from_slice(&proxy_protocol::encode_v2(peer, local));
    }
    first.extend_from_slice(&hello);
    if backend_stream.write_all(&first).await.is_err() {
        return Err(Closed::on(CloseReason::ConnectFailed, &route));
    }
    route
        .metrics
        .bytes_from_client
        .fetch_add(hello.len() as u64, Ordering::Relaxed);

    match forward(shared, client, backend_stream, &route).await {
        CopyEnd::Closed | CopyEnd::Reset => Ok(()),
        CopyEnd::IdleTimeout => Err(Closed::on(CloseReason::IdleTimeout, &route)),
    }
}

/// Moves bytes both ways on the configured data path until the connection ends.
async fn forward(
    shared: &Shared,
    client: TcpStream,
    backend: TcpStream,
    route: &RouteTarget,
) -> CopyEnd {
    let idle_timeout = shared.config.idle_timeout();
    match shared.config.data_path {
        DataPath::Splice => {
            splice_bidirectional(client, backend, idle_timeout, &route.metrics).await
        }
        DataPath::Copy => copy_bidirectional(client, backend, idle_timeout, &route.metrics).await,
    }
}

struct RouteActiveGuard(Arc<RouteTarget>);

impl Drop for RouteActiveGuard {
    fn drop(&mut self) {
        self.0.metrics.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads until the buffered bytes hold a complete ClientHello; returns them and the SNI.
async fn read_client_hello(
    config: &IngressConfig,
    client: &mut TcpStream,
) -> Result<(Vec<u8>, Option<String>), Closed> {
    let cap = config.client_hello_max_bytes;
    let read = async {
        let mut buf = Vec::with_capacity(cap.min(4096));
        let mut chunk = vec![0u8; cap.min(16 * 1024)];
        loop {
            match client_hello::scan(&buf, cap) {
                Ok(HelloScan::NeedMore) => {}
                Ok(HelloScan::Sni(name)) => return Ok((buf, Some(name))),
                Ok(HelloScan::NoSni) => return Ok((buf, None)),
                Err(HelloError::TooLarge { .. }) => {
                    return Err(Closed::new(CloseReason::ClientHelloTooLarge));
                }
                Err(error) => {
                    tracing::debug!(%error, "invalid ClientHello");
                    return Err(Closed::new(CloseReason::ClientHelloMalformed));
                }
            }
            let room = (cap - buf.len()).min(chunk.len());
            match client.read(&mut chunk[..room]).await {
                Ok(0) | Err(_) => return Err(Closed::new(CloseReason::ClientHelloIncomplete)),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(config.client_hello_timeout(), read)
        .await
        .unwrap_or(Err(Closed::new(CloseReason::ClientHelloTimeout)))
}

fn choose_route(shared: &Shared, sni: Option<&str>) -> Result<Arc<RouteTarget>, Closed> {
    let table = shared.routes.load();
    let route = match sni {
        Some(name) => table.lookup(name).or_else(|| table.fallback()),
        None => table.fallback(),
    };
    match (route, sni) {
        (Some(route), _) => Ok(Arc::clone(route)),
        (None, Some(_)) => Err(Closed::new(CloseReason::UnknownSni)),
        (None, None) => Err(Closed::new(CloseReason::NoSni)),
    }
}

/// Connects to the route's backends in balancer order, up to the configured attempts.
async fn connect_backend(
    shared: &Shared,
    route: &Arc<RouteTarget>,
) -> Result<(TcpStream, Arc<crate::routes::Backend>), Closed> {
    if route.backends.is_empty() {
        return Err(Closed::on(CloseReason::NoHealthyBackend, route));
    }
    let order = {
        let loads: Vec<BackendLoad> = route
            .backends
            .iter()
            .map(|b| BackendLoad {
                active: b.active_connections(),
                cooling_down: b.is_cooling_down(),
            })
            .collect();
        candidate_order(&loads, shared.config.balance, &mut rand::thread_rng())
    };

    let attempts = usize::try_from(shared.config.connect_attempts).unwrap_or(usize::MAX);
    for index in order.into_iter().take(attempts) {
        let backend = &route.backends[index];
        let error = match tokio::time::timeout(
            shared.config.connect_timeout(),
            TcpStream::connect(backend.addr),
        )
        .await
        {
            Ok(Ok(stream)) => {
                backend.mark_healthy();
                return Ok((stream, Arc::clone(backend)));
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => "connect timed out".to_owned(),
        };
        route
            .metrics
            .connect_attempts_failed
            .fetch_add(1, Ordering::Relaxed);
        backend.mark_failed(shared.config.backend_failure_cooldown());
        tracing::warn!(route = %route.name, backend = %backend.addr, %error, "backend connect failed");
    }
    Err(Closed::on(CloseReason::ConnectFailed, route))
}
