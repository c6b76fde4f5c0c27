//! Load generator comparing kiln-ingress with HAProxy (`mode tcp`, routing on
//! `req.ssl_sni`) under identical load, run by `bench/ingress/run`.
//!
//! One process starts two rustls TLS backends on loopback, then each proxy in turn in
//! front of them, and drives the same three workloads through each: new TLS connections
//! per second, throughput of 1 MiB responses, and the latency of a fresh connection
//! (handshake plus one request), whose p99 is compared with connecting to a backend
//! directly. It also reads each proxy's CPU time during the first two workloads. Rounds
//! alternate between the proxies so drift on a shared machine hits both.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const HOSTNAME: &str = "app.example.test";
const MIB: usize = 1 << 20;

#[allow(deprecated)]
fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Settings {
    kiln_binary: String,
    haproxy_binary: String,
    seconds: u64,
    rounds: u32,
    concurrency: usize,
    latency_samples: usize,
    data_path: String,
    threads: usize,
}

fn settings() -> Settings {
    let env =
        |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    Settings {
        kiln_binary: env("KILN_INGRESS_BIN", "target/release/kiln-ingress"),
        haproxy_binary: env("HAPROXY_BIN", "/usr/sbin/haproxy"),
        seconds: env("BENCH_SECONDS", "5")
            .parse()
            .expect("BENCH_SECONDS is a number of seconds"),
        rounds: env("BENCH_ROUNDS", "2")
            .parse()
            .expect("BENCH_ROUNDS is a count"),
        concurrency: env("BENCH_CONCURRENCY", "16")
            .parse()
            .expect("BENCH_CONCURRENCY is a count"),
        latency_samples: env("BENCH_LATENCY_SAMPLES", "2000")
            .parse()
            .expect("BENCH_LATENCY_SAMPLES is a count"),
        data_path: env("BENCH_DATA_PATH", "splice"),
        threads: env("BENCH_THREADS", "2")
            .parse()
            .expect("BENCH_THREADS is a count"),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a TLS backend: `ping` gets `pong`, `get N` gets N bytes and a close.
async fn start_backend(acceptor: TlsAcceptor) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let (read, mut write) = tokio::io::split(tls);
                let mut lines = BufReader::new(read);
                let mut line = String::new();
                while lines.read_line(&mut line).await.unwrap_or(0) > 0 {
                    if let Some(len) = line.trim().strip_prefix("get ") {
                        let mut left: usize = len.parse().unwrap_or(0);
                        let chunk = vec![b'x'; 64 * 1024];
                        while left > 0 {
                            let n = left.min(chunk.len());
                            if write.write_all(&chunk[..n]).await.is_err() {
                                return;
                            }
                            left -= n;
                        }
                        let _ = write.shutdown().await;
                        return;
                    }
                    if write.write_all(b"pong\n").await.is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

/// One TLS connection: handshake, then `request`; returns the bytes of the answer.
async fn exchange(
    connector: &TlsConnector,
    addr: SocketAddr,
    request: &[u8],
    until_close: bool,
) -> std::io::Result<usize> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(HOSTNAME).unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(request).await?;
    if until_close {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        loop {
            match tls.read(&mut buf).await {
                Ok(0) => return Ok(total),
                Ok(n) => total += n,
                // Some servers end without close_notify; the byte count tells success.
                Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(total);
                }
                Err(error) => return Err(error),
            }
        }
    }
    let mut answer = [0u8; 5];
    tls.read_exact(&mut answer).await?;
    Ok(answer.len())
}

/// Runs `concurrency` loops of `request` for `seconds`; returns (completed, failed, bytes).
async fn drive(
    connector: &TlsConnector,
    addr: SocketAddr,
    settings: &Settings,
    request: &'static [u8],
    until_close: bool,
) -> (u64, u64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..settings.concurrency {
        let (stop, completed, failed, bytes) = (
            stop.clone(),
            completed.clone(),
            failed.clone(),
            bytes.clone(),
        );
        let connector = connector.clone();
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match exchange(&connector, addr, request, until_close).await {
                    Ok(n) => {
                        completed.fetch_add(1, Ordering::Relaxed);
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(settings.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    (
        completed.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed),
    )
}

/// Latencies of sequential fresh connections with one ping each, in microseconds, sorted.
async fn latencies(connector: &TlsConnector, addr: SocketAddr, samples: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        exchange(connector, addr, b"ping\n", false)
            .await
            .expect("latency sample");
        out.push(u64::try_from(start.elapsed().as_micros()).unwrap());
    }
    out.sort_unstable();
    out
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_kiln(settings: &Settings, backends: &[SocketAddr]) -> ProxyProcess {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    let config = dir.path().join("ingress.toml");
    std::fs::write(
        &config,
        format!(
            "data_path = \"{}\"\nworker_threads = {}\n",
            settings.data_path, settings.threads
        ),
    )
    .unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        format!(
            "[[routes]]\nhostname = \"{HOSTNAME}\"\nbackends = [{}]\n",
            list.join(", ")
        ),
    )
    .unwrap();
    let child = Command::new(&settings.kiln_binary)
        .args(["run", "--listen", &format!("127.0.0.1:{port}"), "--routes"])
        .arg(&routes)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("kiln-ingress binary (set KILN_INGRESS_BIN)");
    ProxyProcess {
        child,
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        _dir: dir,
    }
}

fn start_haproxy(settings: &Settings, backends: &[SocketAddr]) -> ProxyProcess {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("    server b{i} {b}\n"))
        .collect();
    // As many threads as kiln-ingress's worker_threads; no health checks, as kiln-ingress
    // does none in static mode.
    let config = format!(
        "global\n    maxconn 8000\n    nbthread {}\n\
         defaults\n    mode tcp\n    timeout connect 3s\n    timeout client 600s\n    timeout server 600s\n\
         frontend tls\n    bind 127.0.0.1:{port}\n    tcp-request inspect-delay 5s\n\
         \x20   tcp-request content accept if {{ req.ssl_hello_type 1 }}\n\
         \x20   use_backend app if {{ req.ssl_sni -i {HOSTNAME} }}\n\
         backend app\n    balance leastconn\n{servers}",
        settings.threads
    );
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let child = Command::new(&settings.haproxy_binary)
        .args(["-db", "-f"])
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .expect("haproxy binary (set HAPROXY_BIN)");
    ProxyProcess {
        child,
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        _dir: dir,
    }
}

async fn wait_ready(connector: &TlsConnector, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(error) = exchange(connector, addr, b"ping\n", false).await {
        assert!(
            Instant::now() < deadline,
            "proxy on {addr} not ready within 20 s: {error}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CPU time (user plus system) a process has used, in milliseconds, from `/proc/PID/stat`.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1000.0 / per_second
}

#[derive(Default, Clone, Copy)]
struct Figures {
    connections_per_sec: f64,
    mib_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    failures: u64,
    cpu_ms_per_1000_connections: f64,
    cpu_ms_per_gib: f64,
}

async fn measure(connector: &TlsConnector, proxy: &ProxyProcess, settings: &Settings) -> Figures {
    let (addr, pid) = (proxy.addr, proxy.child.id());
    let cpu_start = cpu_ms(pid);
    let (connections, failed_c, _) = drive(connector, addr, settings, b"ping\n", false).await;
    let cpu_connections = cpu_ms(pid) - cpu_start;
    let cpu_start = cpu_ms(pid);
    let (_, failed_t, bytes) = drive(connector, addr, settings, b"get 1048576\n", true).await;
    let cpu_transfer = cpu_ms(pid) - cpu_start;
    let sorted = latencies(connector, addr, settings.latency_samples).await;
    Figures {
        connections_per_sec: connections as f64 / settings.seconds as f64,
        mib_per_sec: bytes as f64 / MIB as f64 / settings.seconds as f64,
        p50_us: percentile(&sorted, 0.50),
        p99_us: percentile(&sorted, 0.99),
        failures: failed_c + failed_t,
        cpu_ms_per_1000_connections: cpu_connections * 1000.0 / connections.max(1) as f64,
        cpu_ms_per_gib: cpu_transfer * 1024.0 / (bytes.max(1) as f64 / MIB as f64),
    }
}

fn average(rounds: &[Figures]) -> Figures {
    let n = rounds.len() as f64;
    Figures {
        connections_per_sec: rounds.iter().map(|f| f.connections_per_sec).sum::<f64>() / n,
        mib_per_sec: rounds.iter().map(|f| f.mib_per_sec).sum::<f64>() / n,
        p50_us: (rounds.iter().map(|f| f.p50_us as f64).sum::<f64>() / n) as u64,
        p99_us: (rounds.iter().map(|f| f.p99_us as f64).sum::<f64>() / n) as u64,
        failures: rounds.iter().map(|f| f.failures).sum(),
        cpu_ms_per_1000_connections: rounds
            .iter()
            .map(|f| f.cpu_ms_per_1000_connections)
            .sum::<f64>()
            / n,
        cpu_ms_per_gib: rounds.iter().map(|f| f.cpu_ms_per_gib).sum::<f64>() / n,
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let settings = settings();
    let names = vec![HOSTNAME.to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(client));

    let backends = vec![
        start_backend(acceptor.clone()).await,
        start_backend(acceptor).await,
    ];
    let kiln = start_kiln(&settings, &backends);
    let haproxy = start_haproxy(&settings, &backends);
    wait_ready(&connector, kiln.addr).await;
    wait_ready(&connector, haproxy.addr).await;

    eprintln!(
        "load: {} clients for {} s per workload, {} latency samples, {} rounds, kiln-ingress data path {}, {} threads per proxy",
        settings.concurrency,
        settings.seconds,
        settings.latency_samples,
        settings.rounds,
        settings.data_path,
        settings.threads
    );
    let direct = latencies(&connector, backends[0], settings.latency_samples).await;
    let (mut kiln_rounds, mut haproxy_rounds, mut direct_p99) =
        (Vec::new(), Vec::new(), vec![percentile(&direct, 0.99)]);
    for round in 0..settings.rounds {
        // Alternate which proxy goes first so warm-up and drift do not favour one.
        let order = if round % 2 == 0 {
            [&kiln, &haproxy]
        } else {
            [&haproxy, &kiln]
        };
        for proxy in order {
            let figures = measure(&connector, proxy, &settings).await;
            if std::ptr::eq(proxy, &kiln) {
                kiln_rounds.push(figures);
            } else {
                haproxy_rounds.push(figures);
            }
        }
        let direct = latencies(&connector, backends[0], settings.latency_samples).await;
        direct_p99.push(percentile(&direct, 0.99));
    }
    let kiln_figures = average(&kiln_rounds);
    let haproxy_figures = average(&haproxy_rounds);
    let direct_p99 = direct_p99.iter().sum::<u64>() / direct_p99.len() as u64;
    let added = |f: &Figures| f.p99_us.saturating_sub(direct_p99).max(1);

    println!("| figure | kiln-ingress | HAProxy | ratio (kiln / HAProxy, higher is better) |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| new TLS connections per second | {:.0} | {:.0} | {:.2}x |",
        kiln_figures.connections_per_sec,
        haproxy_figures.connections_per_sec,
        kiln_figures.connections_per_sec / haproxy_figures.connections_per_sec
    );
    println!(
        "| throughput, 1 MiB responses (MiB/s) | {:.0} | {:.0} | {:.2}x |",
        kiln_figures.mib_per_sec,
        haproxy_figures.mib_per_sec,
        kiln_figures.mib_per_sec / haproxy_figures.mib_per_sec
    );
    println!(
        "| added p99 latency, new connection (us; direct p99 {direct_p99} us) | {} | {} | {:.2}x |",
        added(&kiln_figures),
        added(&haproxy_figures),
        added(&haproxy_figures) as f64 / added(&kiln_figures) as f64
    );
    println!(
        "| p50 / p99 latency through the proxy (us) | {} / {} | {} / {} | |",
        kiln_figures.p50_us, kiln_figures.p99_us, haproxy_figures.p50_us, haproxy_figures.p99_us
    );
    println!(
        "| proxy CPU time per 1000 new connections (ms) | {:.0} | {:.0} | {:.2}x |",
        kiln_figures.cpu_ms_per_1000_connections,
        haproxy_figures.cpu_ms_per_1000_connections,
        haproxy_figures.cpu_ms_per_1000_connections / kiln_figures.cpu_ms_per_1000_connections
    );
    println!(
        "| proxy CPU time per GiB of 1 MiB responses (ms) | {:.0} | {:.0} | {:.2}x |",
        kiln_figures.cpu_ms_per_gib,
        haproxy_figures.cpu_ms_per_gib,
        haproxy_figures.cpu_ms_per_gib / kiln_figures.cpu_ms_per_gib
    );
    println!(
        "| failed connections | {} | {} | |",
        kiln_figures.failures, haproxy_figures.failures
    );
}
