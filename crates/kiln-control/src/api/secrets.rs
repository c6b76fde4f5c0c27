//! Secrets of an environment. Values go in and are encrypted at once; listings, events and
//! logs carry only names, versions and digests. Values come out only through the host
//! endpoint, for instances placed on the calling host.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kiln_api::Event;
use kiln_api::types::{List, SecretMeta, SetSecret};
use kiln_core::EnvId;
use rand::RngCore;
use sqlx::{Postgres, Row, Transaction};

use super::config::validate_var_name;
use super::error::ApiError;
use super::extract::JsonBody;
use super::{AppState, retry_on_conflict, scope};
use crate::auth::Caller;
use crate::store::{ExpectedVersion, NewEvent, Store, streams};

/// Largest secret value, in bytes.
pub const MAX_SECRET_LEN: usize = 64 * 1024;

/// `GET .../secrets`.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
) -> Result<Json<List<SecretMeta>>, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    let rows = sqlx::query(
        "SELECT name, version, digest, updated_at FROM secrets WHERE env_id = $1 ORDER BY name",
    )
    .bind(env.id.as_uuid())
    .fetch_all(state.store.pool())
    .await
    .map_err(ApiError::database("list secrets"))?;
    let items = rows.iter().map(meta_from_row).collect();
    Ok(Json(List { items }))
}

/// `PUT .../secrets/{name}`.
pub async fn set(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env, name)): Path<(String, String, String, String)>,
    JsonBody(request): JsonBody<SetSecret>,
) -> Result<Json<SecretMeta>, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    validate_var_name("name", &name)?;
    if request.value.len() > MAX_SECRET_LEN {
        return Err(ApiError::invalid(
            "value",
            format!(
                "secret {name} has {} bytes, the maximum is {MAX_SECRET_LEN}",
                request.value.len()
            ),
        ));
    }

    let stream = streams::env(env.id);
    retry_on_conflict(|| async {
        let stream_version = state.store.stream_version(&stream).await?;
        let versions = versions(state.store.pool(), env.id, &name).await?;
        let (secrets_version, version) = (versions.set, versions.latest + 1);

        let mut tx = state.store.begin().await?;
        let digest_key = digest_key(&mut tx, env.id).await?;
        let digest = crate::secrets::digest(&digest_key, request.value.as_bytes());
        let sealed = state
            .keyring
            .seal(env.id, &name, version, request.value.as_bytes())?;
        let event = Event::SecretSet {
            env_id: env.id,
            name: name.clone(),
            version,
            digest,
            secrets_version: secrets_version + 1,
        };
        Store::append_in(
            &mut tx,
            &stream,
            ExpectedVersion::Exact(stream_version),
            vec![NewEvent::org(env.org_id(), event)],
            &caller.actor(),
        )
        .await?;
        sqlx::query(
            "INSERT INTO secret_values (env_id, name, version, key_id, nonce, ciphertext)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(env.id.as_uuid())
        .bind(&name)
        .bind(version as i64)
        .bind(&sealed.key_id)
        .bind(&sealed.nonce)
        .bind(&sealed.ciphertext)
        .execute(&mut *tx)
        .await
        .map_err(ApiError::database("store secret value"))?;
        tx.commit()
            .await
            .map_err(ApiError::database("commit secret"))?;
        Ok(())
    })
    .await?;

    let row = sqlx::query(
        "SELECT name, version, digest, updated_at FROM secrets WHERE env_id = $1 AND name = $2",
    )
    .bind(env.id.as_uuid())
    .bind(&name)
    .fetch_one(state.store.pool())
    .await
    .map_err(ApiError::database("read secret metadata"))?;
    Ok(Json(meta_from_row(&row)))
}

/// `DELETE .../secrets/{name}`.
pub async fn unset(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env, name)): Path<(String, String, String, String)>,
) -> Result<StatusCode, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    validate_var_name("name", &name)?;
    let stream = streams::env(env.id);
    retry_on_conflict(|| async {
        let stream_version = state.store.stream_version(&stream).await?;
        let versions = versions(state.store.pool(), env.id, &name).await?;
        if !versions.is_set {
            return Err(ApiError::not_found("secret", &name));
        }
        let secrets_version = versions.set;
        let mut tx = state.store.begin().await?;
        let event = Event::SecretUnset {
            env_id: env.id,
            name: name.clone(),
            secrets_version: secrets_version + 1,
        };
        Store::append_in(
            &mut tx,
            &stream,
            ExpectedVersion::Exact(stream_version),
            vec![NewEvent::org(env.org_id(), event)],
            &caller.actor(),
        )
        .await?;
        // The value stays: releases made while it was set still deliver it (see
        // `host_agent::secrets`), and a rollback to one of them restores it.
        tx.commit()
            .await
            .map_err(ApiError::database("commit secret removal"))?;
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Versions around secret `name` of an environment.
struct SecretVersions {
    /// The environment's secret-set version.
    set: u64,
    /// Whether the name is set now.
    is_set: bool,
    /// The highest version the name ever had (0 when never set), from the stored values and
    /// the `SecretSet` events. Versions are never reused, even after an unset, because
    /// values are kept by version (and were deleted on unset before that).
    latest: u64,
}

async fn versions(
    pool: &sqlx::PgPool,
    env_id: EnvId,
    name: &str,
) -> Result<SecretVersions, ApiError> {
    let row = sqlx::query(
        "SELECT e.secrets_version, s.version AS current,
                GREATEST(
                    (SELECT max(v.version) FROM secret_values v
                     WHERE v.env_id = e.id AND v.name = $2),
                    (SELECT max((x.payload->'data'->>'version')::bigint) FROM events x
                     WHERE x.stream = $3 AND x.type = 'SecretSet'
                       AND x.payload->'data'->>'name' = $2)) AS latest
         FROM envs e LEFT JOIN secrets s ON s.env_id = e.id AND s.name = $2
         WHERE e.id = $1",
    )
    .bind(env_id.as_uuid())
    .bind(name)
    .bind(streams::env(env_id))
    .fetch_optional(pool)
    .await
    .map_err(ApiError::database("read secret versions"))?;
    let row = row.ok_or_else(|| ApiError::not_found("environment", env_id))?;
    let current: Option<i64> = row.get("current");
    let latest: Option<i64> = row.get("latest");
    Ok(SecretVersions {
        set: row.get::<i64, _>("secrets_version") as u64,
        is_set: current.is_some(),
        latest: current.max(latest).unwrap_or(0) as u64,
    })
}

/// Returns the environment's digest key, creating it on first use.
async fn digest_key(
    tx: &mut Transaction<'static, Postgres>,
    env_id: EnvId,
) -> Result<Vec<u8>, ApiError> {
    let mut fresh = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut fresh);
    sqlx::query("INSERT INTO secret_digest_keys (env_id, key) VALUES ($1, $2) ON CONFLICT (env_id) DO NOTHING")
        .bind(env_id.as_uuid())
        .bind(fresh.as_slice())
        .execute(&mut **tx)
        .await
        .map_err(ApiError::database("create digest key"))?;
    sqlx::query_scalar("SELECT key FROM secret_digest_keys WHERE env_id = $1")
        .bind(env_id.as_uuid())
        .fetch_one(&mut **tx)
        .await
        .map_err(ApiError::database("read digest key"))
}

fn meta_from_row(row: &sqlx::postgres::PgRow) -> SecretMeta {
    let version: i64 = row.get("version");
    SecretMeta {
        name: row.get("name"),
        version: version as u64,
        digest: row.get("digest"),
        updated_at: row.get("updated_at"),
    }
}
