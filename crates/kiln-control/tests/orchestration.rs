//! Deploy orchestration end to end: `kiln-control` runs as a child process over a private
//! PostgreSQL database, and simulated agents speak the real host API in place of hosts.

#![allow(clippy::unwrap_used)] // Fixtures in this file panic on setup failure, like the tests that call them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_api::client::EnvPath;
use kiln_api::{
    Client, CreateDeploy, CreateRelease, Deploy, DeployState, DeployTarget, Instance,
    ReleaseCommandLimits,
};
use kiln_core::ProcessName;
use kiln_testkit::simagent::{Outcome, SimAgentConfig};

mod common;

use common::*;

/// Time a scale gets to take effect, its instances healthy and routed.
const SCALE_TIMEOUT: Duration = Duration::from_secs(90);

fn key_path(cluster: &Cluster) -> &Path {
    cluster.dir.path()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_deploy_replaces_instances() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let _ = key_path(&cluster);
    let mut agents = Vec::new();
    for name in ["h1", "h2", "h3"] {
        agents.push(add_host(&control, &cluster, name, SimAgentConfig::default()).await);
    }
    let (client, env) = create_env(&control, &cluster).await;

    let first = deploy(&client, &env, release(3, 1, "a")).await;
    let first = wait_deploy(&client, &env, &first).await;
    assert_eq!(first.state, DeployState::Succeeded, "{:?}", first.failure);
    let v1 = running(&client, &env).await;
    assert_eq!(v1.len(), 4);

    // Replicas of web spread over the three hosts.
    let web_hosts: std::collections::BTreeSet<_> = v1
        .iter()
        .filter(|instance| instance.process.as_str() == "web")
        .map(|instance| instance.host_id)
        .collect();
    assert_eq!(web_hosts.len(), 3);

    let second = deploy(&client, &env, release(3, 1, "b")).await;
    let second = wait_deploy(&client, &env, &second).await;
    assert_eq!(second.state, DeployState::Succeeded, "{:?}", second.failure);
    let v2 = running(&client, &env).await;
    assert_eq!(v2.len(), 4);
    assert!(
        v2.iter()
            .all(|instance| instance.release_id == second.release_id)
    );

    let routes = client.list_env_routes(&env).await.unwrap().items;
    assert_eq!(routes.len(), 1);
    let backends: std::collections::BTreeSet<_> =
        routes[0].backends.iter().map(|b| b.instance_id).collect();
    let web: std::collections::BTreeSet<_> = v2
        .iter()
        .filter(|instance| instance.process.as_str() == "web")
        .map(|instance| instance.id)
        .collect();
    assert_eq!(backends, web);

    for agent in &agents {
        assert!(agent.duplicate_starts().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_release_rolls_back() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    // Instances of images tagged "bad" fail at boot.
    let behavior: kiln_testkit::simagent::Behavior = std::sync::Arc::new(|assignment| {
        if assignment.image.reference.ends_with(":bad") {
            Outcome::Fail
        } else {
            Outcome::Healthy
        }
    });
    let config = SimAgentConfig {
        behavior,
        ..SimAgentConfig::default()
    };
    let _h1 = add_host(&control, &cluster, "h1", config.clone()).await;
    let _h2 = add_host(&control, &cluster, "h2", config).await;
    let (client, env) = create_env(&control, &cluster).await;

    let good = deploy(&client, &env, release(2, 0, "good")).await;
    let good = wait_deploy(&client, &env, &good).await;
    assert_eq!(good.state, DeployState::Succeeded, "{:?}", good.failure);

    let bad = deploy(&client, &env, release(2, 0, "bad")).await;
    let bad = wait_deploy(&client, &env, &bad).await;
    assert_eq!(bad.state, DeployState::Failed);
    let failure = bad.failure.unwrap_or_default();
    assert!(
        failure.contains("stopped before it became healthy"),
        "{failure}"
    );

    let instances = running(&client, &env).await;
    assert_eq!(instances.len(), 2);
    assert!(instances.iter().all(|i| i.release_id == good.release_id));
    let current = client.get_env(&env).await.unwrap();
    assert_eq!(current.current_release_id, Some(good.release_id));
}

/// Sets config var `FOO` and secret `TOKEN` of `env` to `value`.
async fn set_config_and_secret(client: &Client, env: &EnvPath, value: &str) {
    client
        .update_config(
            env,
            &kiln_api::UpdateConfig {
                set: BTreeMap::from([("FOO".to_owned(), value.to_owned())]),
                unset: Vec::new(),
            },
        )
        .await
        .unwrap();
    client
        .set_secret(
            env,
            "TOKEN",
            &kiln_api::SetSecret {
                value: value.to_owned(),
            },
        )
        .await
        .unwrap();
}

/// Deploys v1 with config and secret value `one`, then v2 with `two`, and returns v2's
/// deploy.
async fn deploy_one_then_two(client: &Client, env: &EnvPath) -> Deploy {
    set_config_and_secret(client, env, "one").await;
    let first = deploy(client, env, release(1, 0, "a")).await;
    assert_eq!(
        wait_deploy(client, env, &first).await.state,
        DeployState::Succeeded
    );
    set_config_and_secret(client, env, "two").await;
    let second = deploy(client, env, release(1, 0, "b")).await;
    assert_eq!(
        wait_deploy(client, env, &second).await.state,
        DeployState::Succeeded
    );
    second
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_rollback_restores_config_and_secrets() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    // Instances of release v3, the rollback below, fail at boot.
    let behavior: kiln_testkit::simagent::Behavior = std::sync::Arc::new(|assignment| {
        if assignment.release_version == 3 {
            Outcome::Fail
        } else {
            Outcome::Healthy
        }
    });
    let config = SimAgentConfig {
        behavior,
        ..SimAgentConfig::default()
    };
    let _h1 = add_host(&control, &cluster, "h1", config).await;
    let (client, env) = create_env(&control, &cluster).await;

    let second = deploy_one_then_two(&client, &env).await;

    let rollback = client
        .create_deploy(
            &env,
            &CreateDeploy {
                target: DeployTarget::ReleaseVersion(1),
                strategy: None,
            },
        )
        .await
        .unwrap();
    let rollback = wait_deploy(&client, &env, &rollback.deploy).await;
    assert_eq!(rollback.state, DeployState::Failed);

    // It failed, so the env runs v2 again, with v2's config and secrets. The config went
    // through two more versions: v1's values for the rollback, then v2's again.
    let current = client.get_env(&env).await.unwrap();
    assert_eq!(current.current_release_id, Some(second.release_id));
    let config = client.get_config(&env).await.unwrap();
    assert_eq!(config.vars["FOO"], "two");
    assert_eq!(config.version, 4);
    let secrets = client.list_secrets(&env).await.unwrap().items;
    assert_eq!(secrets.len(), 1);
    assert_eq!(secrets[0].version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_restart_of_rollback_release_keeps_config() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    // Every instance fails to boot once `failing` is set.
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&failing);
    let behavior: kiln_testkit::simagent::Behavior = std::sync::Arc::new(move |_| {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            Outcome::Fail
        } else {
            Outcome::Healthy
        }
    });
    let config = SimAgentConfig {
        behavior,
        ..SimAgentConfig::default()
    };
    let _h1 = add_host(&control, &cluster, "h1", config).await;
    let (client, env) = create_env(&control, &cluster).await;

    deploy_one_then_two(&client, &env).await;
    let rollback = client
        .create_deploy(
            &env,
            &CreateDeploy {
                target: DeployTarget::ReleaseVersion(1),
                strategy: None,
            },
        )
        .await
        .unwrap();
    let rollback = wait_deploy(&client, &env, &rollback.deploy).await;
    assert_eq!(rollback.state, DeployState::Succeeded);

    // A change after the rollback, then a restart of the rollback release that fails: the
    // env keeps the change, because a restart never changed config or secrets.
    set_config_and_secret(&client, &env, "three").await;
    failing.store(true, std::sync::atomic::Ordering::SeqCst);
    let restart = client
        .restart_env(&env, &kiln_api::RestartEnv { process: None })
        .await
        .unwrap();
    let restart = wait_deploy(&client, &env, &restart.deploy).await;
    assert_eq!(restart.state, DeployState::Failed);

    assert_eq!(client.get_config(&env).await.unwrap().vars["FOO"], "three");
    let secrets = client.list_secrets(&env).await.unwrap().items;
    assert_eq!(secrets[0].version, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_host_instances_rescheduled() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let h1 = add_host(&control, &cluster, "h1", SimAgentConfig::default()).await;
    let _h2 = add_host(&control, &cluster, "h2", SimAgentConfig::default()).await;
    let (client, env) = create_env(&control, &cluster).await;

    let first = deploy(&client, &env, release(2, 0, "a")).await;
    let first = wait_deploy(&client, &env, &first).await;
    assert_eq!(first.state, DeployState::Succeeded, "{:?}", first.failure);
    let lost_host = h1.lease().host.id;

    h1.power_off().await;

    let started = Instant::now();
    loop {
        let instances = running(&client, &env).await;
        let healthy_elsewhere = instances
            .iter()
            .filter(|i| i.host_id != lost_host && i.state == kiln_api::InstanceState::Healthy)
            .count();
        if healthy_elsewhere == 2 && instances.iter().all(|i| i.host_id != lost_host) {
            break;
        }
        assert!(
            started.elapsed() < DEPLOY_TIMEOUT,
            "instances not rescheduled: {instances:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until the env has `count` healthy web instances, every instance wanted running is
/// one of them, and the route's backends are exactly those instances.
async fn wait_web_scaled(client: &Client, env: &EnvPath, count: usize) {
    let started = Instant::now();
    loop {
        let instances = running(client, env).await;
        let healthy: std::collections::BTreeSet<_> = instances
            .iter()
            .filter(|i| i.process.as_str() == "web" && i.state == kiln_api::InstanceState::Healthy)
            .map(|i| i.id)
            .collect();
        let routes = client.list_env_routes(env).await.unwrap().items;
        let backends: std::collections::BTreeSet<_> = routes
            .iter()
            .flat_map(|route| route.backends.iter().map(|b| b.instance_id))
            .collect();
        if healthy.len() == count && instances.len() == count && backends == healthy {
            return;
        }
        assert!(
            started.elapsed() < SCALE_TIMEOUT,
            "env not scaled to {count} web instances after {SCALE_TIMEOUT:?}: \
             instances {instances:?}, routed {backends:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_adds_and_removes_instances() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let _h1 = add_host(&control, &cluster, "h1", SimAgentConfig::default()).await;
    let _h2 = add_host(&control, &cluster, "h2", SimAgentConfig::default()).await;
    let (client, env) = create_env(&control, &cluster).await;

    let first = deploy(&client, &env, release(1, 0, "a")).await;
    let first = wait_deploy(&client, &env, &first).await;
    assert_eq!(first.state, DeployState::Succeeded, "{:?}", first.failure);
    wait_web_scaled(&client, &env, 1).await;

    let web = ProcessName::new("web").unwrap();
    let scale = |count| kiln_api::ScaleEnv {
        counts: BTreeMap::from([(web.clone(), count)]),
    };
    client.scale_env(&env, &scale(2)).await.unwrap();
    wait_web_scaled(&client, &env, 2).await;
    assert!(
        running(&client, &env)
            .await
            .iter()
            .all(|i| i.release_id == first.release_id)
    );

    client.scale_env(&env, &scale(1)).await.unwrap();
    wait_web_scaled(&client, &env, 1).await;

    // The release deploy and one scale deploy each way; none failed or was retried.
    let deploys = client.list_deploys(&env).await.unwrap().items;
    assert_eq!(deploys.len(), 3, "{deploys:?}");
    assert!(
        deploys.iter().all(|d| d.state != DeployState::Failed),
        "{deploys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_env_instances_removed_and_addresses_freed() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let _h1 = add_host(&control, &cluster, "h1", SimAgentConfig::default()).await;
    let (client, env) = create_env(&control, &cluster).await;
    let first = deploy(&client, &env, release(2, 1, "a")).await;
    let first = wait_deploy(&client, &env, &first).await;
    assert_eq!(first.state, DeployState::Succeeded, "{:?}", first.failure);
    assert_eq!(running(&client, &env).await.len(), 3);

    client.delete_env(&env).await.unwrap();

    // The agent stops the instances; the orchestrator then removes them although their
    // environment is gone, and frees their addresses.
    let pool = sqlx::PgPool::connect(&cluster.database_url).await.unwrap();
    let deadline = Instant::now() + SCALE_TIMEOUT;
    loop {
        let instances: i64 = sqlx::query_scalar("SELECT count(*) FROM instances")
            .fetch_one(&pool)
            .await
            .unwrap();
        let addresses: i64 = sqlx::query_scalar("SELECT count(*) FROM ipam_instance_addresses")
            .fetch_one(&pool)
            .await
            .unwrap();
        if instances == 0 && addresses == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{instances} instances and {addresses} address pairs left after the env's deletion"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let removed = events_of(&pool, "InstanceRemoved").await;
    assert_eq!(removed.len(), 3);
}

/// Outcome records of a deploy's steps, read from the projection.
async fn step_records(pool: &sqlx::PgPool, deploy: &Deploy) -> Vec<String> {
    sqlx::query_scalar("SELECT step FROM deploy_steps WHERE deploy_id = $1 ORDER BY position")
        .bind(deploy.id.as_uuid())
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_killed_between_steps_resumes() {
    let cluster = bootstrap();
    let mut control = start_control(&cluster);
    let pool = sqlx::PgPool::connect(&cluster.database_url).await.unwrap();
    // Instances take a second to become healthy, so every wait of the rolling deploy gives
    // the loop below time to see the step recorded before it and kill the control plane.
    let slow_boot = SimAgentConfig {
        behavior: std::sync::Arc::new(|assignment: &kiln_api::Assignment| {
            if assignment.run_once {
                Outcome::Exit { code: 0 }
            } else {
                Outcome::HealthyAfter {
                    delay: Duration::from_secs(1),
                }
            }
        }),
        ..SimAgentConfig::default()
    };
    let mut agents = Vec::new();
    for name in ["h1", "h2"] {
        agents.push(add_host(&control, &cluster, name, slow_boot.clone()).await);
    }
    let (client, env) = create_env(&control, &cluster).await;
    let first = deploy(&client, &env, release(2, 1, "a")).await;
    let first = wait_deploy(&client, &env, &first).await;
    assert_eq!(first.state, DeployState::Succeeded, "{:?}", first.failure);

    // Kill kiln-control each time one more step is recorded, then start it again. The
    // simulated agents keep running and reach the new process on the same address.
    let second = deploy(&client, &env, release(2, 1, "b")).await;
    let mut seen = 0;
    let started = Instant::now();
    let mut kills = 0;
    loop {
        let state: String = sqlx::query_scalar("SELECT state FROM deploys WHERE id = $1")
            .bind(second.id.as_uuid())
            .fetch_one(&pool)
            .await
            .unwrap();
        if state == "succeeded" || state == "failed" {
            break;
        }
        let records = step_records(&pool, &second).await.len();
        if records > seen {
            seen = records;
            let address = control.url.trim_start_matches("http://").to_owned();
            drop(control);
            kills += 1;
            control = start_control_on(&cluster, &address);
        }
        if started.elapsed() > DEPLOY_TIMEOUT {
            let records = step_records(&pool, &second).await;
            let instances: Vec<(String, String, String)> =
                sqlx::query_as("SELECT id::text, desired, state FROM instances")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            let terms: Vec<(String, i64)> = sqlx::query_as("SELECT name, term FROM leader_terms")
                .fetch_all(&pool)
                .await
                .unwrap();
            panic!(
                "deploy not finished after {kills} restarts: {records:?} {instances:?} {terms:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(kills >= 3, "only {kills} restarts happened");

    let client = Client::new(&control.url, &cluster.org_token).unwrap();
    let second = client.get_deploy(&env, second.id).await.unwrap();
    assert_eq!(second.state, DeployState::Succeeded, "{:?}", second.failure);

    let records = step_records(&pool, &second).await;
    let unique: std::collections::BTreeSet<_> = records.iter().collect();
    assert_eq!(
        unique.len(),
        records.len(),
        "a step was recorded twice: {records:?}"
    );

    let instances = running(&client, &env).await;
    assert_eq!(instances.len(), 3, "{instances:?}");
    assert!(instances.iter().all(|i| i.release_id == second.release_id));
    for agent in &agents {
        assert!(agent.duplicate_starts().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controls_one_orchestrator() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let _other = start_control(&cluster);
    let pool = sqlx::PgPool::connect(&cluster.database_url).await.unwrap();
    let mut agents = Vec::new();
    for name in ["h1", "h2"] {
        agents.push(add_host(&control, &cluster, name, SimAgentConfig::default()).await);
    }
    let (client, env) = create_env(&control, &cluster).await;

    let first = deploy(&client, &env, release(3, 0, "a")).await;
    let first = wait_deploy(&client, &env, &first).await;
    assert_eq!(first.state, DeployState::Succeeded, "{:?}", first.failure);
    let second = deploy(&client, &env, release(3, 0, "b")).await;
    let second = wait_deploy(&client, &env, &second).await;
    assert_eq!(second.state, DeployState::Succeeded, "{:?}", second.failure);

    // Only one replica orchestrates: each step outcome and each placement is written once.
    let records = step_records(&pool, &second).await;
    let unique: std::collections::BTreeSet<_> = records.iter().collect();
    assert_eq!(unique.len(), records.len(), "{records:?}");
    let placed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE type = 'InstancePlaced'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(placed, 6, "each instance is placed exactly once");
    for agent in &agents {
        assert!(agent.duplicate_starts().is_empty());
    }
}

/// A release like [`release`] with a release command that gets `timeout_secs` to exit.
fn release_with_command(web: u32, tag: &str, timeout_secs: u64) -> CreateRelease {
    let mut release = release(web, 0, tag);
    release.spec.release_command = Some(vec!["/app/migrate".to_owned()]);
    release.spec.release_command_limits = Some(ReleaseCommandLimits {
        timeout_secs,
        vcpus: 1,
        memory_mib: 256,
    });
    release
}

/// Simulated agents whose release commands end with `outcome` and whose other instances
/// become healthy.
fn release_command_config(outcome: Outcome) -> SimAgentConfig {
    let behavior: kiln_testkit::simagent::Behavior = std::sync::Arc::new(move |assignment| {
        if assignment.run_once {
            outcome
        } else {
            Outcome::Healthy
        }
    });
    SimAgentConfig {
        behavior,
        ..SimAgentConfig::default()
    }
}

/// Events of `type_name` in the log, oldest first, as `(seq, stream, payload data)`.
async fn events_of(pool: &sqlx::PgPool, type_name: &str) -> Vec<(i64, String, serde_json::Value)> {
    sqlx::query_as("SELECT seq, stream, payload->'data' FROM events WHERE type = $1 ORDER BY seq")
        .bind(type_name)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Ids (as in event payloads) of the release command instances placed so far.
async fn release_command_instances(pool: &sqlx::PgPool) -> Vec<String> {
    events_of(pool, "InstancePlaced")
        .await
        .into_iter()
        .filter(|(_, _, data)| data["process"] == "release-command")
        .map(|(_, _, data)| data["instance_id"].as_str().unwrap().to_owned())
        .collect()
}

/// The output lines recorded with a deploy's release command step.
async fn release_command_step_output(pool: &sqlx::PgPool, deploy: &Deploy) -> Vec<String> {
    let deploy_id = deploy.id.to_string();
    let steps = events_of(pool, "DeployStepCompleted").await;
    let (_, _, data) = steps
        .iter()
        .find(|(_, _, data)| {
            data["deploy_id"] == deploy_id.as_str()
                && data["step"]
                    .as_str()
                    .is_some_and(|step| step.ends_with(":release-command"))
        })
        .unwrap_or_else(|| panic!("no release command step recorded: {steps:?}"));
    serde_json::from_value(data["output"].clone()).unwrap_or_default()
}

/// Waits until every instance of the env is gone except `kept`, so a removed release command
/// instance is observed.
async fn wait_only_instances(client: &Client, env: &EnvPath, kept: &[Instance]) {
    let kept: std::collections::BTreeSet<_> = kept.iter().map(|i| i.id).collect();
    let started = Instant::now();
    loop {
        let all: std::collections::BTreeSet<_> = client
            .list_instances(env)
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|instance| instance.id)
            .collect();
        if all == kept {
            return;
        }
        assert!(
            started.elapsed() < DEPLOY_TIMEOUT,
            "instances {all:?} not reduced to {kept:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_command_runs_before_rollout() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let pool = sqlx::PgPool::connect(&cluster.database_url).await.unwrap();
    let config = release_command_config(Outcome::Exit { code: 0 });
    let _h1 = add_host(&control, &cluster, "h1", config.clone()).await;
    let _h2 = add_host(&control, &cluster, "h2", config).await;
    let (client, env) = create_env(&control, &cluster).await;

    let first = deploy(&client, &env, release(2, 0, "a")).await;
    let first = wait_deploy(&client, &env, &first).await;
    assert_eq!(first.state, DeployState::Succeeded, "{:?}", first.failure);
    let old = running(&client, &env).await;

    let second = deploy(&client, &env, release_with_command(2, "b", 60)).await;
    let second = wait_deploy(&client, &env, &second).await;
    assert_eq!(second.state, DeployState::Succeeded, "{:?}", second.failure);

    let records = step_records(&pool, &second).await;
    assert_eq!(records[0], "completed:release-command", "{records:?}");
    assert_eq!(
        release_command_step_output(&pool, &second).await,
        kiln_testkit::simagent::exit_output(0)
    );

    // The command exited before the first old instance was asked to stop.
    let placed = release_command_instances(&pool).await;
    assert_eq!(placed.len(), 1, "{placed:?}");
    let command_stream = format!("instance:{}", placed[0]);
    let exited = events_of(&pool, "InstanceStateChanged")
        .await
        .into_iter()
        .find(|(_, stream, data)| stream == &command_stream && data["state"] == "exited")
        .map(|(seq, _, _)| seq)
        .expect("the release command reported its exit");
    let old_ids: Vec<String> = old.iter().map(|i| i.id.to_string()).collect();
    let first_old_stop = events_of(&pool, "InstanceStopRequested")
        .await
        .into_iter()
        .find(|(_, _, data)| old_ids.iter().any(|id| data["instance_id"] == id.as_str()))
        .map(|(seq, _, _)| seq)
        .expect("the old instances were stopped");
    assert!(
        exited < first_old_stop,
        "an old instance was stopped (seq {first_old_stop}) before the release command exited (seq {exited})"
    );

    // The one-off instance is stopped and removed, freeing its addresses.
    let new = running(&client, &env).await;
    assert_eq!(new.len(), 2);
    assert!(new.iter().all(|i| i.release_id == second.release_id));
    assert!(new.iter().all(|i| i.process.as_str() == "web"));
    wait_only_instances(&client, &env, &new).await;

    // Deploying the same release again goes straight to the rollout.
    let again = client
        .create_deploy(
            &env,
            &CreateDeploy {
                target: DeployTarget::ReleaseVersion(2),
                strategy: None,
            },
        )
        .await
        .unwrap()
        .deploy;
    let again = wait_deploy(&client, &env, &again).await;
    assert_eq!(again.state, DeployState::Succeeded, "{:?}", again.failure);
    assert_eq!(release_command_instances(&pool).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_command_failure_keeps_old_instances() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let pool = sqlx::PgPool::connect(&cluster.database_url).await.unwrap();
    let config = release_command_config(Outcome::Exit { code: 3 });
    let _h1 = add_host(&control, &cluster, "h1", config.clone()).await;
    let _h2 = add_host(&control, &cluster, "h2", config).await;
    let (client, env) = create_env(&control, &cluster).await;

    let first = deploy(&client, &env, release(2, 0, "a")).await;
    let first = wait_deploy(&client, &env, &first).await;
    assert_eq!(first.state, DeployState::Succeeded, "{:?}", first.failure);
    let old = running(&client, &env).await;
    let stops_before = events_of(&pool, "InstanceStopRequested").await.len();

    let second = deploy(&client, &env, release_with_command(2, "b", 60)).await;
    let second = wait_deploy(&client, &env, &second).await;
    assert_eq!(second.state, DeployState::Failed);
    let failure = second.failure.clone().unwrap_or_default();
    assert!(failure.contains("release command"), "{failure}");
    assert!(failure.contains("exited with code 3"), "{failure}");
    assert!(failure.contains("no instance was replaced"), "{failure}");
    assert_eq!(
        release_command_step_output(&pool, &second).await,
        kiln_testkit::simagent::exit_output(3)
    );

    // No instance of the new release other than the command was placed, and the only stop
    // is the command's own.
    let placed: Vec<_> = events_of(&pool, "InstancePlaced")
        .await
        .into_iter()
        .filter(|(_, _, data)| data["release_id"] == second.release_id.to_string().as_str())
        .collect();
    assert_eq!(placed.len(), 1, "{placed:?}");
    assert_eq!(placed[0].2["process"], "release-command");
    let stops = events_of(&pool, "InstanceStopRequested").await;
    assert_eq!(stops.len(), stops_before + 1, "{stops:?}");

    wait_only_instances(&client, &env, &old).await;
    let current = client.get_env(&env).await.unwrap();
    assert_eq!(current.current_release_id, Some(first.release_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_command_timeout_fails_deploy() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let pool = sqlx::PgPool::connect(&cluster.database_url).await.unwrap();
    let _h1 = add_host(
        &control,
        &cluster,
        "h1",
        release_command_config(Outcome::Hang),
    )
    .await;
    let (client, env) = create_env(&control, &cluster).await;

    let first = deploy(&client, &env, release(1, 0, "a")).await;
    let first = wait_deploy(&client, &env, &first).await;
    assert_eq!(first.state, DeployState::Succeeded, "{:?}", first.failure);
    let old = running(&client, &env).await;

    let second = deploy(&client, &env, release_with_command(1, "b", 2)).await;
    let second = wait_deploy(&client, &env, &second).await;
    assert_eq!(second.state, DeployState::Failed);
    let failure = second.failure.clone().unwrap_or_default();
    assert!(failure.contains("did not exit within 2 s"), "{failure}");
    assert!(failure.contains("no instance was replaced"), "{failure}");

    // The hanging command is stopped and removed; the old instance never was.
    let placed = release_command_instances(&pool).await;
    assert_eq!(placed.len(), 1, "{placed:?}");
    let stopped: Vec<String> = events_of(&pool, "InstanceStopRequested")
        .await
        .into_iter()
        .map(|(_, _, data)| data["instance_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(stopped, placed);
    wait_only_instances(&client, &env, &old).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_command_survives_control_restart() {
    let cluster = bootstrap();
    let mut control = start_control(&cluster);
    let pool = sqlx::PgPool::connect(&cluster.database_url).await.unwrap();
    let slow = Outcome::ExitAfter {
        code: 0,
        delay: Duration::from_secs(4),
    };
    let agent = add_host(&control, &cluster, "h1", release_command_config(slow)).await;
    let (client, env) = create_env(&control, &cluster).await;

    let second = deploy(&client, &env, release_with_command(1, "a", 60)).await;

    // Kill kiln-control while the command runs, twice, and start it again on the same address.
    for _ in 0..2 {
        let started = Instant::now();
        loop {
            let running: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM instances WHERE process = 'release-command'
                 AND state = 'running'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            if running == 1 {
                break;
            }
            assert!(
                started.elapsed() < DEPLOY_TIMEOUT,
                "the release command never ran"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let address = control.url.trim_start_matches("http://").to_owned();
        drop(control);
        control = start_control_on(&cluster, &address);
    }

    let client = Client::new(&control.url, &cluster.org_token).unwrap();
    let second = wait_deploy(&client, &env, &second).await;
    assert_eq!(second.state, DeployState::Succeeded, "{:?}", second.failure);

    assert_eq!(release_command_instances(&pool).await.len(), 1);
    assert!(agent.duplicate_starts().is_empty());
    let records = step_records(&pool, &second).await;
    let commands = records
        .iter()
        .filter(|record| record.ends_with(":release-command"))
        .count();
    assert_eq!(commands, 1, "{records:?}");
    assert_eq!(running(&client, &env).await.len(), 1);
}

/// Sets `route_drain_deadline_secs` in the cluster's `control.toml`.
fn set_route_drain_deadline(cluster: &Cluster, secs: u64) {
    let path = cluster.dir.path().join("control.toml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!("route_drain_deadline_secs = {secs}\n"));
    std::fs::write(&path, text).unwrap();
}

/// Creates an ingress token and follows the route table once, so the ingress counts as live
/// and has acknowledged the table as of now. Returns its client.
async fn live_ingress(control: &Control, cluster: &Cluster) -> Client {
    let operator = Client::new(&control.url, &cluster.operator_token).unwrap();
    let created = operator
        .create_ingress_token(&kiln_api::CreateIngressToken {
            name: "edge-1".to_owned(),
        })
        .await
        .unwrap();
    let ingress = Client::new(&control.url, &created.secret).unwrap();
    let table = ingress
        .watch_routes(&kiln_api::WatchQuery::default())
        .await
        .unwrap();
    ingress
        .watch_routes(&kiln_api::WatchQuery {
            after: Some(table.cursor),
            wait: None,
        })
        .await
        .unwrap();
    ingress
}

/// Returns the seq of the event that asked to stop `instance`, if any.
async fn stop_seq(
    control: &Control,
    cluster: &Cluster,
    instance: kiln_core::InstanceId,
) -> Option<u64> {
    let operator = Client::new(&control.url, &cluster.operator_token).unwrap();
    let mut after = 0;
    loop {
        let page = operator
            .events(&kiln_api::events::EventQuery {
                after: Some(after),
                ..Default::default()
            })
            .await
            .unwrap();
        if page.events.is_empty() {
            return None;
        }
        let found = page
            .events
            .iter()
            .find_map(|envelope| match &envelope.event {
                kiln_api::Event::InstanceStopRequested { instance_id, .. }
                    if *instance_id == instance =>
                {
                    Some(envelope.seq)
                }
                _ => None,
            });
        if found.is_some() {
            return found;
        }
        after = page.cursor;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_waits_until_ingress_applies_route_change() {
    let cluster = bootstrap();
    // Long enough that only the ingress's acknowledgement can let the stop through.
    set_route_drain_deadline(&cluster, 600);
    let control = start_control(&cluster);
    let _agent = add_host(&control, &cluster, "h1", SimAgentConfig::default()).await;
    let (client, env) = create_env(&control, &cluster).await;
    let ingress = live_ingress(&control, &cluster).await;

    let first = deploy(&client, &env, release(1, 0, "a")).await;
    let first = wait_deploy(&client, &env, &first).await;
    assert_eq!(first.state, DeployState::Succeeded, "{:?}", first.failure);
    let old = running(&client, &env).await[0].id;

    // The rolling deploy routes its new instance, takes the old one out of the routes, and
    // then waits: the ingress has not applied the change yet.
    let second = deploy(&client, &env, release(1, 0, "b")).await;
    let started = Instant::now();
    loop {
        let routes = client.list_env_routes(&env).await.unwrap().items;
        let backends: Vec<_> = routes
            .iter()
            .flat_map(|route| route.backends.iter().map(|backend| backend.instance_id))
            .collect();
        if !backends.is_empty() && !backends.contains(&old) {
            break;
        }
        assert!(
            started.elapsed() < DEPLOY_TIMEOUT,
            "the old instance {old} never left the routes: {backends:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before_ack = ingress
        .watch_routes(&kiln_api::WatchQuery::default())
        .await
        .unwrap()
        .cursor;
    assert_eq!(stop_seq(&control, &cluster, old).await, None);

    ingress
        .watch_routes(&kiln_api::WatchQuery {
            after: Some(before_ack),
            wait: None,
        })
        .await
        .unwrap();
    let second = wait_deploy(&client, &env, &second).await;
    assert_eq!(second.state, DeployState::Succeeded, "{:?}", second.failure);
    let stopped = stop_seq(&control, &cluster, old)
        .await
        .expect("the old instance was never stopped");
    assert!(
        stopped > before_ack,
        "the stop (seq {stopped}) came before the ingress applied the routes (seq {before_ack})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_proceeds_after_route_drain_deadline() {
    let cluster = bootstrap();
    set_route_drain_deadline(&cluster, 1);
    let control = start_control(&cluster);
    let _agent = add_host(&control, &cluster, "h1", SimAgentConfig::default()).await;
    let (client, env) = create_env(&control, &cluster).await;
    // Live, but never applies another table.
    let _ingress = live_ingress(&control, &cluster).await;

    let first = deploy(&client, &env, release(1, 0, "a")).await;
    wait_deploy(&client, &env, &first).await;
    let old = running(&client, &env).await[0].id;
    let second = deploy(&client, &env, release(1, 0, "b")).await;
    let second = wait_deploy(&client, &env, &second).await;

    assert_eq!(second.state, DeployState::Succeeded, "{:?}", second.failure);
    assert!(stop_seq(&control, &cluster, old).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deploys_never_overcommit_memory() {
    let cluster = bootstrap();
    let control = start_control(&cluster);
    let pool = sqlx::PgPool::connect(&cluster.database_url).await.unwrap();

    // A 2048 MiB host keeps 1024 MiB back, so it fits three 256 MiB instances with their
    // 64 MiB overhead each: six instances on two hosts, three two-instance deploys.
    let config = SimAgentConfig {
        capacity: kiln_api::HostCapacity {
            vcpus: 16,
            memory_mib: 2048,
        },
        ..SimAgentConfig::default()
    };
    let mut agents = Vec::new();
    for name in ["h1", "h2"] {
        agents.push(add_host(&control, &cluster, name, config.clone()).await);
    }
    let client = Client::new(&control.url, &cluster.org_token).unwrap();
    let app = kiln_core::AppName::new("shop").unwrap();
    client
        .create_app(&cluster.org, &kiln_api::CreateApp { name: app.clone() })
        .await
        .unwrap();

    // Six deploys posted back to back, so the orchestrator plans several in one pass before
    // any of their instances is placed.
    let mut deploys = Vec::new();
    for n in 0..6 {
        let name = kiln_core::EnvName::new(format!("e{n}")).unwrap();
        client
            .create_env(
                &cluster.org,
                &app,
                &kiln_api::CreateEnv { name: name.clone() },
            )
            .await
            .unwrap();
        let env = EnvPath::new(cluster.org.clone(), app.clone(), name);
        let created = deploy(&client, &env, release(2, 0, &format!("r{n}"))).await;
        deploys.push((env, created));
    }

    let mut succeeded = 0;
    for (env, created) in &deploys {
        let finished = wait_deploy(&client, env, created).await;
        match finished.state {
            DeployState::Succeeded => succeeded += 1,
            DeployState::Failed => {
                let failure = finished.failure.unwrap_or_default();
                assert!(failure.contains("MiB free"), "{failure}");
            }
            other => panic!("deploy {} ended {other:?}", created.id),
        }
    }
    assert_eq!(succeeded, 3, "three deploys fill both hosts");

    let per_host: Vec<(String, i64)> = sqlx::query_as(
        "SELECT host_id::text, count(*) FROM instances WHERE desired = 'running' GROUP BY host_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for (host, count) in &per_host {
        assert!(
            *count <= 3,
            "host {host} holds {count} instances: {per_host:?}"
        );
    }
    for agent in &agents {
        assert!(agent.duplicate_starts().is_empty());
    }
}
