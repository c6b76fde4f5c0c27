//! A real kiln-control for the CLI's tests: the `kiln-control` binary serving a fresh database
//! of the private PostgreSQL cluster (`kiln_testkit::postgres`), bootstrapped with org `acme`.
//!
//! The binary is `KILN_CONTROL_BIN` when set, else the one beside `kiln` in the target
//! directory, else it is built once with `cargo build -p kiln-control`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use crate::harness::Kiln;

/// How long kiln-control may take to print its listening address after it starts.
const SERVE_START_TIMEOUT: Duration = Duration::from_secs(60);

/// The org `kiln-control bootstrap` creates.
pub(crate) const ORG: &str = "acme";

/// The dedicated IPv4 pool of every test server: a /30 of TEST-NET-1, so two addresses
/// (192.0.2.1 and 192.0.2.2) can be allocated before the pool is exhausted.
pub(crate) const IPV4_POOL: &str = "192.0.2.0/30";

/// A running kiln-control with its database and tokens.
pub(crate) struct Control {
    pub(crate) url: String,
    /// The admin token of org `acme`.
    pub(crate) org_token: String,
    /// The cluster operator token.
    pub(crate) operator_token: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn control_bin() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("KILN_CONTROL_BIN") {
            return PathBuf::from(path);
        }
        let kiln = PathBuf::from(env!("CARGO_BIN_EXE_kiln"));
        let beside = kiln.with_file_name("kiln-control");
        // `cargo test --workspace` builds the binary before the tests run. Rebuilding it here
        // anyway would recompile kiln-control with this package's feature set, so a binary
        // newer than every source it is built from is used as it is.
        if is_fresh(&beside) {
            return beside;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .args(["build", "-p", "kiln-control", "--bin", "kiln-control"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build -p kiln-control");
        assert!(status.success(), "cargo build -p kiln-control failed");
        assert!(
            beside.exists(),
            "{} missing after the build",
            beside.display()
        );
        beside
    })
}

/// Whether `binary` exists and is newer than the sources of kiln-control and the crates it
/// depends on in this workspace, and than Cargo.lock.
fn is_fresh(binary: &Path) -> bool {
    let Ok(built) = binary.metadata().and_then(|m| m.modified()) else {
        return false;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut pending = vec![
        root.join("Cargo.lock"),
        root.join("crates/kiln-control"),
        root.join("crates/kiln-api"),
        root.join("crates/kiln-core"),
    ];
    while let Some(path) = pending.pop() {
        let Ok(metadata) = path.metadata() else {
            return false;
        };
        if metadata.is_dir() {
            let Ok(entries) = std::fs::read_dir(&path) else {
                return false;
            };
            pending.extend(entries.filter_map(Result::ok).map(|e| e.path()));
        } else if metadata
            .modified()
            .map_or(true, |modified| modified > built)
        {
            return false;
        }
    }
    true
}

impl Control {
    /// Starts kiln-control on a new database and bootstraps org `acme`.
    pub(crate) fn start() -> Self {
        let database = kiln_testkit::postgres::database().expect("create a test database");
        let dir = tempfile::Builder::new()
            .prefix("kiln-cli-control-")
            .tempdir()
            .unwrap();
        let key_file = dir.path().join("master.key");
        let config_file = dir.path().join("control.toml");
        std::fs::write(
            &config_file,
            format!("dedicated_ipv4_pool = [\"{IPV4_POOL}\"]\n"),
        )
        .unwrap();
        let bin = control_bin();

        let output = Command::new(bin)
            .args(["secrets", "generate-key", "--master-key-file"])
            .arg(&key_file)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "generate-key: {}",
            String::from_utf8_lossy(&output.stderr)
        );

        let output = Command::new(bin)
            .args(["bootstrap", "--database-url", &database.url, "--org", ORG])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "bootstrap: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let bootstrap: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let org_token = bootstrap["org_token"]["secret"]
            .as_str()
            .unwrap()
            .to_owned();
        let operator_token = bootstrap["operator_token"]["secret"]
            .as_str()
            .unwrap()
            .to_owned();

        let mut child = Command::new(bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                &database.url,
            ])
            .arg("--master-key-file")
            .arg(&key_file)
            .arg("--config")
            .arg(&config_file)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(address) = line.strip_prefix("listening on ") {
                    let _ = sender.send(address.to_owned());
                }
            }
        });
        let address = match receiver.recv_timeout(SERVE_START_TIMEOUT) {
            Ok(address) => address,
            Err(_) => {
                let _ = child.kill();
                panic!("kiln-control did not print its address within {SERVE_START_TIMEOUT:?}");
            }
        };

        Self {
            url: format!("http://{address}"),
            org_token,
            operator_token,
            child,
            _dir: dir,
        }
    }

    /// A `kiln` whose environment points at this server with the org token, not logged in.
    pub(crate) fn kiln(&self) -> Kiln {
        let mut kiln = Kiln::new();
        kiln.set_env("KILN_API_URL", &self.url);
        kiln.set_env("KILN_TOKEN", &self.org_token);
        kiln.set_env("KILN_ORG", ORG);
        kiln
    }
}
