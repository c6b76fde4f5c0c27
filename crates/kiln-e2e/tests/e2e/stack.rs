//! The stack under test: `scripts/dev up` inside a network namespace of its own, and helpers
//! that run the real `kiln` CLI and a real TLS client (curl) in that namespace.
//!
//! The namespace gives each stack its own loopback, TAP devices and nftables ruleset, so
//! stacks of parallel tests never see each other's rules or ports. The binaries are taken
//! from the target directory this test was built into (or `KILN_E2E_BIN`). They must be
//! built before the test runs: a running `cargo test` holds the target directory's lock, so
//! a nested `cargo build` would wait for it forever.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use serde_json::Value;

use crate::wait;

/// Time `scripts/dev up` may take: PostgreSQL, control, agent, ingress and registry start.
const STACK_UP_TIMEOUT: Duration = Duration::from_secs(300);
/// Time `scripts/dev down` may take, microVMs included.
const STACK_DOWN_TIMEOUT: Duration = Duration::from_secs(120);
/// Time a CLI command other than a followed deploy may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Time a followed deploy may take: an image pull, a rootfs build and a microVM boot under
/// QEMU TCG on a loaded 2-core machine.
pub(crate) const DEPLOY_TIMEOUT: Duration = Duration::from_secs(600);
/// Time to build the example image and push it to the stack's registry.
const IMAGE_TIMEOUT: Duration = Duration::from_secs(900);
/// Time one TLS request through the ingress may take.
const REQUEST_TIMEOUT_SECS: &str = "10";

/// The binaries the stack runs.
const BINARIES: [&str; 4] = ["kiln", "kiln-control", "kiln-agent", "kiln-ingress"];

/// The app's manifest: the example app with one instance per environment, so a test
/// controls every instance count itself. The health check's grace period is long because CI
/// boots these microVMs under QEMU TCG beside the rest of the test suite. An instance is
/// still reported healthy on its first passing check.
const MANIFEST: &str = r#"app = "hello"

[processes.web]
count = 1
vcpus = 1
memory = 128

[services.https]
process = "web"
port = 8443
protocol = "tls"

[services.https.health]
type = "tcp"
interval = "1s"
timeout = "1s"
grace_period = "60s"

[env]
TLS_HOSTNAMES = "localhost"
"#;

static NEXT_STACK: AtomicU32 = AtomicU32::new(0);

/// A running dev stack in its own network namespace; dropping it runs `scripts/dev down`
/// and deletes the namespace.
pub(crate) struct Stack {
    netns: String,
    root: tempfile::TempDir,
    bin: PathBuf,
    registry: String,
    ingress_port: u16,
}

impl Stack {
    /// Starts a stack; `label` names it in the namespace's name and in failure messages.
    pub(crate) fn start(label: &str) -> Self {
        let bin = binaries_dir();
        let guest = guest_dir();
        let number = NEXT_STACK.fetch_add(1, Ordering::Relaxed);
        let netns = format!("ke2e-{label}-{}-{number}", std::process::id());

        checked(
            ip(&["netns", "add", &netns]),
            "create the network namespace",
        );
        checked(
            ip(&["-n", &netns, "link", "set", "lo", "up"]),
            "bring up loopback in the namespace",
        );

        let root = tempfile::Builder::new()
            .prefix("kiln-e2e-")
            .tempdir()
            .expect("create the stack's temporary directory");
        let app = root.path().join("app");
        std::fs::create_dir_all(&app).expect("create the app directory");
        std::fs::write(app.join("kiln.toml"), MANIFEST).expect("write kiln.toml");

        let mut stack = Self {
            netns,
            root,
            bin,
            registry: String::new(),
            ingress_port: 0,
        };

        let mut up = stack.in_netns(&repo().join("scripts/dev"));
        up.arg("up").env("KILN_DEV_GUEST_DIR", &guest);
        let output = wait::run(up, None, STACK_UP_TIMEOUT);
        if !output.status.success() {
            panic!(
                "scripts/dev up failed ({}):\n{}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr),
                stack.daemon_logs()
            );
        }

        stack.registry = read_trimmed(&stack.dev_dir().join("registry/address"));
        stack.ingress_port = read_trimmed(&stack.dev_dir().join("ingress/port"))
            .parse()
            .expect("the ingress port file holds a port");
        stack
    }

    /// Returns the state directory of `scripts/dev`.
    pub(crate) fn dev_dir(&self) -> PathBuf {
        self.root.path().join("dev")
    }

    /// Returns the agent's state directory (instance records, disks, logs), which
    /// `scripts/dev` keeps under a short path and names in `agent/state-dir`.
    pub(crate) fn agent_state_dir(&self) -> PathBuf {
        PathBuf::from(read_trimmed(&self.dev_dir().join("agent/state-dir")))
    }

    /// Builds a command that runs `program` inside the stack's namespace with the dev stack's
    /// environment: its state directory, the CLI's config and context, no build.
    fn in_netns(&self, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.netns])
            .arg(program)
            .current_dir(self.root.path().join("app"))
            .env("KILN_DEV_DIR", self.dev_dir())
            .env("KILN_DEV_BIN", &self.bin)
            .env("KILN_DEV_NO_BUILD", "1")
            .env("XDG_CONFIG_HOME", self.root.path().join("config"))
            .env("KILN_CONTEXT", "dev")
            .env("NO_COLOR", "1")
            .env_remove("KILN_API_URL")
            .env_remove("KILN_TOKEN")
            .env_remove("KILN_ORG")
            .env_remove("KILN_APP")
            .env_remove("KILN_ENV");
        if let Ok(pg) = std::env::var("KILN_TEST_PG_DIR") {
            command.env("KILN_DEV_PG_DIR", pg);
        }
        command
    }

    /// Runs `kiln ARGS` and returns its output, whatever its exit status.
    pub(crate) fn kiln_output(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Output {
        let mut command = self.in_netns(&self.bin.join("kiln"));
        command.args(args);
        wait::run(command, stdin, timeout)
    }

    /// Runs `kiln ARGS`, panics unless it succeeds, and returns its stdout.
    pub(crate) fn kiln(&self, args: &[&str]) -> String {
        self.kiln_with(args, None, COMMAND_TIMEOUT)
    }

    /// Runs `kiln ARGS` with `stdin` and a timeout, panics unless it succeeds, and returns
    /// its stdout.
    pub(crate) fn kiln_with(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> String {
        let output = self.kiln_output(args, stdin, timeout);
        if !output.status.success() {
            // The daemons' logs follow from `Drop`.
            panic!(
                "kiln {} failed ({}):\n{}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        String::from_utf8(output.stdout).expect("kiln prints UTF-8")
    }

    /// Runs `kiln ARGS --json` and parses its stdout.
    pub(crate) fn kiln_json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let stdout = self.kiln(&args);
        serde_json::from_str(&stdout).unwrap_or_else(|error| {
            panic!(
                "kiln {} printed invalid JSON: {error}\n{stdout}",
                args.join(" ")
            )
        })
    }

    /// Follows a deploy of `image` (or of the current image, for `None`) to `env`.
    pub(crate) fn deploy(&self, env: &str, image: Option<&str>) {
        let mut args = vec!["deploy", "--env", env];
        if let Some(image) = image {
            args.extend(["--image", image]);
        }
        self.kiln_with(&args, None, DEPLOY_TIMEOUT);
    }

    /// Creates environment `env` of the app, and the app itself if needed.
    pub(crate) fn create_env(&self, env: &str) {
        let apps = self.kiln_json(&["apps", "list"]);
        let exists = apps["items"]
            .as_array()
            .is_some_and(|items| items.iter().any(|app| app["name"] == "hello"));
        if !exists {
            self.kiln(&["apps", "create", "hello"]);
        }
        self.kiln(&["envs", "create", env]);
    }

    /// Builds the example image (the build writes fresh timestamps, so each call gives a new
    /// digest), pushes it as `hello:TAG` and returns `REF@DIGEST`.
    pub(crate) fn push_image(&self, tag: &str) -> String {
        let layout = self.root.path().join(format!("image-{tag}"));
        let reference = format!("{}/hello:{tag}", self.registry);
        let mut command = self.in_netns(&repo().join("scripts/build-example-image"));
        command
            .arg("--output")
            .arg(&layout)
            .args(["--tag", tag, &reference]);
        let output = wait::run(command, None, IMAGE_TIMEOUT);
        if !output.status.success() {
            panic!(
                "scripts/build-example-image failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .last()
            .expect("build-example-image prints REF@DIGEST")
            .to_owned()
    }

    /// Replaces the app's `kiln.toml`.
    pub(crate) fn write_manifest(&self, manifest: &str) {
        std::fs::write(self.root.path().join("app/kiln.toml"), manifest).expect("write kiln.toml");
    }

    /// Builds a busybox image (a static `/bin/busybox` with `/bin/sh`, a world-writable
    /// `/tmp` and an empty `/www`, run as user 65532) with kiln-testkit's OCI builder, pushes
    /// it as `busybox:TAG` and returns `REF@DIGEST`.
    pub(crate) fn push_busybox_image(&self, tag: &str) -> String {
        use kiln_testkit::oci::{Artifact, Compression, ImageBuilder, LayerBuilder, Meta};

        let busybox =
            std::fs::read("/bin/busybox").expect("read /bin/busybox; install busybox-static");
        let layer = LayerBuilder::new()
            .dir("bin", Meta::mode(0o755))
            .file("bin/busybox", &busybox, Meta::mode(0o755))
            .symlink("bin/sh", "busybox")
            .dir("tmp", Meta::mode(0o1777))
            .dir("www", Meta::mode(0o755));
        let image = Artifact::Image(
            ImageBuilder::new()
                .layer(layer, Compression::Gzip)
                .config("User", serde_json::json!("65532:65532"))
                .config("WorkingDir", serde_json::json!("/"))
                .build(),
        );
        let layout = self.root.path().join(format!("busybox-{tag}"));
        image
            .write_oci_layout(&layout, tag)
            .expect("write the busybox image's OCI layout");

        let reference = format!("{}/busybox:{tag}", self.registry);
        let mut copy = self.in_netns(Path::new("/usr/bin/skopeo"));
        copy.args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{reference}"));
        let output = wait::run(copy, None, IMAGE_TIMEOUT);
        assert!(
            output.status.success(),
            "skopeo copy failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        format!("{reference}@{}", image.top().digest)
    }

    /// Returns the platform hostname of environment `env`.
    pub(crate) fn hostname(&self, env: &str) -> String {
        let status = self.kiln_json(&["status", "--env", env]);
        status["env"]["hostname"]
            .as_str()
            .unwrap_or_else(|| panic!("kiln status has no env.hostname: {status}"))
            .to_owned()
    }

    /// Returns the instances of `env` as `kiln status` lists them.
    pub(crate) fn instances(&self, env: &str) -> Vec<Value> {
        let status = self.kiln_json(&["status", "--env", env]);
        status["instances"].as_array().cloned().unwrap_or_default()
    }

    /// Sends one HTTPS request with SNI `hostname` through the ingress (curl, certificate not
    /// verified because the app's certificate is self-signed) and returns the parsed response
    /// body, or curl's error.
    pub(crate) fn request(&self, hostname: &str) -> Result<Answer, String> {
        let port = self.ingress_port;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.netns, "curl", "-sS", "-f", "-k"])
            .args([
                "--max-time",
                REQUEST_TIMEOUT_SECS,
                "--resolve",
                &format!("{hostname}:{port}:127.0.0.1"),
                &format!("https://{hostname}:{port}/"),
            ]);
        let output = command
            .output()
            .map_err(|error| format!("failed to run curl: {error}"))?;
        if !output.status.success() {
            return Err(format!(
                "curl {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Answer::parse(&String::from_utf8_lossy(&output.stdout)))
    }

    /// Pids of VMM processes (QEMU or Firecracker) whose command line names the agent's
    /// state directory.
    pub(crate) fn vm_pids(&self) -> Vec<u32> {
        let marker = self.agent_state_dir().display().to_string();
        let mut pids = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let vmm = comm.starts_with("qemu-system") || comm.trim() == "firecracker";
            if vmm && cmdline.contains(&marker) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Names of the links in the stack's namespace that look like the agent's TAP devices.
    pub(crate) fn tap_devices(&self) -> Vec<String> {
        let output = checked(ip(&["-n", &self.netns, "-o", "link", "show"]), "list links");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_owned())
            .filter(|name| name.starts_with("kd"))
            .collect()
    }

    /// Returns the nftables ruleset of the stack's namespace, as `nft list ruleset` prints it.
    pub(crate) fn nft_ruleset(&self) -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.netns, "nft", "list", "ruleset"])
            .output()
            .expect("run nft list ruleset");
        assert!(
            output.status.success(),
            "nft list ruleset failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Paths under the agent's state directory whose name contains `needle`.
    pub(crate) fn agent_paths_containing(&self, needle: &str) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut pending = vec![self.agent_state_dir()];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_name().to_string_lossy().contains(needle) {
                    found.push(path.clone());
                }
                if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                    pending.push(path);
                }
            }
        }
        found
    }

    /// Returns the last lines of each daemon's log, for failure messages.
    pub(crate) fn daemon_logs(&self) -> String {
        let mut text = String::new();
        for log in [
            "control/control.log",
            "agent/agent.log",
            "ingress/ingress.log",
        ] {
            let path = self.dev_dir().join(log);
            text.push_str(&format!(
                "--- {} (last lines)\n{}\n",
                path.display(),
                wait::tail(&path, 40)
            ));
        }
        text
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // A failed assertion names what it saw; the daemons' logs tell why, and CI keeps only
        // what the test printed.
        if thread::panicking() {
            eprintln!("{}", self.daemon_logs());
        }
        let mut down = self.in_netns(&repo().join("scripts/dev"));
        down.arg("down");
        let output = wait::run(down, None, STACK_DOWN_TIMEOUT);
        if !output.status.success() {
            eprintln!(
                "scripts/dev down failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let _ = ip(&["netns", "delete", &self.netns]);
    }
}

/// The example app's answer: `key: value` lines after a greeting.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    /// The whole body.
    pub(crate) body: String,
    fields: BTreeMap<String, String>,
}

impl Answer {
    fn parse(body: &str) -> Self {
        let fields = body
            .lines()
            .filter_map(|line| line.split_once(": "))
            .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
            .collect();
        Self {
            body: body.to_owned(),
            fields,
        }
    }

    /// Returns the value of field `key`, or the empty string.
    pub(crate) fn field(&self, key: &str) -> &str {
        self.fields.get(key).map(String::as_str).unwrap_or("")
    }

    /// Returns the secret names the instance reported.
    pub(crate) fn secrets(&self) -> Vec<String> {
        self.field("secrets")
            .split(',')
            .map(str::trim)
            // "(none)" and "(none: DIR does not exist)" mean no secrets.
            .filter(|name| !name.is_empty() && !name.starts_with('('))
            .map(str::to_owned)
            .collect()
    }
}

/// The repository's root directory.
pub(crate) fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The directory holding the binaries: `KILN_E2E_BIN`, else the target directory this test
/// runs from (`target/debug/deps/e2e-HASH` lives two levels below `target/debug`).
fn binaries_dir() -> PathBuf {
    let dir = match std::env::var_os("KILN_E2E_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::current_exe()
            .expect("locate the test executable")
            .parent()
            .and_then(Path::parent)
            .expect("the test executable lives in target/PROFILE/deps")
            .to_path_buf(),
    };
    for name in BINARIES {
        assert!(
            dir.join(name).is_file(),
            "{} is missing; build the binaries first with \
             `cargo build -p kiln-cli -p kiln-control -p kiln-agent -p kiln-ingress`, \
             or set KILN_E2E_BIN to their directory",
            dir.join(name).display()
        );
    }
    dir
}

/// Returns `KILN_GUEST_ASSETS`, or else the guest kernel directory from `scripts/guest-kernel`,
/// built once per test process. The script reuses an earlier build with the same inputs and
/// builds kiln-init in a target directory of its own, so it never waits for this test's cargo.
fn guest_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // scripts/test builds the assets once and exports their directory.
        if let Some(dir) = std::env::var_os("KILN_GUEST_ASSETS") {
            return PathBuf::from(dir);
        }
        let script = repo().join("scripts/guest-kernel");
        assert!(
            script.is_file(),
            "{} is missing; the end-to-end test needs the guest kernel",
            script.display()
        );
        let output = wait::run(Command::new(&script), None, IMAGE_TIMEOUT);
        assert!(
            output.status.success(),
            "scripts/guest-kernel failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("guest-kernel prints its directory")
                .trim(),
        )
    })
    .clone()
}

fn ip(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("failed to run ip {}: {error}", args.join(" ")))
}

fn checked(output: Output, what: &str) -> Output {
    assert!(
        output.status.success(),
        "failed to {what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("failed to read {}: {error}", path.display()))
        .trim()
        .to_owned()
}
