//! Environments of an app: create, list, show, delete, scale.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kiln_api::Event;
use kiln_api::types::{CreateEnv, Env, List, ScaleEnv};
use kiln_core::{AppId, EnvId, EnvName, Hostname, InstanceId, OrgId, ProcessName, ReleaseId};
use rand::RngCore;
use sqlx::Row;

use super::error::ApiError;
use super::extract::JsonBody;
use super::{AppState, scope};
use crate::auth::Caller;
use crate::store::{ExpectedVersion, NewEvent, Store, StreamEvent, streams};

/// Most instances of one process type a scale request may ask for.
pub const MAX_INSTANCES_PER_PROCESS: u32 = 100;

const ENV_COLUMNS: &str =
    "id, org_id, app_id, name, hostname, ipv6_address, current_release_id, scale, created_at";

/// `GET .../envs`.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app)): Path<(String, String)>,
) -> Result<Json<List<Env>>, ApiError> {
    let app = scope::app(state.store.pool(), &caller, &org, &app).await?;
    let rows = sqlx::query(&format!(
        "SELECT {ENV_COLUMNS} FROM envs WHERE app_id = $1 ORDER BY name"
    ))
    .bind(app.id.as_uuid())
    .fetch_all(state.store.pool())
    .await
    .map_err(ApiError::database("list environments"))?;
    let items = rows.iter().map(env_from_row).collect::<Result<_, _>>()?;
    Ok(Json(List { items }))
}

/// `POST .../envs`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app)): Path<(String, String)>,
    JsonBody(request): JsonBody<CreateEnv>,
) -> Result<(StatusCode, Json<Env>), ApiError> {
    let app = scope::app(state.store.pool(), &caller, &org, &app).await?;
    // One label per name, ENV.APP.ORG.<apps domain>: names are DNS labels without dots and
    // unique within their parent, so two environments can never get the same hostname, which
    // joining the names with `-` (itself allowed in names) did not guarantee.
    let hostname = format!(
        "{}.{}.{}.{}",
        request.name, app.name, app.org.name, state.settings.apps_domain
    );
    let hostname = Hostname::new(hostname.clone()).map_err(|error| {
        ApiError::invalid(
            "name",
            format!(
                "the platform hostname {hostname} is invalid ({error}); choose shorter app, environment or org names"
            ),
        )
    })?;

    let id = EnvId::new();
    let ipv6_address = dedicated_address(state.settings.ula_prefix);
    let event = Event::EnvCreated {
        env_id: id,
        app_id: app.id,
        org_id: app.org.id,
        name: request.name,
        hostname,
        ipv6_address,
    };
    state
        .store
        .append(
            &streams::env(id),
            ExpectedVersion::NoStream,
            vec![NewEvent::org(app.org.id, event)],
            &caller.actor(),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(load(state.store.pool(), id).await?),
    ))
}

/// `GET .../envs/{env}`.
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
) -> Result<Json<Env>, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    Ok(Json(load(state.store.pool(), env.id).await?))
}

/// `DELETE .../envs/{env}`: stops every instance and deletes the environment.
pub async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    let org_id = env.org_id();
    let actor = caller.actor();

    let mut tx = state.store.begin().await?;
    let instances =
        sqlx::query("SELECT id, host_id FROM instances WHERE env_id = $1 AND desired = 'running'")
            .bind(env.id.as_uuid())
            .fetch_all(&mut *tx)
            .await
            .map_err(ApiError::database("list instances to stop"))?;
    // One append, last: instance streams that an agent's report batch locks must not be
    // taken one by one while this transaction already holds the append lock.
    let mut events = Vec::with_capacity(instances.len() + 1);
    for row in &instances {
        let instance_id = InstanceId::from_uuid(row.get("id"));
        let event = Event::InstanceStopRequested {
            instance_id,
            env_id: env.id,
            host_id: kiln_core::HostId::from_uuid(row.get("host_id")),
            reason: "env_deleted".to_owned(),
        };
        events.push(StreamEvent {
            stream: streams::instance(instance_id),
            expected: ExpectedVersion::Any,
            event: NewEvent::org(org_id, event),
        });
    }
    let env_events = super::ips::release_all_events(&mut tx, env.id)
        .await?
        .into_iter()
        .chain([Event::EnvDeleted { env_id: env.id }]);
    for event in env_events {
        events.push(StreamEvent {
            stream: streams::env(env.id),
            expected: ExpectedVersion::Any,
            event: NewEvent::org(org_id, event),
        });
    }
    Store::append_each_in(&mut tx, events, &actor).await?;
    sqlx::query("DELETE FROM secret_values WHERE env_id = $1")
        .bind(env.id.as_uuid())
        .execute(&mut *tx)
        .await
        .map_err(ApiError::database("delete secret values"))?;
    tx.commit()
        .await
        .map_err(ApiError::database("commit environment deletion"))?;
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT .../envs/{env}/scale`.
pub async fn scale(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
    JsonBody(request): JsonBody<ScaleEnv>,
) -> Result<Json<Env>, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    if request.counts.is_empty() {
        return Err(ApiError::invalid(
            "counts",
            "counts is empty; name at least one process type",
        ));
    }
    let current = load(state.store.pool(), env.id).await?;
    let Some(release_id) = current.current_release_id else {
        return Err(ApiError::invalid(
            "counts",
            format!(
                "environment {} has no release yet, so it has no process types to scale; deploy a release first",
                env.name
            ),
        ));
    };
    let release = super::releases::by_id(state.store.pool(), release_id)
        .await?
        .ok_or_else(|| ApiError::internal("current release of the environment is missing"))?;
    for process in request.counts.keys() {
        if !release.spec.processes.contains_key(process) {
            let known: Vec<&str> = release
                .spec
                .processes
                .keys()
                .map(ProcessName::as_str)
                .collect();
            return Err(ApiError::invalid(
                &format!("counts.{process}"),
                format!(
                    "process type {process} is not in release v{} of environment {}; its process types are: {}",
                    release.version,
                    env.name,
                    known.join(", ")
                ),
            ));
        }
    }
    for (process, count) in &request.counts {
        if *count > MAX_INSTANCES_PER_PROCESS {
            return Err(ApiError::invalid(
                "counts",
                format!(
                    "count {count} for process {process} is above the maximum of {MAX_INSTANCES_PER_PROCESS}"
                ),
            ));
        }
    }
    let event = Event::EnvScaled {
        env_id: env.id,
        counts: request.counts,
    };
    state
        .store
        .append(
            &streams::env(env.id),
            ExpectedVersion::Any,
            vec![NewEvent::org(env.org_id(), event)],
            &caller.actor(),
        )
        .await?;
    Ok(Json(load(state.store.pool(), env.id).await?))
}

/// Picks a random address in subnet 0 of the cluster's /48, the subnet reserved for the
/// environments' dedicated addresses (hosts get subnets 1 and up).
fn dedicated_address(ula_prefix: Ipv6Addr) -> Ipv6Addr {
    let prefix = u128::from(ula_prefix) & !((1u128 << 80) - 1);
    let mut interface = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut interface);
    let interface = u64::from_be_bytes(interface).max(1);
    Ipv6Addr::from(prefix | u128::from(interface))
}

/// Loads an environment.
pub async fn load(pool: &sqlx::PgPool, id: EnvId) -> Result<Env, ApiError> {
    let row = sqlx::query(&format!("SELECT {ENV_COLUMNS} FROM envs WHERE id = $1"))
        .bind(id.as_uuid())
        .fetch_optional(pool)
        .await
        .map_err(ApiError::database("load environment"))?;
    let row = row.ok_or_else(|| ApiError::not_found("environment", id))?;
    env_from_row(&row)
}

fn env_from_row(row: &sqlx::postgres::PgRow) -> Result<Env, ApiError> {
    let corrupt = |what: &str| ApiError::internal(what);
    let scale: serde_json::Value = row.get("scale");
    let scale: BTreeMap<ProcessName, u32> =
        serde_json::from_value(scale).map_err(|_| corrupt("stored scale is invalid"))?;
    let address: String = row.get("ipv6_address");
    Ok(Env {
        id: EnvId::from_uuid(row.get("id")),
        org_id: OrgId::from_uuid(row.get("org_id")),
        app_id: AppId::from_uuid(row.get("app_id")),
        name: EnvName::new(row.get::<String, _>("name"))
            .map_err(|_| corrupt("stored environment name is invalid"))?,
        hostname: Hostname::new(row.get::<String, _>("hostname"))
            .map_err(|_| corrupt("stored hostname is invalid"))?,
        ipv6_address: address
            .parse()
            .map_err(|_| corrupt("stored address is invalid"))?,
        current_release_id: row
            .get::<Option<uuid::Uuid>, _>("current_release_id")
            .map(ReleaseId::from_uuid),
        scale,
        created_at: row.get("created_at"),
    })
}
