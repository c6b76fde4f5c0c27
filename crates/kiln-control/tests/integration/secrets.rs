//! Secrets reach only instances of their environment and never appear in events, logs or
//! listings; the master key rotates.

use kiln_api::types::*;
use kiln_core::{AppName, EnvName};

use crate::api_resources::{place_instance, register_host};
use crate::harness::{self, TestServer};

#[tokio::test]
async fn canary_secret_stays_out_of_events_logs_and_listings() {
    let server = TestServer::start().await;
    let client = server.org_client();
    let env = harness::create_app_and_env(&server).await;
    let path = harness::env_path(&server.org);
    let canary = format!("canary-{}", uuid::Uuid::new_v4().simple());

    let meta = client
        .set_secret(
            &path,
            "DATABASE_PASSWORD",
            &SetSecret {
                value: canary.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(meta.version, 1);
    assert_eq!(meta.digest.len(), 16);
    let meta = client
        .set_secret(
            &path,
            "DATABASE_PASSWORD",
            &SetSecret {
                value: canary.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(meta.version, 2);

    // A second environment of the same org gets its own secret and must not receive ours.
    client
        .create_env(
            &server.org,
            &path.app,
            &CreateEnv {
                name: EnvName::new("staging").unwrap(),
            },
        )
        .await
        .unwrap();
    let staging_path = kiln_api::client::EnvPath::new(
        server.org.clone(),
        AppName::new("web").unwrap(),
        EnvName::new("staging").unwrap(),
    );
    client
        .set_secret(
            &staging_path,
            "DATABASE_PASSWORD",
            &SetSecret {
                value: "staging-value".into(),
            },
        )
        .await
        .unwrap();
    let staging = client.get_env(&staging_path).await.unwrap();

    let release = client
        .create_release(
            &path,
            &CreateRelease {
                image: harness::image(),
                spec: harness::release_spec(),
                description: String::new(),
            },
        )
        .await
        .unwrap();
    let staging_release = client
        .create_release(
            &staging_path,
            &CreateRelease {
                image: harness::image(),
                spec: harness::release_spec(),
                description: String::new(),
            },
        )
        .await
        .unwrap();
    let host = register_host(&server, "h1").await;
    let other_host = register_host(&server, "h2").await;
    let prod_instance = place_instance(&server, &env, &release, &host.host, 20).await;
    let staging_instance =
        place_instance(&server, &staging, &staging_release, &host.host, 21).await;

    let delivered = host.client.instance_secrets(prod_instance).await.unwrap();
    assert_eq!(delivered.values["DATABASE_PASSWORD"], canary);
    assert_eq!(delivered.secrets_version, 2);
    let staging_delivered = host
        .client
        .instance_secrets(staging_instance)
        .await
        .unwrap();
    assert_eq!(
        staging_delivered.values["DATABASE_PASSWORD"],
        "staging-value"
    );
    let stolen = other_host
        .client
        .instance_secrets(prod_instance)
        .await
        .unwrap_err();
    assert_eq!(stolen.code(), Some(kiln_api::ErrorCode::NotFound));

    // Listings, events, assignments, the database's event log and the server's log lines.
    let listing = serde_json::to_string(&client.list_secrets(&path).await.unwrap()).unwrap();
    assert!(listing.contains("DATABASE_PASSWORD"));
    assert!(!listing.contains(&canary));
    let events = serde_json::to_string(
        &client
            .org_events(&server.org, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(events.contains("SecretSet"));
    assert!(!events.contains(&canary));
    let all_events =
        serde_json::to_string(&server.operator().events(&Default::default()).await.unwrap())
            .unwrap();
    assert!(!all_events.contains(&canary));
    let assignments = serde_json::to_string(
        &host
            .client
            .watch_assignments(&AssignmentsQuery::default())
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(!assignments.contains(&canary));
    let env_view = serde_json::to_string(&client.get_env(&path).await.unwrap()).unwrap();
    assert!(!env_view.contains(&canary));

    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE payload::text LIKE '%' || $1 || '%'")
            .bind(&canary)
            .fetch_one(server.store.pool())
            .await
            .unwrap();
    assert_eq!(stored, 0);
    let plaintext: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM secret_values WHERE position($1::bytea in ciphertext) > 0",
    )
    .bind(canary.as_bytes())
    .fetch_one(server.store.pool())
    .await
    .unwrap();
    assert_eq!(plaintext, 0);
    let logs = harness::captured_logs();
    assert!(
        logs.contains("delivered secrets"),
        "log capture is not working"
    );
    assert!(!logs.contains(&canary));

    client
        .unset_secret(&path, "DATABASE_PASSWORD")
        .await
        .unwrap();
    assert!(client.list_secrets(&path).await.unwrap().items.is_empty());
    // The instance keeps its release's secrets; the next release has none.
    let kept = host.client.instance_secrets(prod_instance).await.unwrap();
    assert_eq!(kept.values["DATABASE_PASSWORD"], canary);
    let next = create_release(&client, &path).await;
    let next_instance = place_instance(&server, &env, &next, &host.host, 22).await;
    let next_delivered = host.client.instance_secrets(next_instance).await.unwrap();
    assert!(next_delivered.values.is_empty(), "{next_delivered:?}");
    assert_eq!(next_delivered.secrets_version, 3);
}

async fn create_release(client: &kiln_api::Client, path: &kiln_api::client::EnvPath) -> Release {
    client
        .create_release(
            path,
            &CreateRelease {
                image: harness::image(),
                spec: harness::release_spec(),
                description: String::new(),
            },
        )
        .await
        .unwrap()
}

async fn set(client: &kiln_api::Client, path: &kiln_api::client::EnvPath, name: &str, value: &str) {
    client
        .set_secret(
            path,
            name,
            &SetSecret {
                value: value.into(),
            },
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn release_secrets_pinned_and_restored() {
    let server = TestServer::start().await;
    let client = server.org_client();
    let env = harness::create_app_and_env(&server).await;
    let path = harness::env_path(&server.org);
    let host = register_host(&server, "h1").await;

    set(&client, &path, "API_KEY", "key-one").await;
    let first = create_release(&client, &path).await;
    set(&client, &path, "API_KEY", "key-two").await;
    set(&client, &path, "EXTRA", "extra-one").await;
    let second = create_release(&client, &path).await;
    client.unset_secret(&path, "EXTRA").await.unwrap();
    set(&client, &path, "API_KEY", "key-three").await;

    // Each release's instances get the set as it was when the release was made, even when
    // they start after later changes (a restart or a scale-up of an older release).
    let first_instance = place_instance(&server, &env, &first, &host.host, 30).await;
    let second_instance = place_instance(&server, &env, &second, &host.host, 31).await;
    let delivered = host.client.instance_secrets(first_instance).await.unwrap();
    assert_eq!(delivered.values.len(), 1, "{:?}", delivered.values.keys());
    assert_eq!(delivered.values["API_KEY"], "key-one");
    assert_eq!(delivered.secrets_version, 1);
    let delivered = host.client.instance_secrets(second_instance).await.unwrap();
    assert_eq!(delivered.values["API_KEY"], "key-two");
    assert_eq!(delivered.values["EXTRA"], "extra-one");
    assert_eq!(delivered.secrets_version, 3);

    // A rollback to the second release points both names back at that release's versions.
    let rollback = client
        .create_deploy(
            &path,
            &CreateDeploy {
                target: DeployTarget::ReleaseVersion(second.version),
                strategy: Some(DeployStrategy::Immediate),
            },
        )
        .await
        .unwrap();
    let restored_instance = place_instance(&server, &env, &rollback.release, &host.host, 32).await;
    let delivered = host
        .client
        .instance_secrets(restored_instance)
        .await
        .unwrap();
    assert_eq!(delivered.values["API_KEY"], "key-two");
    assert_eq!(delivered.values["EXTRA"], "extra-one");
    let listing = client.list_secrets(&path).await.unwrap();
    let versions: Vec<(&str, u64)> = listing
        .items
        .iter()
        .map(|meta| (meta.name.as_str(), meta.version))
        .collect();
    assert_eq!(versions, [("API_KEY", 2), ("EXTRA", 1)]);

    // Then back to the first release: EXTRA goes, API_KEY returns to its first value.
    let rollback = client
        .create_deploy(
            &path,
            &CreateDeploy {
                target: DeployTarget::ReleaseVersion(first.version),
                strategy: Some(DeployStrategy::Immediate),
            },
        )
        .await
        .unwrap();
    let oldest_instance = place_instance(&server, &env, &rollback.release, &host.host, 33).await;
    let delivered = host.client.instance_secrets(oldest_instance).await.unwrap();
    assert_eq!(delivered.values.len(), 1, "{:?}", delivered.values.keys());
    assert_eq!(delivered.values["API_KEY"], "key-one");

    // A new value never reuses a stored version, and no value reached the event log.
    let meta = client
        .set_secret(
            &path,
            "API_KEY",
            &SetSecret {
                value: "key-four".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(meta.version, 4);

    // Assignments carry the release's secret-set version, which agents cache secrets by.
    let assignments = host
        .client
        .watch_assignments(&AssignmentsQuery::default())
        .await
        .unwrap();
    let pinned = |instance| {
        assignments
            .assignments
            .iter()
            .find(|assignment| assignment.instance_id == instance)
            .map(|assignment| assignment.secrets_version)
    };
    assert_eq!(pinned(first_instance), Some(1));
    assert_eq!(pinned(second_instance), Some(3));

    let all_events =
        serde_json::to_string(&server.operator().events(&Default::default()).await.unwrap())
            .unwrap();
    for value in ["key-one", "key-two", "key-three", "key-four", "extra-one"] {
        assert!(!all_events.contains(value), "an event holds {value}");
    }
}

#[tokio::test]
async fn rotated_key_still_delivers_secrets() {
    let server = TestServer::start().await;
    let client = server.org_client();
    let env = harness::create_app_and_env(&server).await;
    let path = harness::env_path(&server.org);
    client
        .set_secret(
            &path,
            "API_KEY",
            &SetSecret {
                value: "before-rotation".into(),
            },
        )
        .await
        .unwrap();

    let old_key: String = sqlx::query_scalar("SELECT key_id FROM secret_values")
        .fetch_one(server.store.pool())
        .await
        .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln-control"))
        .args([
            "secrets",
            "rotate-key",
            "--database-url",
            &server.database.url,
            "--master-key-file",
        ])
        .arg(&server.key_file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("re-encrypted 1 secret"));
    let new_key: String = sqlx::query_scalar("SELECT key_id FROM secret_values")
        .fetch_one(server.store.pool())
        .await
        .unwrap();
    assert_ne!(old_key, new_key);

    let keyring = kiln_control::secrets::Keyring::load(&server.key_file).unwrap();
    assert_eq!(keyring.active_key_id(), new_key);
    let row: (i64, String, Vec<u8>, Vec<u8>) =
        sqlx::query_as("SELECT version, key_id, nonce, ciphertext FROM secret_values")
            .fetch_one(server.store.pool())
            .await
            .unwrap();
    let sealed = kiln_control::secrets::Sealed {
        key_id: row.1,
        nonce: row.2,
        ciphertext: row.3,
    };
    let plain = keyring
        .open(env.id, "API_KEY", row.0 as u64, &sealed)
        .unwrap();
    assert_eq!(plain, b"before-rotation");
}

#[tokio::test]
async fn rollback_refuses_a_value_no_longer_stored() {
    let server = TestServer::start().await;
    let client = server.org_client();
    let env = harness::create_app_and_env(&server).await;
    let path = harness::env_path(&server.org);
    let host = register_host(&server, "h1").await;
    set(&client, &path, "API_KEY", "key-one").await;
    let first = create_release(&client, &path).await;
    set(&client, &path, "API_KEY", "key-two").await;
    create_release(&client, &path).await;

    // Values stored before they were kept by version were overwritten; version 1 is gone.
    sqlx::query("DELETE FROM secret_values WHERE version = 1")
        .execute(server.store.pool())
        .await
        .unwrap();

    // The first release's instances get the value that replaced it, the closest one stored.
    let instance = place_instance(&server, &env, &first, &host.host, 40).await;
    let delivered = host.client.instance_secrets(instance).await.unwrap();
    assert_eq!(delivered.values["API_KEY"], "key-two");

    // A rollback cannot restore it, and its error names the secret to set.
    let error = client
        .create_deploy(
            &path,
            &CreateDeploy {
                target: DeployTarget::ReleaseVersion(first.version),
                strategy: Some(DeployStrategy::Immediate),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(kiln_api::ErrorCode::FailedPrecondition));
    let message = error.to_string();
    assert!(message.contains("API_KEY"), "{message}");
    assert!(message.contains("kiln secrets set API_KEY"), "{message}");
    assert_eq!(client.list_releases(&path).await.unwrap().items.len(), 2);
}
