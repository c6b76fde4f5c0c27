//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF distribution project)
//! on loopback with filesystem storage in a temporary directory.
//!
//! When `KILN_TEST_REGISTRY` (`127.0.0.1:PORT` of a plain-HTTP registry) is set, that registry
//! is used instead and nothing is started. Tests share it safely by using
//! [`Registry::unique_repository`] names.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Time a started registry may take before `GET /v2/` succeeds.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// Start attempts, each on a fresh port, before giving up (another process may take the port
/// between probing it and the registry binding it).
const START_ATTEMPTS: u32 = 5;
/// The registry binary from Debian's `docker-registry` package.
const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";

static REPOSITORY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A running registry; a private one is stopped and its storage removed on drop.
#[derive(Debug)]
pub struct Registry {
    address: String,
    process: Option<Child>,
    _storage: Option<tempfile::TempDir>,
}

impl Registry {
    /// Returns the shared registry from `KILN_TEST_REGISTRY`, or starts a private one.
    pub fn start() -> anyhow::Result<Self> {
        if let Ok(address) = std::env::var("KILN_TEST_REGISTRY")
            && !address.is_empty()
        {
            wait_ready(&address, None)
                .with_context(|| format!("KILN_TEST_REGISTRY={address} does not answer /v2/"))?;
            return Ok(Self {
                address,
                process: None,
                _storage: None,
            });
        }

        Self::start_private(None)
    }

    /// Starts a private registry that requires basic auth as `username`/`password` (an
    /// htpasswd file with a bcrypt hash made by Python's `crypt` module).
    pub fn start_with_basic_auth(username: &str, password: &str) -> anyhow::Result<Self> {
        Self::start_private(Some((username, password)))
    }

    fn start_private(credentials: Option<(&str, &str)>) -> anyhow::Result<Self> {
        let storage = tempfile::Builder::new()
            .prefix("kiln-image-registry-")
            .tempdir()
            .context("failed to create registry storage directory")?;
        let auth = match credentials {
            Some((username, password)) => Some(write_htpasswd(storage.path(), username, password)?),
            None => None,
        };
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match start_private(storage.path(), auth.as_deref()) {
                Ok((address, process)) => {
                    return Ok(Self {
                        address,
                        process: Some(process),
                        _storage: Some(storage),
                    });
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("registry did not start")))
    }

    /// Returns the registry's `127.0.0.1:PORT`, as written in image references.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Returns a repository name that no other test in this or another process uses.
    pub fn unique_repository(&self, prefix: &str) -> String {
        format!(
            "kiln-test/{prefix}-{}-{}",
            std::process::id(),
            REPOSITORY_COUNTER.fetch_add(1, Ordering::Relaxed)
        )
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(process) = &mut self.process {
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("failed to bind a probe socket")?;
    Ok(listener.local_addr()?.port())
}

fn start_private(storage: &Path, auth: Option<&str>) -> anyhow::Result<(String, Child)> {
    let port = free_port()?;
    let address = format!("127.0.0.1:{port}");
    let config = format!(
        "version: 0.1\n\
         log:\n  level: error\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: {address}\n{}",
        storage.join("data").display(),
        auth.unwrap_or_default()
    );
    let config_path = storage.join(format!("config-{port}.yml"));
    std::fs::write(&config_path, config).context("failed to write registry config")?;

    let mut process = Command::new(REGISTRY_BINARY)
        .arg("serve")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("failed to start {REGISTRY_BINARY} (install Debian's docker-registry package)")
        })?;

    if let Err(error) = wait_ready(&address, Some(&mut process)) {
        let _ = process.kill();
        let mut stderr = String::new();
        if let Some(mut pipe) = process.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        let _ = process.wait();
        bail!("{error:#}; registry stderr: {}", stderr.trim());
    }
    Ok((address, process))
}

/// Polls `GET /v2/` until it returns 200 or 401, the process exits, or the timeout passes.
fn wait_ready(address: &str, mut process: Option<&mut Child>) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Some(process) = process.as_deref_mut()
            && let Some(status) = process.try_wait()?
        {
            bail!("registry exited with {status} before responding on {address}");
        }
        if probe(address).unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "registry on {address} timed out: no response to /v2/ within {STARTUP_TIMEOUT:?}"
            );
        }
        std::thread::sleep(PROBE_INTERVAL);
    }
}

fn probe(address: &str) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())?;
    let mut response = [0u8; 16];
    let read = stream.read(&mut response)?;
    let status = String::from_utf8_lossy(&response[..read]);
    Ok(status.starts_with("HTTP/1.0 200")
        || status.starts_with("HTTP/1.1 200")
        || status.contains(" 401"))
}

/// Writes an htpasswd file and returns the registry config section that uses it.
fn write_htpasswd(dir: &Path, username: &str, password: &str) -> anyhow::Result<String> {
    // docker-registry accepts only bcrypt hashes; Python's crypt module (glibc's libcrypt)
    // makes them without extra packages.
    let output = Command::new("/usr/bin/python3")
        .args([
            "-W",
            "ignore",
            "-c",
            "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
            password,
        ])
        .output()
        .context("failed to run python3 to hash the registry password")?;
    if !output.status.success() {
        bail!(
            "python3 failed to hash the password: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let hash = String::from_utf8(output.stdout).context("python3 printed a non-UTF-8 hash")?;
    let path = dir.join("htpasswd");
    std::fs::write(&path, format!("{username}:{}\n", hash.trim()))
        .context("failed to write htpasswd")?;
    Ok(format!(
        "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
        path.display()
    ))
}
