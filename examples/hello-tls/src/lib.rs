//! The Kiln example app: a small TLS server that answers every HTTP/1.1 request with the
//! identity Kiln gave its instance (app, env, release, instance) and the names of its secrets.
//!
//! It terminates TLS itself, because Kiln's ingress routes by SNI and never decrypts tenant
//! traffic. It prints secret names only, never their values, so its output is safe to show in
//! a demo. Plain threads and blocking I/O keep it small: it serves a demo, not a load test.

pub mod config;
pub mod http;
pub mod tls;

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use rustls::{ServerConfig, ServerConnection, StreamOwned};

pub use config::{Config, ConfigError, Identity};

/// Maximum number of connections served at once; further connections are closed at accept,
/// so a flood of idle clients cannot exhaust threads.
pub const MAX_CONNECTIONS: usize = 512;

/// Time a connection may stay idle (no request bytes) before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Time open connections get to finish after a stop, which Kiln's default kill timeout
/// leaves room for.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Interval at which a stopping server checks whether its connections have finished.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// A bound listener with its TLS configuration, ready to serve.
pub struct Server {
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    chain: Vec<CertificateDer<'static>>,
    identity: Arc<Identity>,
    active: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
}

/// Stops a running [`Server`] from another thread (a signal thread, say).
pub struct StopHandle {
    /// A second descriptor of the listening socket, so the handle never acts on a descriptor
    /// number the server has closed and the process reused.
    listener: TcpListener,
    stopping: Arc<AtomicBool>,
}

impl StopHandle {
    /// Stops accepting connections: the listening socket is shut down, so a client connecting
    /// from now on is refused at once and a proxy can try another instance, while connections
    /// already open are served to their end.
    pub fn stop(&self) -> io::Result<()> {
        self.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on a descriptor this handle owns; it touches no memory.
        // Shutting down a listening socket wakes the thread blocked in accept(2).
        let result = unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Outcome of a stopped server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Connections still open when the drain timeout ran out (0 when all finished).
    pub abandoned: usize,
}

impl Server {
    /// Binds the listen address and prepares TLS (loading or generating the certificate).
    pub fn bind(config: &Config) -> Result<Self, StartError> {
        let (tls, chain) = tls::server_config(&config.tls).map_err(StartError::Tls)?;
        let listener = TcpListener::bind(config.listen).map_err(|source| StartError::Bind {
            address: config.listen,
            source,
        })?;
        Ok(Self {
            listener,
            tls: Arc::new(tls),
            chain,
            identity: Arc::new(config.identity.clone()),
            active: Arc::new(AtomicUsize::new(0)),
            stopping: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Returns a handle that stops this server.
    pub fn stop_handle(&self) -> io::Result<StopHandle> {
        Ok(StopHandle {
            listener: self.listener.try_clone()?,
            stopping: Arc::clone(&self.stopping),
        })
    }

    /// Returns the bound address (useful when the configured port is 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Returns the certificate chain the server presents, leaf first.
    pub fn certificate_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Accepts connections, serving each on its own thread, until a [`StopHandle`] stops the
    /// server; then waits up to `drain_timeout` for open connections to finish.
    pub fn run(self, drain_timeout: Duration) -> io::Result<Drained> {
        for stream in self.listener.incoming() {
            // A connection accepted just before the stop is still served.
            let stream = match stream {
                Ok(stream) => stream,
                Err(_) if self.stopping.load(Ordering::SeqCst) => break,
                Err(error) => {
                    eprintln!("hello-tls: accept failed: {error}");
                    continue;
                }
            };

            if self.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                self.active.fetch_sub(1, Ordering::SeqCst);
                eprintln!("hello-tls: closing a connection: {MAX_CONNECTIONS} are already open");
                continue;
            }

            let tls = Arc::clone(&self.tls);
            let identity = Arc::clone(&self.identity);
            let active = Arc::clone(&self.active);
            let stopping = Arc::clone(&self.stopping);
            let spawned = thread::Builder::new()
                .name("connection".to_owned())
                .spawn(move || {
                    let peer = stream.peer_addr().ok();
                    if let Err(error) = serve_connection(stream, tls, &identity, &stopping) {
                        eprintln!("hello-tls: connection from {peer:?} failed: {error}");
                    }
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(error) = spawned {
                self.active.fetch_sub(1, Ordering::SeqCst);
                eprintln!("hello-tls: failed to start a connection thread: {error}");
            }
        }
        drop(self.listener);

        let deadline = Instant::now() + drain_timeout;
        while self.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            thread::sleep(DRAIN_POLL);
        }
        Ok(Drained {
            abandoned: self.active.load(Ordering::SeqCst),
        })
    }
}

/// Error that stops the server from starting.
#[derive(Debug)]
pub enum StartError {
    /// The certificate could not be loaded or generated.
    Tls(tls::TlsError),
    /// The listen address could not be bound.
    Bind {
        /// The address from the configuration.
        address: SocketAddr,
        /// The bind error.
        source: io::Error,
    },
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tls(error) => write!(f, "TLS setup failed: {error}"),
            Self::Bind { address, source } => write!(f, "failed to listen on {address}: {source}"),
        }
    }
}

impl std::error::Error for StartError {}

/// Serves the HTTP/1.1 requests of one TLS connection until the client closes it, sends
/// `Connection: close` or a malformed request, or stays idle past [`IDLE_TIMEOUT`]. Once the
/// server is stopping, the next response closes the connection.
fn serve_connection(
    stream: TcpStream,
    tls: Arc<ServerConfig>,
    identity: &Identity,
    stopping: &AtomicBool,
) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let connection = ServerConnection::new(tls).map_err(io::Error::other)?;
    let mut stream = StreamOwned::new(connection, stream);

    let mut buffer = Vec::new();
    loop {
        let request = match http::read_request(&mut stream, &mut buffer) {
            Ok(Some(request)) => request,
            Ok(None) => break,
            Err(http::RequestError::Io(error)) => return Err(error),
            Err(http::RequestError::Invalid(response)) => {
                stream.write_all(&response.to_bytes(false, false))?;
                stream.flush()?;
                break;
            }
        };

        let body = identity.render(&config::list_secret_names(&identity.secrets_dir));
        let response = http::Response::ok(body);
        let keep_alive = request.keep_alive && !stopping.load(Ordering::SeqCst);
        stream.write_all(&response.to_bytes(request.method == "HEAD", keep_alive))?;
        stream.flush()?;
        if !keep_alive {
            break;
        }
    }

    stream.conn.send_close_notify();
    stream.flush()
}
