//! What a deploy rolls out, resolved before anything is appended: a new release, the current
//! release again, or a rollback.
//!
//! A rollback is a new release: it repeats an older release's image digest and manifest,
//! names that release in `rollback_of`, sets the environment's config vars back to the values
//! they had at that release's config version, and points each secret back at the version
//! that release had. Config and secret history are read from the `ConfigChanged`,
//! `SecretSet` and `SecretUnset` events of the environment's stream. Secret values are kept by
//! version in `secret_values`, so a rollback stores no value again.

use std::collections::BTreeMap;

use kiln_api::types::{DeployTarget, Release};
use kiln_api::{ErrorCode, Event};
use kiln_core::{EnvId, ReleaseId};
use sqlx::Row;

use super::error::ApiError;
use super::releases::{by_version, next_release};
use crate::store::streams;

/// A deploy target resolved against the environment's current state.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The release the deploy rolls out.
    pub release: Release,
    /// Whether the deploy creates `release` (a new release or a rollback release).
    pub creates_release: bool,
    /// Events to append before `DeployRequested`: a config and secrets restore for a
    /// rollback, then `ReleaseCreated` when the deploy creates its release.
    pub events: Vec<Event>,
}

/// Resolves `target` for `env`. A release the deploy creates gets the id `new_release`.
pub async fn prepare(
    pool: &sqlx::PgPool,
    env: EnvId,
    target: &DeployTarget,
    new_release: ReleaseId,
) -> Result<Prepared, ApiError> {
    let old = match target {
        DeployTarget::NewRelease(request) => {
            let release = Release {
                id: new_release,
                ..next_release(pool, env, request).await?
            };
            return Ok(Prepared {
                events: vec![Event::ReleaseCreated {
                    release: Box::new(release.clone()),
                }],
                release,
                creates_release: true,
            });
        }
        DeployTarget::ReleaseVersion(version) => by_version(pool, env, *version)
            .await?
            .ok_or_else(|| ApiError::not_found("release", format!("v{version}")))?,
    };

    let current: Option<Option<uuid::Uuid>> =
        sqlx::query_scalar("SELECT current_release_id FROM envs WHERE id = $1")
            .bind(env.as_uuid())
            .fetch_optional(pool)
            .await
            .map_err(ApiError::database("read current release"))?;
    let current = current.ok_or_else(|| ApiError::not_found("environment", env))?;
    if current == Some(old.id.as_uuid()) {
        return Ok(Prepared {
            release: old,
            creates_release: false,
            events: Vec::new(),
        });
    }

    rollback(pool, env, old, new_release).await
}

/// Builds the rollback release of `old` and the changes that restore its config vars and
/// secrets.
async fn rollback(
    pool: &sqlx::PgPool,
    env: EnvId,
    old: Release,
    id: ReleaseId,
) -> Result<Prepared, ApiError> {
    let (mut events, config_version) = restore(pool, env, &old).await?;

    let count: i64 = sqlx::query_scalar("SELECT release_count FROM envs WHERE id = $1")
        .bind(env.as_uuid())
        .fetch_one(pool)
        .await
        .map_err(ApiError::database("read release count"))?;
    let release = Release {
        id,
        env_id: env,
        version: count as u64 + 1,
        description: format!("Rollback to v{}", old.version),
        image: old.image,
        spec: old.spec,
        config_version,
        rollback_of: Some(old.id),
        created_at: crate::store::now(),
    };
    events.push(Event::ReleaseCreated {
        release: Box::new(release.clone()),
    });
    Ok(Prepared {
        release,
        creates_release: true,
        events,
    })
}

/// The config vars of `env` at config version `version`, replayed from its `ConfigChanged`
/// events (version 0 has none).
pub async fn config_at(
    pool: &sqlx::PgPool,
    env: EnvId,
    version: u64,
) -> Result<BTreeMap<String, String>, ApiError> {
    let rows = sqlx::query(
        "SELECT payload FROM events
         WHERE stream = $1 AND type = 'ConfigChanged'
           AND (payload->'data'->>'version')::bigint <= $2
         ORDER BY seq",
    )
    .bind(streams::env(env))
    .bind(i64::try_from(version).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await
    .map_err(ApiError::database("read config history"))?;

    let mut vars = BTreeMap::new();
    for row in rows {
        let payload: serde_json::Value = row.get("payload");
        let Ok(Event::ConfigChanged { set, unset, .. }) = serde_json::from_value(payload) else {
            return Err(ApiError::internal("stored ConfigChanged event is invalid"));
        };
        for name in unset {
            vars.remove(&name);
        }
        vars.extend(set);
    }
    Ok(vars)
}

/// The events that set the environment's config vars and secrets back to what `release` was
/// made with (none when they already are), and the config version they leave. A rollback
/// appends them before its release; a failed rollback deploy appends them for the release it
/// returns to.
pub async fn restore(
    pool: &sqlx::PgPool,
    env: EnvId,
    release: &Release,
) -> Result<(Vec<Event>, u64), ApiError> {
    let restored = config_at(pool, env, release.config_version).await?;
    let now = super::config::load(pool, env).await?;

    let set: BTreeMap<String, String> = restored
        .iter()
        .filter(|(name, value)| now.vars.get(*name) != Some(*value))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    let unset: Vec<String> = now
        .vars
        .keys()
        .filter(|name| !restored.contains_key(*name))
        .cloned()
        .collect();

    let mut events = Vec::new();
    let mut config_version = now.version;
    if !set.is_empty() || !unset.is_empty() {
        config_version += 1;
        events.push(Event::ConfigChanged {
            env_id: env,
            version: config_version,
            set,
            unset,
        });
    }
    events.extend(restore_secrets(pool, env, release.id).await?);
    Ok((events, config_version))
}

/// The events that point the environment's secrets back at the versions `release` had: a
/// `SecretSet` naming the old version for each secret that differs, a `SecretUnset` for each
/// secret the release did not have. Each bumps the secret-set version by one, as the
/// secrets API does.
async fn restore_secrets(
    pool: &sqlx::PgPool,
    env: EnvId,
    release: ReleaseId,
) -> Result<Vec<Event>, ApiError> {
    let then = secrets_at(pool, env, secrets_version_at(pool, env, release).await?).await?;
    let set_version: i64 = sqlx::query_scalar("SELECT secrets_version FROM envs WHERE id = $1")
        .bind(env.as_uuid())
        .fetch_one(pool)
        .await
        .map_err(ApiError::database("read secrets version"))?;
    let mut set_version = set_version as u64;
    let now = secrets_at(pool, env, set_version).await?;

    let mut events = Vec::new();
    for (name, pin) in &then {
        if now.get(name) == Some(pin) {
            continue;
        }
        let stored: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM secret_values
                            WHERE env_id = $1 AND name = $2 AND version = $3)",
        )
        .bind(env.as_uuid())
        .bind(name)
        .bind(pin.version as i64)
        .fetch_one(pool)
        .await
        .map_err(ApiError::database("check a stored secret value"))?;
        if !stored {
            // Values set before they were kept by version were overwritten by newer ones.
            return Err(ApiError::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "secret {name} version {} of that release is no longer stored, so the \
                     rollback cannot restore it; set it with `kiln secrets set {name}` and \
                     deploy instead",
                    pin.version
                ),
            )
            .with_details(serde_json::json!({ "secret": name, "version": pin.version })));
        }
        set_version += 1;
        events.push(Event::SecretSet {
            env_id: env,
            name: name.clone(),
            version: pin.version,
            digest: pin.digest.clone(),
            secrets_version: set_version,
        });
    }
    for name in now.keys().filter(|name| !then.contains_key(*name)) {
        set_version += 1;
        events.push(Event::SecretUnset {
            env_id: env,
            name: name.clone(),
            secrets_version: set_version,
        });
    }
    Ok(events)
}

/// Version of a secret's value in a secret set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretPin {
    /// The value's version in `secret_values`.
    pub version: u64,
    /// The value's keyed digest.
    pub digest: String,
}

/// The secrets of `env` at secret-set version `version`, by name, replayed from its
/// `SecretSet` and `SecretUnset` events (version 0 has none).
pub async fn secrets_at(
    pool: &sqlx::PgPool,
    env: EnvId,
    version: u64,
) -> Result<BTreeMap<String, SecretPin>, ApiError> {
    let rows = sqlx::query(
        "SELECT payload FROM events
         WHERE stream = $1 AND type IN ('SecretSet', 'SecretUnset')
           AND (payload->'data'->>'secrets_version')::bigint <= $2
         ORDER BY seq",
    )
    .bind(streams::env(env))
    .bind(i64::try_from(version).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await
    .map_err(ApiError::database("read secrets history"))?;

    let mut secrets = BTreeMap::new();
    for row in rows {
        let payload: serde_json::Value = row.get("payload");
        match serde_json::from_value(payload) {
            Ok(Event::SecretSet {
                name,
                version,
                digest,
                ..
            }) => {
                secrets.insert(name, SecretPin { version, digest });
            }
            Ok(Event::SecretUnset { name, .. }) => {
                secrets.remove(&name);
            }
            _ => return Err(ApiError::internal("stored secret event is invalid")),
        }
    }
    Ok(secrets)
}

/// The version of the environment's secret set that `release` was made with (0 when no
/// secret was set before it): the secrets its instances get.
pub async fn secrets_version_at(
    pool: &sqlx::PgPool,
    env: EnvId,
    release: ReleaseId,
) -> Result<u64, ApiError> {
    let version: Option<i64> =
        sqlx::query_scalar("SELECT secrets_version FROM releases WHERE id = $1 AND env_id = $2")
            .bind(release.as_uuid())
            .bind(env.as_uuid())
            .fetch_optional(pool)
            .await
            .map_err(ApiError::database("read a release's secrets version"))?;
    let version = version.ok_or_else(|| ApiError::not_found("release", release))?;
    Ok(version as u64)
}
