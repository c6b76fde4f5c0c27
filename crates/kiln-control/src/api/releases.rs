//! Releases of an environment: immutable, numbered per environment.

use std::collections::HashSet;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kiln_api::Event;
use kiln_api::types::{CreateRelease, HealthCheckKind, ImageRef, List, Release, ReleaseSpec};
use kiln_core::{EnvId, ReleaseId};
use kiln_scheduler::plan::RELEASE_COMMAND_PROCESS;
use sqlx::Row;

use super::config::validate_var_name;
use super::error::ApiError;
use super::extract::JsonBody;
use super::{AppState, retry_on_conflict, scope};
use crate::auth::Caller;
use crate::store::{ExpectedVersion, NewEvent, streams};

/// Smallest memory of an instance, in MiB.
pub const MIN_MEMORY_MIB: u32 = 128;
/// Largest memory of an instance, in MiB.
pub const MAX_MEMORY_MIB: u32 = 65536;
/// Most virtual CPUs of an instance.
pub const MAX_VCPUS: u32 = 32;

const RELEASE_COLUMNS: &str = "id, env_id, version, image_ref, image_digest, spec, config_version, rollback_of, description, created_at";

/// `GET .../releases`, newest first.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
) -> Result<Json<List<Release>>, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    let rows = sqlx::query(&format!(
        "SELECT {RELEASE_COLUMNS} FROM releases WHERE env_id = $1 ORDER BY version DESC"
    ))
    .bind(env.id.as_uuid())
    .fetch_all(state.store.pool())
    .await
    .map_err(ApiError::database("list releases"))?;
    let items = rows
        .iter()
        .map(release_from_row)
        .collect::<Result<_, _>>()?;
    Ok(Json(List { items }))
}

/// `GET .../releases/{version}`.
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env, version)): Path<(String, String, String, String)>,
) -> Result<Json<Release>, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    let version = parse_version(&version)?;
    let release = by_version(state.store.pool(), env.id, version).await?;
    release
        .map(Json)
        .ok_or_else(|| ApiError::not_found("release", format!("v{version}")))
}

/// `POST .../releases`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
    JsonBody(request): JsonBody<CreateRelease>,
) -> Result<(StatusCode, Json<Release>), ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    validate_release(&request)?;
    let stream = streams::env(env.id);
    let release = retry_on_conflict(|| async {
        let stream_version = state.store.stream_version(&stream).await?;
        let release = next_release(state.store.pool(), env.id, &request).await?;
        let event = Event::ReleaseCreated {
            release: Box::new(release.clone()),
        };
        let envelopes = state
            .store
            .append(
                &stream,
                ExpectedVersion::Exact(stream_version),
                vec![NewEvent::org(env.org_id(), event)],
                &caller.actor(),
            )
            .await?;
        Ok(Release {
            created_at: envelopes[0].time,
            ..release
        })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(release)))
}

/// Builds the next release of an environment from a request (version and config version
/// read from the projections; the caller appends it with the stream version it read first).
pub async fn next_release(
    pool: &sqlx::PgPool,
    env_id: EnvId,
    request: &CreateRelease,
) -> Result<Release, ApiError> {
    let row = sqlx::query("SELECT release_count, config_version FROM envs WHERE id = $1")
        .bind(env_id.as_uuid())
        .fetch_optional(pool)
        .await
        .map_err(ApiError::database("read release count"))?
        .ok_or_else(|| ApiError::not_found("environment", env_id))?;
    let count: i64 = row.get("release_count");
    let config_version: i64 = row.get("config_version");
    Ok(Release {
        id: ReleaseId::new(),
        env_id,
        version: count as u64 + 1,
        image: request.image.clone(),
        spec: request.spec.clone(),
        config_version: config_version as u64,
        rollback_of: None,
        description: request.description.clone(),
        created_at: crate::store::now(),
    })
}

/// Validates a release request: image digest, processes, services and settings.
pub fn validate_release(request: &CreateRelease) -> Result<(), ApiError> {
    validate_image(&request.image)?;
    validate_spec(&request.spec)?;
    if request.description.len() > 4096 {
        return Err(ApiError::invalid(
            "description",
            "description is longer than 4096 bytes",
        ));
    }
    Ok(())
}

fn validate_image(image: &ImageRef) -> Result<(), ApiError> {
    let hex = image.digest.strip_prefix("sha256:").unwrap_or("");
    if hex.len() != 64
        || !hex
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    {
        return Err(ApiError::invalid(
            "image.digest",
            format!(
                "invalid image digest {:?}: expected sha256: followed by 64 lowercase hex characters",
                image.digest
            ),
        ));
    }
    if image.reference.is_empty()
        || image.reference.len() > 512
        || image
            .reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ApiError::invalid(
            "image.reference",
            format!(
                "invalid image reference {:?}: expected something like registry.example/app:tag",
                image.reference
            ),
        ));
    }
    Ok(())
}

fn validate_spec(spec: &ReleaseSpec) -> Result<(), ApiError> {
    if spec.processes.is_empty() {
        return Err(ApiError::invalid(
            "spec.processes",
            "a release needs at least one process type",
        ));
    }
    for (name, process) in &spec.processes {
        let field = format!("spec.processes.{name}");
        if process.vcpus == 0 || process.vcpus > MAX_VCPUS {
            return Err(ApiError::invalid(
                &field,
                format!(
                    "vcpus {} of process {name} is out of range 1..={MAX_VCPUS}",
                    process.vcpus
                ),
            ));
        }
        if process.memory_mib < MIN_MEMORY_MIB || process.memory_mib > MAX_MEMORY_MIB {
            return Err(ApiError::invalid(
                &field,
                format!(
                    "memory_mib {} of process {name} is out of range {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}",
                    process.memory_mib
                ),
            ));
        }
        if process.count > super::envs::MAX_INSTANCES_PER_PROCESS {
            return Err(ApiError::invalid(
                &field,
                format!(
                    "count {} of process {name} is above the maximum of {}",
                    process.count,
                    super::envs::MAX_INSTANCES_PER_PROCESS
                ),
            ));
        }
    }

    let mut services = HashSet::new();
    for service in &spec.services {
        if !services.insert(service.name.as_str()) {
            return Err(ApiError::invalid(
                "spec.services",
                format!("service {} is declared twice", service.name),
            ));
        }
        kiln_core::names::validate_label("service", &service.name)
            .map_err(|error| ApiError::invalid("spec.services", error.to_string()))?;
        if !spec.processes.contains_key(&service.process) {
            return Err(ApiError::invalid(
                "spec.services",
                format!(
                    "service {} names process {}, which the release does not define",
                    service.name, service.process
                ),
            ));
        }
        if service.internal_port == 0 {
            return Err(ApiError::invalid(
                "spec.services",
                format!("service {} has port 0; use 1 to 65535", service.name),
            ));
        }
        if let Some(check) = &service.health_check {
            if check.interval_secs == 0 || check.timeout_secs == 0 {
                return Err(ApiError::invalid(
                    "spec.services",
                    format!(
                        "health check of service {} needs an interval and timeout of at least 1 second",
                        service.name
                    ),
                ));
            }
            if let HealthCheckKind::Http {
                expected_status: Some(status),
                ..
            } = &check.kind
                && !(100..=599).contains(status)
            {
                return Err(ApiError::invalid(
                    "spec.services",
                    format!(
                        "expected status {status} of service {}'s health check is not an HTTP \
                         status; use 100 to 599",
                        service.name
                    ),
                ));
            }
            if let HealthCheckKind::Http { path, .. } = &check.kind
                && !path.starts_with('/')
            {
                return Err(ApiError::invalid(
                    "spec.services",
                    format!(
                        "health check path {path:?} of service {} must start with '/'",
                        service.name
                    ),
                ));
            }
        }
    }

    for name in spec.env.keys() {
        validate_var_name("spec.env", name)?;
    }
    let signals = std::iter::once(("spec.kill_signal".to_owned(), &spec.kill_signal)).chain(
        spec.processes.iter().filter_map(|(name, process)| {
            let field = format!("spec.processes.{name}.kill_signal");
            process.kill_signal.as_ref().map(|signal| (field, signal))
        }),
    );
    for (field, signal) in signals {
        if !KILL_SIGNALS.contains(&signal.as_str()) {
            return Err(ApiError::invalid(
                &field,
                format!(
                    "invalid kill signal {signal:?} in {field}: use one of {}",
                    KILL_SIGNALS.join(", ")
                ),
            ));
        }
    }
    let timeouts = std::iter::once(spec.kill_timeout_secs).chain(
        spec.processes
            .values()
            .filter_map(|process| process.kill_timeout_secs),
    );
    for timeout in timeouts {
        if timeout > MAX_KILL_TIMEOUT_SECS {
            return Err(ApiError::invalid(
                "spec.kill_timeout_secs",
                format!(
                    "kill timeout {timeout} s is longer than {MAX_KILL_TIMEOUT_SECS} s; use a shorter one"
                ),
            ));
        }
    }
    for (index, script) in spec.startup_scripts.iter().enumerate() {
        if script.command.trim().is_empty() {
            return Err(ApiError::invalid(
                "spec.startup_scripts",
                format!("startup script {index} has an empty command"),
            ));
        }
        if script.timeout_secs == Some(0) {
            return Err(ApiError::invalid(
                "spec.startup_scripts",
                format!("startup script {index} has a timeout of 0 s; give it at least 1 s"),
            ));
        }
        if let Some(process) = script
            .processes
            .iter()
            .find(|process| !spec.processes.contains_key(*process))
        {
            return Err(ApiError::invalid(
                "spec.startup_scripts",
                format!(
                    "startup script {index} names process type {process}, which the release \
                     does not define"
                ),
            ));
        }
    }
    for volume in &spec.volumes {
        if !volume.mount_path.starts_with('/') || volume.size_mib == 0 {
            return Err(ApiError::invalid(
                "spec.volumes",
                format!(
                    "volume {} needs an absolute mount path and a size of at least 1 MiB",
                    volume.name
                ),
            ));
        }
    }
    validate_release_command(spec)
}

/// Maximum timeout of a release command, in seconds (one day).
const MAX_RELEASE_COMMAND_TIMEOUT_SECS: u64 = 86_400;

fn validate_release_command(spec: &ReleaseSpec) -> Result<(), ApiError> {
    if spec
        .processes
        .keys()
        .any(|name| name.as_str() == RELEASE_COMMAND_PROCESS)
    {
        return Err(ApiError::invalid(
            "spec.processes",
            format!(
                "process type name {RELEASE_COMMAND_PROCESS} is reserved for the release \
                 command; rename the process type"
            ),
        ));
    }
    if let Some(command) = &spec.release_command
        && command.first().is_none_or(|program| program.is_empty())
    {
        return Err(ApiError::invalid(
            "spec.release_command",
            "the release command is empty; give its argv, such as [\"/app/migrate\"]",
        ));
    }
    let Some(limits) = spec.release_command_limits else {
        return Ok(());
    };
    if limits.timeout_secs == 0 || limits.timeout_secs > MAX_RELEASE_COMMAND_TIMEOUT_SECS {
        return Err(ApiError::invalid(
            "spec.release_command_limits",
            format!(
                "release command timeout {} s is out of range 1..={MAX_RELEASE_COMMAND_TIMEOUT_SECS}",
                limits.timeout_secs
            ),
        ));
    }
    if limits.vcpus == 0 || limits.vcpus > MAX_VCPUS {
        return Err(ApiError::invalid(
            "spec.release_command_limits",
            format!(
                "release command vcpus {} is out of range 1..={MAX_VCPUS}",
                limits.vcpus
            ),
        ));
    }
    if limits.memory_mib < MIN_MEMORY_MIB || limits.memory_mib > MAX_MEMORY_MIB {
        return Err(ApiError::invalid(
            "spec.release_command_limits",
            format!(
                "release command memory_mib {} is out of range {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}",
                limits.memory_mib
            ),
        ));
    }
    Ok(())
}

/// Parses a release version from a path (`3` or `v3`).
pub fn parse_version(text: &str) -> Result<u64, ApiError> {
    text.strip_prefix('v')
        .unwrap_or(text)
        .parse::<u64>()
        .ok()
        .filter(|version| *version > 0)
        .ok_or_else(|| {
            ApiError::invalid(
                "version",
                format!(
                    "invalid release version {text:?}: expected a number from 1, such as 3 or v3"
                ),
            )
        })
}

/// Loads a release by version.
pub async fn by_version(
    pool: &sqlx::PgPool,
    env_id: EnvId,
    version: u64,
) -> Result<Option<Release>, ApiError> {
    let row = sqlx::query(&format!(
        "SELECT {RELEASE_COLUMNS} FROM releases WHERE env_id = $1 AND version = $2"
    ))
    .bind(env_id.as_uuid())
    .bind(version as i64)
    .fetch_optional(pool)
    .await
    .map_err(ApiError::database("load release"))?;
    row.as_ref().map(release_from_row).transpose()
}

/// Loads a release by id.
pub async fn by_id(pool: &sqlx::PgPool, id: ReleaseId) -> Result<Option<Release>, ApiError> {
    let row = sqlx::query(&format!(
        "SELECT {RELEASE_COLUMNS} FROM releases WHERE id = $1"
    ))
    .bind(id.as_uuid())
    .fetch_optional(pool)
    .await
    .map_err(ApiError::database("load release"))?;
    row.as_ref().map(release_from_row).transpose()
}

/// Decodes a row of `releases`.
pub fn release_from_row(row: &sqlx::postgres::PgRow) -> Result<Release, ApiError> {
    let spec: serde_json::Value = row.get("spec");
    let version: i64 = row.get("version");
    let config_version: i64 = row.get("config_version");
    Ok(Release {
        id: ReleaseId::from_uuid(row.get("id")),
        env_id: EnvId::from_uuid(row.get("env_id")),
        version: version as u64,
        image: ImageRef {
            reference: row.get("image_ref"),
            digest: row.get("image_digest"),
        },
        spec: serde_json::from_value(spec)
            .map_err(|_| ApiError::internal("stored release spec is invalid"))?,
        config_version: config_version as u64,
        rollback_of: row
            .get::<Option<uuid::Uuid>, _>("rollback_of")
            .map(ReleaseId::from_uuid),
        description: row.get("description"),
        created_at: row.get("created_at"),
    })
}

/// Signals an agent can send to ask an instance to stop. SIGKILL is not one, because the
/// process cannot catch it, and the agent sends it anyway when the kill timeout ends.
const KILL_SIGNALS: [&str; 7] = [
    "SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH",
];

/// Maximum time between the stop signal and the kill, one hour.
const MAX_KILL_TIMEOUT_SECS: u32 = 3600;
