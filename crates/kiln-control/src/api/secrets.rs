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
        let (secrets_version, secret_version) = versions(state.store.pool(), env.id, &name).await?;
        let version = secret_version + 1;

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
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (env_id, name) DO UPDATE
             SET version = EXCLUDED.version, key_id = EXCLUDED.key_id,
                 nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext",
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
        let (secrets_version, secret_version) = versions(state.store.pool(), env.id, &name).await?;
        if secret_version == 0 {
            return Err(ApiError::not_found("secret", &name));
        }
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
        sqlx::query("DELETE FROM secret_values WHERE env_id = $1 AND name = $2")
            .bind(env.id.as_uuid())
            .bind(&name)
            .execute(&mut *tx)
            .await
            .map_err(ApiError::database("delete secret value"))?;
        tx.commit()
            .await
            .map_err(ApiError::database("commit secret removal"))?;
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Returns the environment's secret-set version and the version of secret `name` (0 when
/// it is not set).
async fn versions(pool: &sqlx::PgPool, env_id: EnvId, name: &str) -> Result<(u64, u64), ApiError> {
    let row = sqlx::query(
        "SELECT e.secrets_version, s.version
         FROM envs e LEFT JOIN secrets s ON s.env_id = e.id AND s.name = $2
         WHERE e.id = $1",
    )
    .bind(env_id.as_uuid())
    .bind(name)
    .fetch_optional(pool)
    .await
    .map_err(ApiError::database("read secret versions"))?;
    let row = row.ok_or_else(|| ApiError::not_found("environment", env_id))?;
    let env_version: i64 = row.get("secrets_version");
    let secret_version: Option<i64> = row.get("version");
    Ok((env_version as u64, secret_version.unwrap_or(0) as u64))
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
