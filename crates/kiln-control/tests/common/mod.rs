//! Fixtures shared by the orchestration and plan tests: `kiln-control` as a child process over
//! a private PostgreSQL database, and simulated agents that speak the real host API.

// Each test binary uses a different subset of these fixtures.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_api::client::EnvPath;
use kiln_api::{
    Client, CreateApp, CreateDeploy, CreateEnv, CreateHost, CreateRelease, Deploy, DeployStrategy,
    DeployTarget, ImageRef, Instance, ProcessSpec, ReleaseSpec, ServiceProtocol, ServiceSpec,
};
use kiln_core::{AppName, EnvName, OrgName, ProcessName};
use kiln_testkit::simagent::{SimAgent, SimAgentConfig};
use tempfile::TempDir;

/// Time a deploy gets to finish in these tests.
pub(crate) const DEPLOY_TIMEOUT: Duration = Duration::from_secs(90);

/// Time `kiln-control` gets to print its listen address.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `kiln-control serve`, killed on drop.
pub(crate) struct Control {
    pub(crate) child: Child,
    pub(crate) url: String,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bootstrapped cluster: its database, key file and tokens.
pub(crate) struct Cluster {
    pub(crate) dir: TempDir,
    pub(crate) database_url: String,
    pub(crate) org: OrgName,
    pub(crate) org_token: String,
    pub(crate) operator_token: String,
}

pub(crate) fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln-control"))
}

pub(crate) fn bootstrap() -> Cluster {
    let database = kiln_testkit::postgres::database().unwrap();
    let dir = TempDir::with_prefix("kiln-sched-").unwrap();

    let output = Command::new(binary())
        .args([
            "bootstrap",
            "--database-url",
            &database.url,
            "--org",
            "acme",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "bootstrap failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    let key = dir.path().join("master.key");
    let status = Command::new(binary())
        .args(["secrets", "generate-key", "--master-key-file"])
        .arg(&key)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());

    std::fs::write(
        dir.path().join("control.toml"),
        "leader_interval_secs = 1\nhost_lease_secs = 5\n",
    )
    .unwrap();

    Cluster {
        dir,
        database_url: database.url,
        org: OrgName::new("acme").unwrap(),
        org_token: json["org_token"]["secret"].as_str().unwrap().to_owned(),
        operator_token: json["operator_token"]["secret"]
            .as_str()
            .unwrap()
            .to_owned(),
    }
}

pub(crate) fn start_control(cluster: &Cluster) -> Control {
    start_control_on(cluster, "127.0.0.1:0")
}

/// Starts `kiln-control serve` listening on `listen`.
pub(crate) fn start_control_on(cluster: &Cluster, listen: &str) -> Control {
    let dir = cluster.dir.path();
    let mut child = Command::new(binary())
        .arg("serve")
        .arg("--config")
        .arg(dir.join("control.toml"))
        .args(["--listen", listen, "--database-url", &cluster.database_url])
        .arg("--master-key-file")
        .arg(dir.join("master.key"))
        .stdout(Stdio::piped())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("control.log"))
                .unwrap(),
        )
        .spawn()
        .unwrap();

    let stdout = child.stdout.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Some(address) = line.strip_prefix("listening on ") {
                let _ = sender.send(address.to_owned());
            }
        }
    });
    let address = receiver
        .recv_timeout(START_TIMEOUT)
        .expect("kiln-control printed no listen address in time");
    Control {
        child,
        url: format!("http://{address}"),
    }
}

pub(crate) async fn add_host(
    control: &Control,
    cluster: &Cluster,
    name: &str,
    config: SimAgentConfig,
) -> SimAgent {
    let operator = Client::new(&control.url, &cluster.operator_token).unwrap();
    let created = operator
        .create_host(&CreateHost {
            name: name.to_owned(),
        })
        .await
        .unwrap();
    SimAgent::start(&control.url, &created.token.secret, config)
        .await
        .unwrap()
}

/// 64 hex characters derived from `tag`, so each tag has its own image digest.
pub(crate) fn digest_hex(tag: &str) -> String {
    let hex: String = tag.bytes().map(|byte| format!("{byte:02x}")).collect();
    hex.repeat(64).chars().take(64).collect()
}

pub(crate) fn release(web: u32, worker: u32, tag: &str) -> CreateRelease {
    let web_name = ProcessName::new("web").unwrap();
    let process = |count| ProcessSpec {
        command: vec!["/app".to_owned()],
        count,
        vcpus: 1,
        memory_mib: 256,
        kill_signal: None,
        kill_timeout_secs: None,
    };
    let mut processes = BTreeMap::from([(web_name.clone(), process(web))]);
    if worker > 0 {
        processes.insert(ProcessName::new("worker").unwrap(), process(worker));
    }
    CreateRelease {
        image: ImageRef {
            reference: format!("registry.test/acme/shop:{tag}"),
            digest: format!("sha256:{}", digest_hex(tag)),
        },
        spec: ReleaseSpec {
            processes,
            services: vec![ServiceSpec {
                name: "http".to_owned(),
                process: web_name,
                internal_port: 8080,
                protocol: ServiceProtocol::Tls,
                hostnames: Vec::new(),
                proxy_protocol: false,
                health_check: None,
            }],
            env: BTreeMap::new(),
            volumes: Vec::new(),
            strategy: DeployStrategy::Rolling,
            max_surge: 1,
            kill_signal: "SIGTERM".to_owned(),
            kill_timeout_secs: 5,
            startup_scripts: Vec::new(),
            release_command: None,
            release_command_limits: None,
        },
        description: format!("release {tag}"),
    }
}

pub(crate) async fn create_env(control: &Control, cluster: &Cluster) -> (Client, EnvPath) {
    let client = Client::new(&control.url, &cluster.org_token).unwrap();
    let app = AppName::new("shop").unwrap();
    let env = EnvName::new("prod").unwrap();
    client
        .create_app(&cluster.org, &CreateApp { name: app.clone() })
        .await
        .unwrap();
    client
        .create_env(&cluster.org, &app, &CreateEnv { name: env.clone() })
        .await
        .unwrap();
    (client, EnvPath::new(cluster.org.clone(), app, env))
}

pub(crate) async fn deploy(client: &Client, env: &EnvPath, release: CreateRelease) -> Deploy {
    let created = client
        .create_deploy(
            env,
            &CreateDeploy {
                target: DeployTarget::NewRelease(Box::new(release)),
                strategy: None,
            },
        )
        .await
        .unwrap();
    created.deploy
}

/// Waits until a deploy ends, with a bounded wait.
pub(crate) async fn wait_deploy(client: &Client, env: &EnvPath, deploy: &Deploy) -> Deploy {
    let started = Instant::now();
    loop {
        let current = client.get_deploy(env, deploy.id).await.unwrap();
        if current.state.is_terminal() {
            return current;
        }
        assert!(
            started.elapsed() < DEPLOY_TIMEOUT,
            "deploy {} still {:?} after {DEPLOY_TIMEOUT:?}",
            deploy.id,
            current.state
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Instances that are wanted running, by release.
pub(crate) async fn running(client: &Client, env: &EnvPath) -> Vec<Instance> {
    client
        .list_instances(env)
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|instance| instance.desired == kiln_api::DesiredState::Running)
        .collect()
}
