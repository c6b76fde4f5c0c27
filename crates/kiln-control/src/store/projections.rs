//! Projections: plain tables derived from the event log, updated by [`apply`] in the append's
//! transaction. Every write to a projection table happens here, so replaying the log through
//! the same function rebuilds them exactly (see [`super::rebuild`]).
//!
//! Table names are unqualified on purpose: a rebuild points `search_path` at a scratch schema
//! holding empty copies of these tables and replays into it.

use kiln_api::types::{AddressKind, DeployState, DesiredState, HostState};
use kiln_api::{Event, EventEnvelope, InstanceState};
use sqlx::{Postgres, Transaction};

use super::StoreError;

/// The projection tables, in the order a rebuild compares them.
pub const TABLES: &[&str] = &[
    "orgs",
    "tokens",
    "apps",
    "envs",
    "config_vars",
    "secrets",
    "releases",
    "deploys",
    "deploy_steps",
    "hosts",
    "instances",
    "routes",
    "addresses",
];

/// Applies one event to the projections.
pub async fn apply(
    tx: &mut Transaction<'static, Postgres>,
    envelope: &EventEnvelope,
) -> Result<(), StoreError> {
    let time = envelope.time;
    let db = StoreError::database;
    let conn = &mut **tx;

    match &envelope.event {
        Event::OrgCreated { org_id, name } => {
            sqlx::query("INSERT INTO orgs (id, name, created_at) VALUES ($1, $2, $3)")
                .bind(org_id.as_uuid())
                .bind(name.as_str())
                .bind(time)
                .execute(conn)
                .await
                .map_err(db("project OrgCreated"))?;
        }
        Event::TokenCreated {
            token_id,
            kind,
            org_id,
            host_id,
            name,
            expires_at,
        } => {
            sqlx::query(
                "INSERT INTO tokens (id, kind, org_id, host_id, name, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(token_id.as_uuid())
            .bind(kind.as_str())
            .bind(org_id.map(|id| id.as_uuid()))
            .bind(host_id.map(|id| id.as_uuid()))
            .bind(name)
            .bind(time)
            .bind(*expires_at)
            .execute(conn)
            .await
            .map_err(db("project TokenCreated"))?;
        }
        Event::TokenRevoked { token_id } => {
            sqlx::query("UPDATE tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
                .bind(token_id.as_uuid())
                .bind(time)
                .execute(conn)
                .await
                .map_err(db("project TokenRevoked"))?;
        }
        Event::AppCreated {
            app_id,
            org_id,
            name,
        } => {
            sqlx::query("INSERT INTO apps (id, org_id, name, created_at) VALUES ($1, $2, $3, $4)")
                .bind(app_id.as_uuid())
                .bind(org_id.as_uuid())
                .bind(name.as_str())
                .bind(time)
                .execute(conn)
                .await
                .map_err(db("project AppCreated"))?;
        }
        Event::AppDeleted { app_id } => {
            sqlx::query("DELETE FROM apps WHERE id = $1")
                .bind(app_id.as_uuid())
                .execute(conn)
                .await
                .map_err(db("project AppDeleted"))?;
        }
        Event::EnvCreated {
            env_id,
            app_id,
            org_id,
            name,
            hostname,
            ipv6_address,
        } => {
            sqlx::query(
                "INSERT INTO envs (id, org_id, app_id, name, hostname, ipv6_address, scale,
                                   config_version, secrets_version, release_count, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, '{}', 0, 0, 0, $7)",
            )
            .bind(env_id.as_uuid())
            .bind(org_id.as_uuid())
            .bind(app_id.as_uuid())
            .bind(name.as_str())
            .bind(hostname.as_str())
            .bind(ipv6_address.to_string())
            .bind(time)
            .execute(&mut *conn)
            .await
            .map_err(db("project EnvCreated"))?;
            insert_address(
                conn,
                env_id.as_uuid(),
                &ipv6_address.to_string(),
                AddressKind::Dedicated,
                None,
            )
            .await?;
        }
        Event::EnvDeleted { env_id } => {
            for table in ["config_vars", "secrets", "routes", "addresses"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE env_id = $1"))
                    .bind(env_id.as_uuid())
                    .execute(&mut *conn)
                    .await
                    .map_err(db("project EnvDeleted"))?;
            }
            sqlx::query("DELETE FROM envs WHERE id = $1")
                .bind(env_id.as_uuid())
                .execute(conn)
                .await
                .map_err(db("project EnvDeleted"))?;
        }
        Event::EnvScaled { env_id, counts } => {
            let counts = serde_json::to_value(counts).map_err(|source| StoreError::Codec {
                seq: envelope.seq,
                source,
            })?;
            sqlx::query("UPDATE envs SET scale = scale || $2 WHERE id = $1")
                .bind(env_id.as_uuid())
                .bind(counts)
                .execute(conn)
                .await
                .map_err(db("project EnvScaled"))?;
        }
        Event::ConfigChanged {
            env_id,
            version,
            set,
            unset,
        } => {
            // One statement for the whole change, because an append's round trips are most of
            // its cost. A name in both `set` and `unset` ends up set, as if `unset` ran first.
            let names: Vec<&str> = set.keys().map(String::as_str).collect();
            let values: Vec<&str> = set.values().map(String::as_str).collect();
            sqlx::query(
                "WITH unset AS (
                     DELETE FROM config_vars
                     WHERE env_id = $1 AND name = ANY($2) AND NOT name = ANY($3)
                 ), set AS (
                     INSERT INTO config_vars (env_id, name, value)
                     SELECT $1, name, value FROM unnest($3::text[], $4::text[]) AS v(name, value)
                     ON CONFLICT (env_id, name) DO UPDATE SET value = EXCLUDED.value
                 )
                 UPDATE envs SET config_version = $5 WHERE id = $1",
            )
            .bind(env_id.as_uuid())
            .bind(unset)
            .bind(&names)
            .bind(&values)
            .bind(*version as i64)
            .execute(conn)
            .await
            .map_err(db("project ConfigChanged"))?;
        }
        Event::SecretSet {
            env_id,
            name,
            version,
            digest,
            secrets_version,
        } => {
            sqlx::query(
                "INSERT INTO secrets (env_id, name, version, digest, updated_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (env_id, name) DO UPDATE
                 SET version = EXCLUDED.version, digest = EXCLUDED.digest,
                     updated_at = EXCLUDED.updated_at",
            )
            .bind(env_id.as_uuid())
            .bind(name)
            .bind(*version as i64)
            .bind(digest)
            .bind(time)
            .execute(&mut *conn)
            .await
            .map_err(db("project SecretSet"))?;
            set_secrets_version(conn, env_id.as_uuid(), *secrets_version).await?;
        }
        Event::SecretUnset {
            env_id,
            name,
            secrets_version,
        } => {
            sqlx::query("DELETE FROM secrets WHERE env_id = $1 AND name = $2")
                .bind(env_id.as_uuid())
                .bind(name)
                .execute(&mut *conn)
                .await
                .map_err(db("project SecretUnset"))?;
            set_secrets_version(conn, env_id.as_uuid(), *secrets_version).await?;
        }
        Event::ReleaseCreated { release } => {
            let spec = serde_json::to_value(&release.spec).map_err(|source| StoreError::Codec {
                seq: envelope.seq,
                source,
            })?;
            sqlx::query(
                "INSERT INTO releases (id, env_id, version, image_ref, image_digest, spec,
                                       config_version, rollback_of, description, created_at,
                                       secrets_version)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                         (SELECT secrets_version FROM envs WHERE id = $2))",
            )
            .bind(release.id.as_uuid())
            .bind(release.env_id.as_uuid())
            .bind(release.version as i64)
            .bind(&release.image.reference)
            .bind(&release.image.digest)
            .bind(spec)
            .bind(release.config_version as i64)
            .bind(release.rollback_of.map(|id| id.as_uuid()))
            .bind(&release.description)
            .bind(time)
            .execute(&mut *conn)
            .await
            .map_err(db("project ReleaseCreated"))?;
            sqlx::query(
                "UPDATE envs SET release_count = GREATEST(release_count, $2) WHERE id = $1",
            )
            .bind(release.env_id.as_uuid())
            .bind(release.version as i64)
            .execute(conn)
            .await
            .map_err(db("project ReleaseCreated"))?;
        }
        Event::DeployRequested {
            deploy_id,
            env_id,
            release_id,
            previous_release_id,
            strategy,
        } => {
            let strategy = enum_text(strategy, envelope.seq)?;
            sqlx::query(
                "INSERT INTO deploys (id, env_id, release_id, previous_release_id, strategy,
                                      state, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
            )
            .bind(deploy_id.as_uuid())
            .bind(env_id.as_uuid())
            .bind(release_id.as_uuid())
            .bind(previous_release_id.map(|id| id.as_uuid()))
            .bind(strategy)
            .bind(enum_text(&DeployState::Pending, envelope.seq)?)
            .bind(time)
            .execute(conn)
            .await
            .map_err(db("project DeployRequested"))?;
        }
        Event::DeployStateChanged {
            deploy_id,
            state,
            failure,
            ..
        } => {
            sqlx::query(
                "UPDATE deploys SET state = $2, failure = $3, updated_at = $4 WHERE id = $1",
            )
            .bind(deploy_id.as_uuid())
            .bind(enum_text(state, envelope.seq)?)
            .bind(failure.as_deref())
            .bind(time)
            .execute(conn)
            .await
            .map_err(db("project DeployStateChanged"))?;
        }
        Event::DeployStepCompleted {
            deploy_id,
            step,
            detail,
            ..
        } => {
            sqlx::query(
                "INSERT INTO deploy_steps (deploy_id, position, step, detail, time)
                 SELECT $1, COALESCE(max(position), 0) + 1, $2, $3, $4
                 FROM deploy_steps WHERE deploy_id = $1",
            )
            .bind(deploy_id.as_uuid())
            .bind(step)
            .bind(detail)
            .bind(time)
            .execute(conn)
            .await
            .map_err(db("project DeployStepCompleted"))?;
        }
        Event::EnvReleaseChanged { env_id, release_id } => {
            sqlx::query("UPDATE envs SET current_release_id = $2 WHERE id = $1")
                .bind(env_id.as_uuid())
                .bind(release_id.as_uuid())
                .execute(conn)
                .await
                .map_err(db("project EnvReleaseChanged"))?;
        }
        Event::InstancePlaced {
            instance_id,
            env_id,
            release_id,
            process,
            host_id,
            ipv6,
            ipv4,
        } => {
            sqlx::query(
                "INSERT INTO instances (id, env_id, release_id, process, host_id, ipv6, ipv4,
                                        desired, state, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)",
            )
            .bind(instance_id.as_uuid())
            .bind(env_id.as_uuid())
            .bind(release_id.as_uuid())
            .bind(process.as_str())
            .bind(host_id.as_uuid())
            .bind(ipv6.to_string())
            .bind(ipv4.to_string())
            .bind(enum_text(&DesiredState::Running, envelope.seq)?)
            .bind(enum_text(&InstanceState::Pending, envelope.seq)?)
            .bind(time)
            .execute(&mut *conn)
            .await
            .map_err(db("project InstancePlaced"))?;
            let instance = Some(instance_id.as_uuid());
            insert_address(
                &mut *conn,
                env_id.as_uuid(),
                &ipv6.to_string(),
                AddressKind::InstanceIpv6,
                instance,
            )
            .await?;
            insert_address(
                conn,
                env_id.as_uuid(),
                &ipv4.to_string(),
                AddressKind::InstanceIpv4,
                instance,
            )
            .await?;
        }
        Event::InstanceStateChanged {
            instance_id,
            state,
            detail,
            ..
        } => {
            sqlx::query(
                "UPDATE instances SET state = $2, detail = $3, updated_at = $4 WHERE id = $1",
            )
            .bind(instance_id.as_uuid())
            .bind(enum_text(state, envelope.seq)?)
            .bind(detail.as_deref())
            .bind(time)
            .execute(conn)
            .await
            .map_err(db("project InstanceStateChanged"))?;
        }
        Event::InstanceStopRequested { instance_id, .. } => {
            sqlx::query("UPDATE instances SET desired = $2, updated_at = $3 WHERE id = $1")
                .bind(instance_id.as_uuid())
                .bind(enum_text(&DesiredState::Stopped, envelope.seq)?)
                .bind(time)
                .execute(conn)
                .await
                .map_err(db("project InstanceStopRequested"))?;
        }
        Event::InstanceRemoved { instance_id, .. } => {
            sqlx::query("DELETE FROM addresses WHERE instance_id = $1")
                .bind(instance_id.as_uuid())
                .execute(&mut *conn)
                .await
                .map_err(db("project InstanceRemoved"))?;
            sqlx::query("DELETE FROM instances WHERE id = $1")
                .bind(instance_id.as_uuid())
                .execute(conn)
                .await
                .map_err(db("project InstanceRemoved"))?;
        }
        Event::RoutesChanged { env_id, routes } => {
            sqlx::query("DELETE FROM routes WHERE env_id = $1")
                .bind(env_id.as_uuid())
                .execute(&mut *conn)
                .await
                .map_err(db("project RoutesChanged"))?;
            for (position, route) in routes.iter().enumerate() {
                let codec = |source| StoreError::Codec {
                    seq: envelope.seq,
                    source,
                };
                sqlx::query(
                    "INSERT INTO routes (env_id, position, service, matcher, protocol,
                                         proxy_protocol, backends)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(env_id.as_uuid())
                .bind(position as i32)
                .bind(&route.service)
                .bind(serde_json::to_value(&route.matcher).map_err(codec)?)
                .bind(enum_text(&route.protocol, envelope.seq)?)
                .bind(route.proxy_protocol)
                .bind(serde_json::to_value(&route.backends).map_err(codec)?)
                .execute(&mut *conn)
                .await
                .map_err(db("project RoutesChanged"))?;
            }
        }
        Event::HostCreated { host_id, name } => {
            sqlx::query("INSERT INTO hosts (id, name, state, created_at) VALUES ($1, $2, $3, $4)")
                .bind(host_id.as_uuid())
                .bind(name)
                .bind(enum_text(&HostState::Pending, envelope.seq)?)
                .bind(time)
                .execute(conn)
                .await
                .map_err(db("project HostCreated"))?;
        }
        Event::HostRegistered {
            host_id,
            capacity,
            driver,
            overlay_public_key,
            overlay_endpoint,
            ipv6_prefix,
        } => {
            // Registration makes a pending or lost host ready; a cordoned or draining host
            // stays so across agent restarts.
            sqlx::query(
                "UPDATE hosts SET vcpus = $2, memory_mib = $3, driver = $4,
                                  overlay_public_key = $5, overlay_endpoint = $6,
                                  ipv6_prefix = $7,
                                  state = CASE WHEN state IN ('pending', 'lost') THEN 'ready'
                                               ELSE state END
                 WHERE id = $1",
            )
            .bind(host_id.as_uuid())
            .bind(capacity.vcpus as i32)
            .bind(capacity.memory_mib as i64)
            .bind(enum_text(driver, envelope.seq)?)
            .bind(overlay_public_key)
            .bind(overlay_endpoint.to_string())
            .bind(ipv6_prefix)
            .execute(conn)
            .await
            .map_err(db("project HostRegistered"))?;
        }
        Event::HostCordoned { host_id } => {
            set_host_state(conn, host_id.as_uuid(), HostState::Cordoned).await?
        }
        Event::HostUncordoned { host_id } => {
            set_host_state(conn, host_id.as_uuid(), HostState::Ready).await?
        }
        Event::HostDrainRequested { host_id } => {
            set_host_state(conn, host_id.as_uuid(), HostState::Draining).await?
        }
        Event::HostLost { host_id } => {
            set_host_state(conn, host_id.as_uuid(), HostState::Lost).await?
        }
        Event::Ipv4AddressAllocated {
            env_id,
            address,
            pool,
        } => {
            sqlx::query(
                "INSERT INTO addresses (address, env_id, kind, instance_id, pool)
                 VALUES ($1, $2, $3, NULL, $4)",
            )
            .bind(address.to_string())
            .bind(env_id.as_uuid())
            .bind(enum_text(&AddressKind::DedicatedIpv4, envelope.seq)?)
            .bind(pool)
            .execute(conn)
            .await
            .map_err(db("project Ipv4AddressAllocated"))?;
        }
        Event::Ipv4AddressReleased { address, .. } => {
            sqlx::query("DELETE FROM addresses WHERE address = $1 AND kind = 'dedicated_ipv4'")
                .bind(address.to_string())
                .execute(conn)
                .await
                .map_err(db("project Ipv4AddressReleased"))?;
        }
    }
    Ok(())
}

/// Returns the serde name of a unit enum variant, such as `"rolling"`.
pub fn enum_text<T: serde::Serialize>(value: &T, seq: u64) -> Result<String, StoreError> {
    match serde_json::to_value(value).map_err(|source| StoreError::Codec { seq, source })? {
        serde_json::Value::String(text) => Ok(text),
        other => Ok(other.to_string()),
    }
}

async fn insert_address(
    conn: &mut sqlx::PgConnection,
    env_id: uuid::Uuid,
    address: &str,
    kind: AddressKind,
    instance_id: Option<uuid::Uuid>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO addresses (address, env_id, kind, instance_id) VALUES ($1, $2, $3, $4)",
    )
    .bind(address)
    .bind(env_id)
    .bind(enum_text(&kind, 0)?)
    .bind(instance_id)
    .execute(conn)
    .await
    .map_err(StoreError::database("project address"))?;
    Ok(())
}

async fn set_secrets_version(
    conn: &mut sqlx::PgConnection,
    env_id: uuid::Uuid,
    version: u64,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE envs SET secrets_version = $2 WHERE id = $1")
        .bind(env_id)
        .bind(version as i64)
        .execute(conn)
        .await
        .map_err(StoreError::database("project secrets version"))?;
    Ok(())
}

async fn set_host_state(
    conn: &mut sqlx::PgConnection,
    host_id: uuid::Uuid,
    state: HostState,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE hosts SET state = $2 WHERE id = $1")
        .bind(host_id)
        .bind(enum_text(&state, 0)?)
        .execute(conn)
        .await
        .map_err(StoreError::database("project host state"))?;
    Ok(())
}
