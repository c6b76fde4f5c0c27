//! Deploy-intent benchmark: deploys per second end to end through the HTTP API, with simulated
//! agents in place of hosts, against Nomad's published C1M placement rate.
//!
//! A release `kiln-control serve` runs as a child process over a private PostgreSQL database.
//! Simulated agents (`kiln_testkit::simagent`) register as hosts and speak the real host API:
//! they watch their assignments and report every instance healthy. The timed phase posts one
//! deploy of a new release to each of many environments (`POST .../deploys` with the release
//! in the body) from concurrent clients, then waits until the orchestrator has finished every
//! deploy: placed the instances, seen them healthy, moved the routes and marked the deploy
//! succeeded. Every instance counts as one placement.
//!
//! Nomad does not run here, so the anchor is its published figure: one million containers on
//! 5,000 hosts in under five minutes, about 3,750 placements per second.
//!
//! Settings come from the environment: `BENCH_CONTROL_BIN` (the `kiln-control` binary,
//! required), `BENCH_ENVS` (default 200), `BENCH_HOSTS` (default 100), `BENCH_INSTANCES` per
//! environment (default 50: 10,000 placements in all, 100 per host where C1M ran 200) and `BENCH_CLIENTS`, the concurrent API clients (default 16).
//! `BENCH_CONTROL_LOG` sets the control plane's `RUST_LOG` (default `warn`); its log is kept in
//! `BENCH_KEEP_DIR` when that names a directory.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_api::client::EnvPath;
use kiln_api::{
    Client, CreateApp, CreateDeploy, CreateEnv, CreateHost, CreateRelease, DeployStrategy,
    DeployTarget, HostCapacity, ImageRef, ProcessSpec, ReleaseSpec, ServiceProtocol, ServiceSpec,
};
use kiln_core::{AppName, EnvName, OrgName, ProcessName};
use kiln_testkit::simagent::{SimAgent, SimAgentConfig};
use tokio::sync::Semaphore;

/// Nomad's published C1M rate: one million containers on 5,000 hosts in under five minutes.
const NOMAD_PLACEMENTS_PER_SEC: f64 = 3_750.0;

/// Time the control plane gets to print its listen address.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Time every deploy gets to finish.
const DEPLOYS_TIMEOUT: Duration = Duration::from_secs(900);

/// Time between a simulated agent's heartbeats: the real agent's default `heartbeat_secs`.
const AGENT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

/// Long-poll wait of a simulated agent's assignments watch, in seconds: the real agent's.
const AGENT_WATCH_WAIT_SECS: u64 = 30;

/// Time between two checks of the deploys' states.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

fn setting(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .with_context(|| format!("invalid {name} {value:?}: expected a whole number")),
        Err(_) => Ok(default),
    }
}

/// A running `kiln-control serve`, killed on drop.
struct Control {
    child: Child,
    url: String,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tokens printed by `kiln-control bootstrap`.
struct Tokens {
    org: String,
    operator: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let binary = PathBuf::from(
        std::env::var_os("BENCH_CONTROL_BIN")
            .context("BENCH_CONTROL_BIN is not set; run bench/deploys/run")?,
    );
    let envs = setting("BENCH_ENVS", 200)?;
    let hosts = setting("BENCH_HOSTS", 100)?;
    let instances = u32::try_from(setting("BENCH_INSTANCES", 50)?)?;
    let clients = usize::try_from(setting("BENCH_CLIENTS", 16)?)?;

    let database = kiln_testkit::postgres::database()?;
    let dir = tempfile::Builder::new()
        .prefix("kiln-bench-deploys-")
        .tempdir()?;
    let tokens = bootstrap(&binary, &database.url, dir.path())?;
    let control = start_control(&binary, &database.url, dir.path())?;
    let pool = sqlx::PgPool::connect(&database.url).await?;

    let operator = Client::new(&control.url, &tokens.operator)?;
    let mut agents = Vec::new();
    for n in 0..hosts {
        let created = operator
            .create_host(&CreateHost {
                name: format!("h{n}"),
            })
            .await?;
        // Heartbeats and long polls as often as the real agent's defaults, not the faster
        // ones of the orchestration tests, so the background load per host is a real host's.
        let config = SimAgentConfig {
            capacity: HostCapacity {
                vcpus: 64,
                memory_mib: 1024 * 1024,
            },
            heartbeat_interval: AGENT_HEARTBEAT_INTERVAL,
            watch_wait_secs: AGENT_WATCH_WAIT_SECS,
            ..SimAgentConfig::default()
        };
        agents.push(SimAgent::start(&control.url, &created.token.secret, config).await?);
    }

    let client = Client::new(&control.url, &tokens.org)?;
    let org = OrgName::new("bench")?;
    let app = AppName::new("shop")?;
    client
        .create_app(&org, &CreateApp { name: app.clone() })
        .await?;
    let mut targets = Vec::new();
    for n in 0..envs {
        let name = EnvName::new(format!("e{n}"))?;
        client
            .create_env(&org, &app, &CreateEnv { name: name.clone() })
            .await?;
        targets.push(EnvPath::new(org.clone(), app.clone(), name));
    }

    // Timed: every deploy intent through the API, then until every deploy has finished.
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(clients));
    let mut posts = Vec::new();
    for (n, env) in targets.into_iter().enumerate() {
        let client = client.clone();
        let permits = Arc::clone(&permits);
        posts.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let request = CreateDeploy {
                target: DeployTarget::NewRelease(Box::new(release(n, instances))),
                strategy: None,
            };
            client.create_deploy(&env, &request).await?;
            anyhow::Ok(())
        }));
    }
    for post in posts {
        post.await??;
    }
    let posted = started.elapsed();

    let deadline = Instant::now() + DEPLOYS_TIMEOUT;
    let (succeeded, failed) = loop {
        let states: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM deploys GROUP BY state")
                .fetch_all(&pool)
                .await?;
        let states: BTreeMap<String, i64> = states.into_iter().collect();
        let succeeded = states.get("succeeded").copied().unwrap_or(0);
        let failed = states.get("failed").copied().unwrap_or(0);
        if u64::try_from(succeeded + failed)? >= envs {
            break (succeeded, failed);
        }
        if Instant::now() > deadline {
            bail!("deploys not finished within {DEPLOYS_TIMEOUT:?}: {states:?}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    let elapsed = started.elapsed();
    drop(agents);
    drop(control);

    let seconds = elapsed.as_secs_f64();
    let placements = f64::from(u32::try_from(succeeded)?) * f64::from(instances);
    let intents_per_sec = envs as f64 / seconds;
    let placements_per_sec = placements / seconds;
    println!(
        "environments: {envs}, hosts: {hosts}, instances per deploy: {instances}, API clients: {clients}"
    );
    println!(
        "deploys: {succeeded} succeeded, {failed} failed; all posted in {:.2} s, all finished in {seconds:.2} s",
        posted.as_secs_f64()
    );
    println!("deploy intents:  {intents_per_sec:.1} per second");
    println!(
        "placements:      {placements_per_sec:.1} per second (ratio to Nomad's published {NOMAD_PLACEMENTS_PER_SEC:.0}: {:.3}, target above 1)",
        placements_per_sec / NOMAD_PLACEMENTS_PER_SEC
    );
    if failed > 0 {
        bail!("{failed} deploys failed; see the control plane's log");
    }
    Ok(())
}

/// A release of environment number `n` whose `web` process type has `count` instances.
fn release(n: usize, count: u32) -> CreateRelease {
    let web = ProcessName::new("web").expect("web is a valid process name");
    let digest: String = format!("{n:064x}");
    CreateRelease {
        image: ImageRef {
            reference: format!("registry.test/bench/shop:{n}"),
            digest: format!("sha256:{digest}"),
        },
        spec: ReleaseSpec {
            processes: BTreeMap::from([(
                web.clone(),
                ProcessSpec {
                    command: vec!["/app".to_owned()],
                    count,
                    vcpus: 1,
                    memory_mib: 256,
                    kill_signal: None,
                    kill_timeout_secs: None,
                },
            )]),
            services: vec![ServiceSpec {
                name: "http".to_owned(),
                process: web,
                internal_port: 8080,
                protocol: ServiceProtocol::Tls,
                hostnames: Vec::new(),
                proxy_protocol: false,
                health_check: None,
            }],
            env: BTreeMap::new(),
            volumes: Vec::new(),
            strategy: DeployStrategy::Rolling,
            max_surge: count.max(1),
            kill_signal: "SIGTERM".to_owned(),
            kill_timeout_secs: 5,
            startup_scripts: Vec::new(),
            release_command: None,
            release_command_limits: None,
        },
        description: format!("bench release {n}"),
    }
}

fn bootstrap(binary: &Path, database_url: &str, dir: &Path) -> anyhow::Result<Tokens> {
    let output = Command::new(binary)
        .args([
            "bootstrap",
            "--database-url",
            database_url,
            "--org",
            "bench",
        ])
        .output()
        .context("failed to run kiln-control bootstrap")?;
    if !output.status.success() {
        bail!(
            "kiln-control bootstrap failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let secret = |key: &str| {
        json[key]["secret"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("bootstrap printed no {key}"))
    };

    let status = Command::new(binary)
        .args(["secrets", "generate-key", "--master-key-file"])
        .arg(dir.join("master.key"))
        .stdout(Stdio::null())
        .status()
        .context("failed to run kiln-control secrets generate-key")?;
    if !status.success() {
        bail!("kiln-control secrets generate-key failed: {status}");
    }
    std::fs::write(
        dir.join("control.toml"),
        "leader_interval_secs = 1\nhost_lease_secs = 60\n",
    )?;
    Ok(Tokens {
        org: secret("org_token")?,
        operator: secret("operator_token")?,
    })
}

fn start_control(binary: &Path, database_url: &str, dir: &Path) -> anyhow::Result<Control> {
    let log_dir =
        std::env::var_os("BENCH_KEEP_DIR").map_or_else(|| dir.to_path_buf(), PathBuf::from);
    let log = std::fs::File::create(log_dir.join("control.log"))?;
    let mut child = Command::new(binary)
        .arg("serve")
        .arg("--config")
        .arg(dir.join("control.toml"))
        .args(["--listen", "127.0.0.1:0", "--database-url", database_url])
        .arg("--master-key-file")
        .arg(dir.join("master.key"))
        .env(
            "RUST_LOG",
            std::env::var("BENCH_CONTROL_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("failed to start kiln-control serve")?;

    let stdout = child.stdout.take().context("no stdout pipe")?;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Some(address) = line.strip_prefix("listening on ") {
                let _ = sender.send(address.to_owned());
            }
        }
    });
    // Built before the wait, so the child is killed when it never prints its address.
    let mut control = Control {
        child,
        url: String::new(),
    };
    let address = receiver
        .recv_timeout(START_TIMEOUT)
        .context("kiln-control printed no listen address in time")?;
    control.url = format!("http://{address}");
    Ok(control)
}
