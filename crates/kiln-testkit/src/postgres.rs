//! A private PostgreSQL cluster for tests and benchmarks, and one fresh database per test.
//!
//! When `KILN_TEST_PG_DIR` names the Unix-socket directory of a running cluster (superuser
//! `postgres`, no password), every database is created there. Otherwise the first call starts
//! a private cluster for the whole test process: `initdb` into a temporary directory, then
//! `postgres` listening on a Unix socket in that directory only (`listen_addresses=''`, so no
//! TCP port is opened). PostgreSQL refuses to run as root, so as root both run as the
//! `postgres` system user, which owns the directory.
//!
//! The cluster is supervised by a small `sh` process whose standard input is a pipe held open
//! by the test process. When the test process ends, for whatever reason, the pipe closes and
//! the supervisor stops PostgreSQL (fast shutdown) and removes the directory. This works the
//! same under `cargo test` (one process, many threads) and `cargo nextest` (one process per
//! test, each with its own cluster unless `KILN_TEST_PG_DIR` is set).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Environment variable naming the socket directory of a shared cluster.
pub const PG_DIR_ENV: &str = "KILN_TEST_PG_DIR";

/// Environment variable naming the port of the shared cluster's socket (default 5432). The
/// port only names the socket file `.s.PGSQL.PORT`; no TCP port is involved.
pub const PG_PORT_ENV: &str = "KILN_TEST_PG_PORT";

/// Environment variable naming the directory of the PostgreSQL server binaries, for machines
/// where they are not under `/usr/lib/postgresql/*/bin`.
pub const PG_BIN_ENV: &str = "KILN_PG_BIN";

/// Port number that names the private cluster's socket file.
const PRIVATE_PORT: u16 = 5432;

/// How long the private cluster may take to accept connections after `postgres` starts.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Interval between readiness probes while waiting for startup.
const STARTUP_POLL: Duration = Duration::from_millis(50);

/// Errors of the PostgreSQL fixture.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin; install the \
         `postgresql` package or set {PG_BIN_ENV} to the directory containing initdb"
    )]
    BinariesNotFound,
    /// The process runs as root but the `postgres` user does not exist.
    #[error(
        "running as root, but the `postgres` system user does not exist; install the \
         `postgresql` package, which creates it"
    )]
    NoPostgresUser,
    /// Creating or preparing the temporary directory failed.
    #[error("failed to prepare the cluster directory {path}")]
    TempDir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Changing the owner of the cluster directory failed.
    #[error("failed to give {path} to the postgres user")]
    Chown {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// A command could not be started.
    #[error("failed to run {command}")]
    Spawn {
        /// The command line.
        command: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A command exited with a failure status.
    #[error("{command} failed with {status}: {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Exit status.
        status: std::process::ExitStatus,
        /// Its standard error.
        stderr: String,
    },
    /// The cluster did not accept connections in time.
    #[error("PostgreSQL in {socket_dir} did not accept connections within {timeout:?}")]
    StartupTimedOut {
        /// The socket directory.
        socket_dir: PathBuf,
        /// The timeout.
        timeout: Duration,
    },
    /// An earlier attempt to start the private cluster failed.
    #[error("the private PostgreSQL cluster failed to start earlier in this process: {0}")]
    EarlierFailure(String),
}

/// A running PostgreSQL cluster reachable over a Unix socket.
#[derive(Debug)]
pub struct PgCluster {
    socket_dir: PathBuf,
    port: u16,
    bin_dir: PathBuf,
    /// The supervisor and the write end of its stdin pipe; dropping them (process exit)
    /// stops and removes a private cluster.
    _supervisor: Option<Mutex<Child>>,
}

impl PgCluster {
    /// Returns the process-wide cluster: the shared one named by `KILN_TEST_PG_DIR`, or a
    /// private one started on first use.
    pub fn shared() -> Result<&'static PgCluster, PgError> {
        static CLUSTER: OnceLock<Result<PgCluster, String>> = OnceLock::new();
        let cluster =
            CLUSTER.get_or_init(|| Self::from_env_or_start().map_err(|e| error_chain(&e)));
        cluster
            .as_ref()
            .map_err(|message| PgError::EarlierFailure(message.clone()))
    }

    fn from_env_or_start() -> Result<PgCluster, PgError> {
        let bin_dir = find_bin_dir()?;
        if let Some(dir) = std::env::var_os(PG_DIR_ENV).filter(|dir| !dir.is_empty()) {
            let port = std::env::var(PG_PORT_ENV)
                .ok()
                .and_then(|port| port.parse().ok())
                .unwrap_or(PRIVATE_PORT);
            return Ok(PgCluster {
                socket_dir: PathBuf::from(dir),
                port,
                bin_dir,
                _supervisor: None,
            });
        }
        Self::start_private(bin_dir)
    }

    /// Starts a new private cluster in a fresh temporary directory. It stops and its
    /// directory is removed when this process ends.
    pub fn start_private(bin_dir: PathBuf) -> Result<PgCluster, PgError> {
        let root = tempfile::Builder::new()
            .prefix("kiln-testkit-pg-")
            .tempdir()
            .map_err(|source| PgError::TempDir {
                path: std::env::temp_dir(),
                source,
            })?
            .keep();
        let data_dir = root.join("data");
        let as_postgres = running_as_root();
        if as_postgres {
            give_to_postgres(&root)?;
        }

        let initdb = bin_dir.join("initdb");
        let mut command = user_command(as_postgres, &initdb);
        command
            .arg("--pgdata")
            .arg(&data_dir)
            .args(["--username=postgres", "--auth=trust", "--encoding=UTF8"])
            .args(["--locale=C", "--no-sync", "--no-instructions"]);
        run(&mut command)?;

        let postgres = bin_dir.join("postgres");
        let port = PRIVATE_PORT.to_string();
        let mut server = user_command(as_postgres, &postgres);
        server
            .arg("-D")
            .arg(&data_dir)
            .arg("-k")
            .arg(&root)
            .args(["-p", &port])
            .args(["-c", "listen_addresses="])
            .args(["-c", "max_connections=300"])
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "synchronous_commit=off"]);
        let server_line = command_line(&server);

        // The supervisor runs the server in the background, waits until its own standard
        // input reaches end of file (this process exited), then stops the server and removes
        // the directory. Paths travel as positional arguments, never inside the script text.
        let script = r#"
            root="$1"; shift
            "$@" >"$root/postgres.log" 2>&1 &
            server=$!
            while read -r _; do :; done
            kill -INT "$server" 2>/dev/null
            wait "$server"
            rm -rf "$root"
        "#;
        let mut supervisor = Command::new("/bin/sh");
        supervisor
            .arg("-c")
            .arg(script)
            .arg("kiln-testkit-pg")
            .arg(&root)
            .arg(server.get_program())
            .args(server.get_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = supervisor.spawn().map_err(|source| PgError::Spawn {
            command: server_line.clone(),
            source,
        })?;

        let cluster = PgCluster {
            socket_dir: root.clone(),
            port: PRIVATE_PORT,
            bin_dir,
            _supervisor: Some(Mutex::new(child)),
        };
        cluster.wait_ready()?;
        Ok(cluster)
    }

    fn wait_ready(&self) -> Result<(), PgError> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let mut probe = Command::new(self.bin_dir.join("pg_isready"));
            probe
                .arg("-h")
                .arg(&self.socket_dir)
                .args(["-p", &self.port.to_string(), "-U", "postgres", "-q"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let ready = probe
                .status()
                .map(|status| status.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(PgError::StartupTimedOut {
                    socket_dir: self.socket_dir.clone(),
                    timeout: STARTUP_TIMEOUT,
                });
            }
            std::thread::sleep(STARTUP_POLL);
        }
    }

    /// Returns the Unix-socket directory.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// Returns the port number naming the socket file.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns the directory of the server binaries (`pgbench`, `psql`, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Returns a connection URL for `database` as the superuser, in the form sqlx and libpq
    /// accept (`postgres://postgres@localhost/DB?host=/socket/dir&port=5432`).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@localhost/{database}?host={}&port={}",
            self.socket_dir.display(),
            self.port
        )
    }

    /// Creates a database with a unique name and returns it.
    pub fn create_database(&self, prefix: &str) -> Result<TestDatabase, PgError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let serial = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.subsec_nanos())
            .unwrap_or(0);
        let name = format!("{prefix}_{}_{serial}_{nanos}", std::process::id());

        let mut command = Command::new(self.bin_dir.join("createdb"));
        command.arg("-h").arg(&self.socket_dir).args([
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            &name,
        ]);
        run(&mut command)?;

        Ok(TestDatabase {
            url: self.url(&name),
            name,
        })
    }
}

/// A database created for one test. It is left in place afterwards: a private cluster is
/// removed as a whole when the process ends, and names never repeat.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    /// Database name.
    pub name: String,
    /// Connection URL.
    pub url: String,
}

/// Creates a fresh database on the process-wide cluster (see [`PgCluster::shared`]).
pub fn database() -> Result<TestDatabase, PgError> {
    PgCluster::shared()?.create_database("kiln_test")
}

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn give_to_postgres(path: &Path) -> Result<(), PgError> {
    let user = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .ok_or(PgError::NoPostgresUser)?;
    nix::unistd::chown(path, Some(user.uid), Some(user.gid)).map_err(|source| PgError::Chown {
        path: path.to_owned(),
        source,
    })
}

/// Builds a command that runs `program` as the `postgres` user when `as_postgres` is set.
fn user_command(as_postgres: bool, program: &Path) -> Command {
    if !as_postgres {
        return Command::new(program);
    }
    let mut command = Command::new("/usr/bin/setpriv");
    command
        .args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
    command
}

fn run(command: &mut Command) -> Result<(), PgError> {
    let line = command_line(command);
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| PgError::Spawn {
            command: line.clone(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(PgError::CommandFailed {
        command: line,
        status: output.status,
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

fn command_line(command: &Command) -> String {
    let mut line = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

fn find_bin_dir() -> Result<PathBuf, PgError> {
    if let Some(dir) = std::env::var_os(PG_BIN_ENV).filter(|dir| !dir.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| PgError::BinariesNotFound)?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or(PgError::BinariesNotFound)
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn databases_are_distinct_and_reachable() {
        let cluster = PgCluster::shared().unwrap();
        let first = cluster.create_database("kiln_fixture").unwrap();
        let second = cluster.create_database("kiln_fixture").unwrap();
        assert_ne!(first.name, second.name);

        let output = Command::new(cluster.bin_dir().join("psql"))
            .arg("-h")
            .arg(cluster.socket_dir())
            .args(["-p", &cluster.port().to_string(), "-U", "postgres", "-tAc"])
            .arg("SELECT current_database()")
            .arg(&first.name)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), first.name);
    }

    #[test]
    fn private_cluster_listens_on_no_tcp_port() {
        let cluster = PgCluster::shared().unwrap();
        let output = Command::new(cluster.bin_dir().join("psql"))
            .arg("-h")
            .arg(cluster.socket_dir())
            .args(["-p", &cluster.port().to_string(), "-U", "postgres", "-tAc"])
            .arg("SHOW listen_addresses")
            .arg("postgres")
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        if std::env::var_os(PG_DIR_ENV).is_none() {
            assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "");
        }
    }
}
