//! Config vars of an environment: plain environment variables, versioned.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use kiln_api::Event;
use kiln_api::types::{ConfigVars, UpdateConfig};
use kiln_core::EnvId;
use sqlx::Row;

use super::error::ApiError;
use super::extract::JsonBody;
use super::{AppState, retry_on_conflict, scope};
use crate::auth::Caller;
use crate::store::{ExpectedVersion, NewEvent, streams};

/// Longest variable name, in bytes.
pub const MAX_VAR_NAME_LEN: usize = 255;

/// Longest variable value, in bytes.
pub const MAX_VAR_VALUE_LEN: usize = 32 * 1024;

/// `GET .../config`.
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
) -> Result<Json<ConfigVars>, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    Ok(Json(load(state.store.pool(), env.id).await?))
}

/// `PATCH .../config`.
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
    JsonBody(request): JsonBody<UpdateConfig>,
) -> Result<Json<ConfigVars>, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    if request.set.is_empty() && request.unset.is_empty() {
        return Err(ApiError::invalid(
            "set",
            "nothing to change; give `set` or `unset`",
        ));
    }
    for (name, value) in &request.set {
        validate_var_name("set", name)?;
        if value.len() > MAX_VAR_VALUE_LEN {
            return Err(ApiError::invalid(
                "set",
                format!(
                    "value of {name} has {} bytes, the maximum is {MAX_VAR_VALUE_LEN}",
                    value.len()
                ),
            ));
        }
    }
    for name in &request.unset {
        validate_var_name("unset", name)?;
        if request.set.contains_key(name) {
            return Err(ApiError::invalid(
                "unset",
                format!("{name} is both set and unset; give it once"),
            ));
        }
    }

    let stream = streams::env(env.id);
    retry_on_conflict(|| async {
        let version = state.store.stream_version(&stream).await?;
        let current = load(state.store.pool(), env.id).await?;
        let event = Event::ConfigChanged {
            env_id: env.id,
            version: current.version + 1,
            set: request.set.clone(),
            unset: request.unset.clone(),
        };
        state
            .store
            .append(
                &stream,
                ExpectedVersion::Exact(version),
                vec![NewEvent::org(env.org_id(), event)],
                &caller.actor(),
            )
            .await?;
        Ok(())
    })
    .await?;
    Ok(Json(load(state.store.pool(), env.id).await?))
}

/// Checks an environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most 255 bytes.
pub fn validate_var_name(field: &str, name: &str) -> Result<(), ApiError> {
    let valid_start = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
    let valid_rest = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_start || !valid_rest || name.len() > MAX_VAR_NAME_LEN {
        return Err(ApiError::invalid(
            field,
            format!(
                "invalid variable name {name:?}: use letters, digits and '_', not starting with a digit, at most {MAX_VAR_NAME_LEN} bytes"
            ),
        ));
    }
    Ok(())
}

/// Loads the config vars of an environment.
pub async fn load(pool: &sqlx::PgPool, env_id: EnvId) -> Result<ConfigVars, ApiError> {
    let version: i64 = sqlx::query_scalar("SELECT config_version FROM envs WHERE id = $1")
        .bind(env_id.as_uuid())
        .fetch_optional(pool)
        .await
        .map_err(ApiError::database("read config version"))?
        .ok_or_else(|| ApiError::not_found("environment", env_id))?;
    let rows = sqlx::query("SELECT name, value FROM config_vars WHERE env_id = $1 ORDER BY name")
        .bind(env_id.as_uuid())
        .fetch_all(pool)
        .await
        .map_err(ApiError::database("read config vars"))?;
    let vars: BTreeMap<String, String> = rows
        .iter()
        .map(|row| (row.get("name"), row.get("value")))
        .collect();
    Ok(ConfigVars {
        version: version as u64,
        vars,
    })
}
