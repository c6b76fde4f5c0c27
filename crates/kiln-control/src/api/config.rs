//! Config vars of an environment: plain environment variables, versioned.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use kiln_api::Event;
use kiln_api::types::{ConfigVars, UpdateConfig};
use kiln_core::{AppName, EnvId, EnvName};
use sqlx::Row;

use super::error::ApiError;
use super::extract::{JsonBody, name};
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
    Path(path): Path<(String, String, String)>,
    JsonBody(request): JsonBody<UpdateConfig>,
) -> Result<Json<ConfigVars>, ApiError> {
    let org = scope::org(&caller, &path.0)?;
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

    // The append names the stream version read with the config, so it fails with a conflict
    // when anything else changed the environment in between. The response is then the read
    // config with this change applied, without reading it back.
    let actor = caller.actor();
    let updated = retry_on_conflict(|| async {
        let (env, stream_version, current) = load_for_update(&state, &org, &path).await?;
        let event = Event::ConfigChanged {
            env_id: env.id,
            version: current.version + 1,
            set: request.set.clone(),
            unset: request.unset.clone(),
        };
        state
            .store
            .append(
                &streams::env(env.id),
                ExpectedVersion::Exact(stream_version),
                vec![NewEvent::org(env.org_id(), event)],
                &actor,
            )
            .await?;
        Ok(apply_change(current, &request))
    })
    .await?;
    Ok(Json(updated))
}

/// Returns `current` with `change` applied, as the `ConfigChanged` projection applies it.
fn apply_change(current: ConfigVars, change: &UpdateConfig) -> ConfigVars {
    let mut vars = current.vars;
    for name in &change.unset {
        vars.remove(name);
    }
    for (name, value) in &change.set {
        vars.insert(name.clone(), value.clone());
    }
    ConfigVars {
        version: current.version + 1,
        vars,
    }
}

/// Resolves the environment of `path` and reads its stream version and config, in one query.
async fn load_for_update(
    state: &AppState,
    org: &scope::OrgScope,
    (_, app, env): &(String, String, String),
) -> Result<(scope::EnvScope, u64, ConfigVars), ApiError> {
    let app_name = name("app", app, AppName::new)?;
    let env_name = name("env", env, EnvName::new)?;

    // The stream id spells `streams::env(env_id)`: `env:env_` and the UUID as 32 hex digits.
    // If the two differed, every PATCH would conflict, so the config API tests would fail.
    let row = sqlx::query(
        "SELECT a.id AS app_id, e.id AS env_id, e.config_version,
                (SELECT s.version FROM streams s
                 WHERE s.id = 'env:env_' || replace(e.id::text, '-', '')) AS stream_version,
                (SELECT coalesce(jsonb_object_agg(v.name, v.value), '{}')
                 FROM config_vars v WHERE v.env_id = e.id) AS vars
         FROM apps a LEFT JOIN envs e ON e.app_id = a.id AND e.name = $3
         WHERE a.org_id = $1 AND a.name = $2",
    )
    .bind(org.id.as_uuid())
    .bind(app_name.as_str())
    .bind(env_name.as_str())
    .fetch_optional(state.store.pool())
    .await
    .map_err(ApiError::database("read config for update"))?;
    let Some(row) = row else {
        return Err(ApiError::not_found("app", &app_name));
    };
    let env = scope::env_scope(org.clone(), app_name, env_name, Some(&row))?;
    let stream_version: Option<i64> = row.get("stream_version");
    let config_version: i64 = row.get("config_version");
    let vars: sqlx::types::Json<BTreeMap<String, String>> = row.get("vars");
    let current = ConfigVars {
        version: config_version as u64,
        vars: vars.0,
    };
    Ok((env, stream_version.unwrap_or(0) as u64, current))
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
