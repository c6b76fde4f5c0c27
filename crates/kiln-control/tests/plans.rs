//! Deploy plans, restarts and rollbacks end to end: `kiln-control` runs as a child process over
//! a private PostgreSQL database, and simulated agents speak the real host API in place of
//! hosts. The fixtures are shared with the orchestration tests (`tests/common`).

#![allow(clippy::unwrap_used)] // Fixtures in this file panic on setup failure, like the tests that call them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_api::client::EnvPath;
use kiln_api::{
    Assignment, Client, ClientError, CreateDeploy, CreateOrg, CreatePlan, CreateRelease,
    CreateToken, Deploy, DeployState, DeployTarget, ErrorCode, Plan, PlanAction, RestartEnv,
    UpdateConfig,
};
use kiln_core::{InstanceId, OrgName, ProcessName};
use kiln_testkit::simagent::{Outcome, SimAgent, SimAgentConfig};

mod common;

use common::*;

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
