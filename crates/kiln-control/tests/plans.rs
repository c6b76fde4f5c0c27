//! Deploy plans, restarts and rollbacks end to end: `kiln-control` runs as a child process over
//! a private PostgreSQL database, and simulated agents speak the real host API in place of
//! hosts. The fixtures repeat those of the orchestration tests, so each test binary builds
//! on its own.

#![allow(clippy::unwrap_used)] // Fixtures in this file panic on setup failure, like the tests that call them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_api::client::EnvPath;
use kiln_api::{
    Assignment, Client, ClientError, CreateApp, CreateDeploy, CreateEnv, CreateHost, CreateOrg,
    CreatePlan, CreateRelease, CreateToken, Deploy, DeployState, DeployStrategy, DeployTarget,
    ErrorCode, ImageRef, Instance, Plan, PlanAction, ProcessSpec, ReleaseSpec, RestartEnv,
    ServiceProtocol, ServiceSpec, UpdateConfig,
};
use kiln_core::{AppName, EnvName, InstanceId, OrgName, ProcessName};
use kiln_testkit::simagent::{Outcome, SimAgent, SimAgentConfig};
use tempfile::TempDir;

/// Time a deploy gets to finish in these tests.
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(90);

/// Time `kiln-control` gets to print its listen address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

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

/// A bootstrapped cluster: its database, key file and tokens.
struct Cluster {
    dir: TempDir,
    database_url: String,
    org: OrgName,
    org_token: String,
    operator_token: String,
}

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln-control"))
}

fn bootstrap() -> Cluster {
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

fn start_control(cluster: &Cluster) -> Control {
    start_control_on(cluster, "127.0.0.1:0")
}

/// Starts `kiln-control serve` listening on `listen`.
fn start_control_on(cluster: &Cluster, listen: &str) -> Control {
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

async fn add_host(
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
fn digest_hex(tag: &str) -> String {
    let hex: String = tag.bytes().map(|byte| format!("{byte:02x}")).collect();
    hex.repeat(64).chars().take(64).collect()
}

fn release(web: u32, worker: u32, tag: &str) -> CreateRelease {
    let web_name = ProcessName::new("web").unwrap();
    let process = |count| ProcessSpec {
        command: vec!["/app".to_owned()],
        count,
        vcpus: 1,
        memory_mib: 256,
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

async fn create_env(control: &Control, cluster: &Cluster) -> (Client, EnvPath) {
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

async fn deploy(client: &Client, env: &EnvPath, release: CreateRelease) -> Deploy {
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
async fn wait_deploy(client: &Client, env: &EnvPath, deploy: &Deploy) -> Deploy {
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
async fn running(client: &Client, env: &EnvPath) -> Vec<Instance> {
    client
        .list_instances(env)
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|instance| instance.desired == kiln_api::DesiredState::Running)
        .collect()
}

fn plan_request(release: CreateRelease) -> CreatePlan {
    CreatePlan {
        target: DeployTarget::NewRelease(Box::new(release)),
        strategy: None,
    }
}

/// Returns the instances a plan starts.
fn started(plan: &Plan) -> BTreeSet<InstanceId> {
    plan.steps
        .iter()
        .flat_map(|step| &step.actions)
        .filter_map(|action| match action {
            PlanAction::StartInstance { instance_id, .. } => Some(*instance_id),
            _ => None,
        })
        .collect()
}

/// Returns the instances a plan stops.
fn stopped(plan: &Plan) -> BTreeSet<InstanceId> {
    plan.steps
        .iter()
        .flat_map(|step| &step.actions)
        .filter_map(|action| match action {
            PlanAction::StopInstance { instance_id, .. } => Some(*instance_id),
            _ => None,
        })
        .collect()
}

/// Returns the error code of a failed call.
fn code(error: &ClientError) -> ErrorCode {
    match error {
        ClientError::Api { body, .. } => body.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Starts two hosts and deploys an env that runs `release(web, worker, "a")`.
async fn deployed(
    cluster: &Cluster,
    control: &Control,
    web: u32,
    worker: u32,
) -> (Vec<SimAgent>, Client, EnvPath, Deploy) {
    let mut agents = Vec::new();
    for name in ["h1", "h2"] {
        agents.push(add_host(control, cluster, name, SimAgentConfig::default()).await);
    }
    let (client, env) = create_env(control, cluster).await;
    let first = deploy(&client, &env, release(web, worker, "a")).await;
    let first = wait_deploy(&client, &env, &first).await;
    assert_eq!(first.state, DeployState::Succeeded, "{:?}", first.failure);
    (agents, client, env, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_then_apply_runs_plan() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let (agents, client, env, first) = deployed(&cluster, &control, 2, 1).await;
    let old: BTreeSet<InstanceId> = running(&client, &env).await.iter().map(|i| i.id).collect();

    let plan = client
        .create_plan(&env, &plan_request(release(2, 1, "b")))
        .await
        .unwrap();
    let change = &plan.release;
    assert_eq!(change.from.as_ref().map(|r| r.id), Some(first.release_id));
    assert_eq!(change.to.version, 2);
    assert!(change.creates_release);
    assert!(change.image_changed);
    assert_eq!(
        change.to.image.digest,
        format!("sha256:{}", digest_hex("b"))
    );
    assert_eq!(started(&plan).len(), 3);
    assert_eq!(stopped(&plan), old);
    for action in plan.steps.iter().flat_map(|step| &step.actions) {
        if let PlanAction::StartInstance { host, .. } | PlanAction::StopInstance { host, .. } =
            action
        {
            assert!(host == "h1" || host == "h2", "{action:?}");
        }
    }
    let shown = client.get_plan(&env, plan.id).await.unwrap();
    assert_eq!(shown, plan);

    // Planning changes nothing.
    assert_eq!(client.list_releases(&env).await.unwrap().items.len(), 1);
    assert_eq!(client.list_deploys(&env).await.unwrap().items.len(), 1);

    let created = client.apply_plan(&env, plan.id).await.unwrap();
    assert_eq!(created.deploy.id, plan.deploy_id);
    assert_eq!(created.release.id, plan.release.to.id);
    assert_eq!(created.release.version, 2);
    let done = wait_deploy(&client, &env, &created.deploy).await;
    assert_eq!(done.state, DeployState::Succeeded, "{:?}", done.failure);

    // Exactly the planned instances run, on the planned hosts.
    let now = running(&client, &env).await;
    let ids: BTreeSet<InstanceId> = now.iter().map(|i| i.id).collect();
    assert_eq!(ids, started(&plan));
    let host_names: BTreeMap<_, _> = agents
        .iter()
        .map(|agent| (agent.lease().host.id, agent.lease().host.name.clone()))
        .collect();
    for action in plan.steps.iter().flat_map(|step| &step.actions) {
        if let PlanAction::StartInstance {
            instance_id, host, ..
        } = action
        {
            let instance = now.iter().find(|i| i.id == *instance_id).unwrap();
            assert_eq!(&host_names[&instance.host_id], host);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_twice_is_identical() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let (_agents, client, env, _) = deployed(&cluster, &control, 2, 0).await;

    let request = plan_request(release(3, 1, "b"));
    let first = client.create_plan(&env, &request).await.unwrap();
    let second = client.create_plan(&env, &request).await.unwrap();
    assert_eq!(first.id, second.id);
    assert_eq!(first.deploy_id, second.deploy_id);
    assert_eq!(first.steps, second.steps);
    assert_eq!(first.release, second.release);

    let other = client
        .create_plan(&env, &plan_request(release(3, 1, "c")))
        .await
        .unwrap();
    assert_ne!(other.id, first.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_change_conflicts_plan() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let (_agents, client, env, first) = deployed(&cluster, &control, 1, 0).await;

    let plan = client
        .create_plan(&env, &plan_request(release(1, 0, "b")))
        .await
        .unwrap();
    client
        .update_config(
            &env,
            &UpdateConfig {
                set: BTreeMap::from([("GREETING".to_owned(), "hi".to_owned())]),
                unset: Vec::new(),
            },
        )
        .await
        .unwrap();
    let error = client.apply_plan(&env, plan.id).await.unwrap_err();
    assert_eq!(code(&error), ErrorCode::PlanConflict, "{error}");
    assert!(error.to_string().contains("make a new plan"), "{error}");

    // Nothing was deployed.
    let current = client.get_env(&env).await.unwrap();
    assert_eq!(current.current_release_id, Some(first.release_id));
    assert_eq!(client.list_releases(&env).await.unwrap().items.len(), 1);

    // A new plan includes the config change and applies.
    let plan = client
        .create_plan(&env, &plan_request(release(1, 0, "b")))
        .await
        .unwrap();
    assert_eq!(plan.release.config_set, vec!["GREETING".to_owned()]);
    let created = client.apply_plan(&env, plan.id).await.unwrap();
    let done = wait_deploy(&client, &env, &created.deploy).await;
    assert_eq!(done.state, DeployState::Succeeded, "{:?}", done.failure);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_and_deploy_conflict_plan() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let (_agents, client, env, _) = deployed(&cluster, &control, 1, 0).await;

    let by_scale = client
        .create_plan(&env, &plan_request(release(1, 0, "b")))
        .await
        .unwrap();
    let web = ProcessName::new("web").unwrap();
    client
        .scale_env(
            &env,
            &kiln_api::ScaleEnv {
                counts: BTreeMap::from([(web, 2)]),
            },
        )
        .await
        .unwrap();
    let error = client.apply_plan(&env, by_scale.id).await.unwrap_err();
    assert_eq!(code(&error), ErrorCode::PlanConflict, "{error}");

    // Let the scale finish, then race a plan against a direct deploy.
    let started = Instant::now();
    while running(&client, &env).await.len() != 2
        || client
            .list_deploys(&env)
            .await
            .unwrap()
            .items
            .iter()
            .any(|d| !d.state.is_terminal())
    {
        assert!(started.elapsed() < DEPLOY_TIMEOUT, "scale did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let by_deploy = client
        .create_plan(&env, &plan_request(release(1, 0, "c")))
        .await
        .unwrap();
    let other = deploy(&client, &env, release(1, 0, "d")).await;
    let error = client.apply_plan(&env, by_deploy.id).await.unwrap_err();
    assert_eq!(code(&error), ErrorCode::PlanConflict, "{error}");
    let other = wait_deploy(&client, &env, &other).await;
    assert_eq!(other.state, DeployState::Succeeded, "{:?}", other.failure);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_twice_rejected() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let (_agents, client, env, _) = deployed(&cluster, &control, 1, 0).await;

    let plan = client
        .create_plan(&env, &plan_request(release(1, 0, "b")))
        .await
        .unwrap();
    let created = client.apply_plan(&env, plan.id).await.unwrap();
    let error = client.apply_plan(&env, plan.id).await.unwrap_err();
    assert_eq!(code(&error), ErrorCode::FailedPrecondition, "{error}");
    assert!(error.to_string().contains("already applied"), "{error}");

    let done = wait_deploy(&client, &env, &created.deploy).await;
    assert_eq!(done.state, DeployState::Succeeded, "{:?}", done.failure);
    assert_eq!(client.list_deploys(&env).await.unwrap().items.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_plan_rejected() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let (_agents, client, env, _) = deployed(&cluster, &control, 1, 0).await;

    let plan = client
        .create_plan(&env, &plan_request(release(1, 0, "b")))
        .await
        .unwrap();
    let pool = sqlx::PgPool::connect(&cluster.database_url).await.unwrap();
    sqlx::query("UPDATE plans SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(plan.id.as_uuid())
        .execute(&pool)
        .await
        .unwrap();
    let error = client.apply_plan(&env, plan.id).await.unwrap_err();
    assert_eq!(code(&error), ErrorCode::FailedPrecondition, "{error}");
    assert!(error.to_string().contains("expired"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_org_cannot_see_plan() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let (_agents, client, env, _) = deployed(&cluster, &control, 1, 0).await;
    let plan = client
        .create_plan(&env, &plan_request(release(1, 0, "b")))
        .await
        .unwrap();

    let operator = Client::new(&control.url, &cluster.operator_token).unwrap();
    let rival = OrgName::new("rival").unwrap();
    operator
        .create_org(&CreateOrg {
            name: rival.clone(),
        })
        .await
        .unwrap();
    let token = operator
        .create_token(
            &rival,
            &CreateToken {
                name: "ci".to_owned(),
                expires_in_secs: None,
            },
        )
        .await
        .unwrap();
    let intruder = Client::new(&control.url, &token.secret).unwrap();

    // The rival's token names the plan's own path and its own org: both are not found.
    for path in [
        env.clone(),
        EnvPath::new(rival.clone(), env.app.clone(), env.env.clone()),
    ] {
        let error = intruder.apply_plan(&path, plan.id).await.unwrap_err();
        assert_eq!(code(&error), ErrorCode::NotFound, "{error}");
        let error = intruder.get_plan(&path, plan.id).await.unwrap_err();
        assert_eq!(code(&error), ErrorCode::NotFound, "{error}");
    }
    // The plan is still there for its own org.
    assert!(client.apply_plan(&env, plan.id).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_replaces_one_process() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let (agents, client, env, first) = deployed(&cluster, &control, 2, 1).await;
    let before = running(&client, &env).await;

    let worker = ProcessName::new("worker").unwrap();
    let created = client
        .restart_env(
            &env,
            &RestartEnv {
                process: Some(worker.clone()),
            },
        )
        .await
        .unwrap();
    assert_eq!(created.release.id, first.release_id);
    let done = wait_deploy(&client, &env, &created.deploy).await;
    assert_eq!(done.state, DeployState::Succeeded, "{:?}", done.failure);

    let after = running(&client, &env).await;
    assert_eq!(after.len(), 3, "{after:?}");
    for instance in &before {
        let kept = after.iter().any(|i| i.id == instance.id);
        assert_eq!(kept, instance.process != worker, "{instance:?}");
    }
    assert!(after.iter().all(|i| i.release_id == first.release_id));

    // A restart of everything replaces every instance, and the deploy list shows both.
    let created = client
        .restart_env(&env, &RestartEnv::default())
        .await
        .unwrap();
    let done = wait_deploy(&client, &env, &created.deploy).await;
    assert_eq!(done.state, DeployState::Succeeded, "{:?}", done.failure);
    let last = running(&client, &env).await;
    assert_eq!(last.len(), 3);
    assert!(last.iter().all(|i| !after.iter().any(|a| a.id == i.id)));
    assert_eq!(client.list_deploys(&env).await.unwrap().items.len(), 3);
    for agent in &agents {
        assert!(agent.duplicate_starts().is_empty());
    }

    let error = client
        .restart_env(
            &env,
            &RestartEnv {
                process: Some(ProcessName::new("cron").unwrap()),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&error), ErrorCode::InvalidValue, "{error}");
    assert!(error.to_string().contains("web, worker"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_release_rejected() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let _h1 = add_host(&control, &cluster, "h1", SimAgentConfig::default()).await;
    let (client, env) = create_env(&control, &cluster).await;
    let error = client
        .restart_env(&env, &RestartEnv::default())
        .await
        .unwrap_err();
    assert_eq!(code(&error), ErrorCode::FailedPrecondition, "{error}");
    assert!(error.to_string().contains("deploy one first"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_is_new_release() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    // Record every assignment the agents receive, with its environment variables.
    let seen: Arc<Mutex<Vec<Assignment>>> = Arc::default();
    let recorder = seen.clone();
    let config = SimAgentConfig {
        behavior: Arc::new(move |assignment| {
            recorder.lock().unwrap().push(assignment.clone());
            Outcome::Healthy
        }),
        ..SimAgentConfig::default()
    };
    let _h1 = add_host(&control, &cluster, "h1", config.clone()).await;
    let _h2 = add_host(&control, &cluster, "h2", config).await;
    let (client, env) = create_env(&control, &cluster).await;
    let set = |name: &str, value: &str| UpdateConfig {
        set: BTreeMap::from([(name.to_owned(), value.to_owned())]),
        unset: Vec::new(),
    };

    client
        .update_config(&env, &set("GREETING", "one"))
        .await
        .unwrap();
    let v1 = deploy(&client, &env, release(2, 0, "a")).await;
    let v1 = wait_deploy(&client, &env, &v1).await;
    assert_eq!(v1.state, DeployState::Succeeded, "{:?}", v1.failure);

    client
        .update_config(&env, &set("GREETING", "two"))
        .await
        .unwrap();
    client
        .update_config(&env, &set("EXTRA", "x"))
        .await
        .unwrap();
    let v2 = deploy(&client, &env, release(2, 0, "b")).await;
    let v2 = wait_deploy(&client, &env, &v2).await;
    assert_eq!(v2.state, DeployState::Succeeded, "{:?}", v2.failure);

    // A plan of the rollback shows the restored config before anything changes.
    let rollback = CreatePlan {
        target: DeployTarget::ReleaseVersion(1),
        strategy: None,
    };
    let plan = client.create_plan(&env, &rollback).await.unwrap();
    assert_eq!(plan.release.to.version, 3);
    assert_eq!(plan.release.to.rollback_of, Some(v1.release_id));
    assert_eq!(plan.release.config_set, vec!["GREETING".to_owned()]);
    assert_eq!(plan.release.config_unset, vec!["EXTRA".to_owned()]);

    let created = client
        .create_deploy(
            &env,
            &CreateDeploy {
                target: DeployTarget::ReleaseVersion(1),
                strategy: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(created.release.version, 3);
    assert_eq!(created.release.rollback_of, Some(v1.release_id));
    assert_eq!(
        created.release.image.digest,
        format!("sha256:{}", digest_hex("a"))
    );
    let done = wait_deploy(&client, &env, &created.deploy).await;
    assert_eq!(done.state, DeployState::Succeeded, "{:?}", done.failure);

    let releases = client.list_releases(&env).await.unwrap().items;
    let versions: Vec<u64> = releases.iter().map(|r| r.version).collect();
    assert_eq!(versions, vec![3, 2, 1]);
    let current = client.get_env(&env).await.unwrap();
    assert_eq!(current.current_release_id, Some(created.release.id));

    let config = client.get_config(&env).await.unwrap();
    assert_eq!(
        config.vars,
        BTreeMap::from([("GREETING".to_owned(), "one".to_owned())])
    );
    assert_eq!(created.release.config_version, config.version);

    // The instances of the rollback release run the old image with the old config values.
    let instances = running(&client, &env).await;
    assert_eq!(instances.len(), 2);
    let seen = seen.lock().unwrap();
    for instance in &instances {
        assert_eq!(instance.release_id, created.release.id);
        let assignment = seen
            .iter()
            .find(|a| a.instance_id == instance.id)
            .expect("every running instance was assigned");
        assert_eq!(
            assignment.image.digest,
            format!("sha256:{}", digest_hex("a"))
        );
        assert_eq!(
            assignment.env_vars.get("GREETING").map(String::as_str),
            Some("one")
        );
        assert!(!assignment.env_vars.contains_key("EXTRA"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeploy_of_current_release_keeps_it() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let (_agents, client, env, first) = deployed(&cluster, &control, 1, 0).await;
    let created = client
        .create_deploy(
            &env,
            &CreateDeploy {
                target: DeployTarget::ReleaseVersion(1),
                strategy: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(created.release.id, first.release_id);
    let done = wait_deploy(&client, &env, &created.deploy).await;
    assert_eq!(done.state, DeployState::Succeeded, "{:?}", done.failure);
    assert_eq!(client.list_releases(&env).await.unwrap().items.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cordoned_host_conflicts_plan() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let (_agents, client, env, _) = deployed(&cluster, &control, 2, 0).await;

    let plan = client
        .create_plan(&env, &plan_request(release(2, 0, "b")))
        .await
        .unwrap();
    let hosts: BTreeSet<String> = plan
        .steps
        .iter()
        .flat_map(|step| &step.actions)
        .filter_map(|action| match action {
            PlanAction::StartInstance { host, .. } => Some(host.clone()),
            _ => None,
        })
        .collect();
    let cordoned = hosts.iter().next().unwrap().clone();

    // A cordon changes the host, not the env, so only the host check catches it.
    let operator = Client::new(&control.url, &cluster.operator_token).unwrap();
    operator.cordon_host(&cordoned).await.unwrap();
    let error = client.apply_plan(&env, plan.id).await.unwrap_err();
    assert_eq!(code(&error), ErrorCode::PlanConflict, "{error}");
    assert!(error.to_string().contains(&cordoned), "{error}");

    operator.uncordon_host(&cordoned).await.unwrap();
    let created = client.apply_plan(&env, plan.id).await.unwrap();
    let done = wait_deploy(&client, &env, &created.deploy).await;
    assert_eq!(done.state, DeployState::Succeeded, "{:?}", done.failure);
}
