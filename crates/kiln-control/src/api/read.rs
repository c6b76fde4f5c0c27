//! Read-only views of an environment: instances, routes and addresses.

use axum::Json;
use axum::extract::{Path, State};
use kiln_api::InstanceState;
use kiln_api::types::{Address, AddressKind, DesiredState, Instance, List, Route};
use kiln_core::{EnvId, HostId, InstanceId, ProcessName, ReleaseId};
use sqlx::Row;

use super::error::ApiError;
use super::{AppState, scope};
use crate::auth::Caller;

const INSTANCE_COLUMNS: &str = "id, env_id, release_id, process, host_id, ipv6, ipv4, desired, state, detail, created_at, updated_at";

/// `GET .../instances`.
pub async fn instances(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
) -> Result<Json<List<Instance>>, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    let rows = sqlx::query(&format!(
        "SELECT {INSTANCE_COLUMNS} FROM instances WHERE env_id = $1 ORDER BY process, created_at"
    ))
    .bind(env.id.as_uuid())
    .fetch_all(state.store.pool())
    .await
    .map_err(ApiError::database("list instances"))?;
    let items = rows
        .iter()
        .map(instance_from_row)
        .collect::<Result<_, _>>()?;
    Ok(Json(List { items }))
}

/// `GET .../routes`.
pub async fn routes(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
) -> Result<Json<List<Route>>, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    let items = load_routes(state.store.pool(), Some(env.id)).await?;
    let items = super::ips::add_ipv4_routes(state.store.pool(), items).await?;
    Ok(Json(List { items }))
}

/// `GET .../addresses`.
pub async fn addresses(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
) -> Result<Json<List<Address>>, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    let rows = sqlx::query("SELECT address, env_id, kind, instance_id FROM addresses WHERE env_id = $1 ORDER BY kind, address")
        .bind(env.id.as_uuid())
        .fetch_all(state.store.pool())
        .await
        .map_err(ApiError::database("list addresses"))?;
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        let kind: AddressKind = serde_json::from_value(serde_json::Value::String(row.get("kind")))
            .map_err(|_| ApiError::internal("stored address kind is invalid"))?;
        items.push(Address {
            env_id: EnvId::from_uuid(row.get("env_id")),
            address: row
                .get::<String, _>("address")
                .parse()
                .map_err(|_| ApiError::internal("stored address is invalid"))?,
            kind,
            instance_id: row
                .get::<Option<uuid::Uuid>, _>("instance_id")
                .map(InstanceId::from_uuid),
        });
    }
    Ok(Json(List { items }))
}

/// Loads the routes of one environment, or of all when `env` is `None`.
pub async fn load_routes<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    env: Option<EnvId>,
) -> Result<Vec<Route>, ApiError> {
    let rows = sqlx::query(
        "SELECT env_id, service, matcher, protocol, proxy_protocol, backends FROM routes
         WHERE ($1::uuid IS NULL OR env_id = $1) ORDER BY env_id, position",
    )
    .bind(env.map(|id| id.as_uuid()))
    .fetch_all(executor)
    .await
    .map_err(ApiError::database("list routes"))?;
    let corrupt = |_| ApiError::internal("stored route is invalid");
    rows.iter()
        .map(|row| {
            Ok(Route {
                env_id: EnvId::from_uuid(row.get("env_id")),
                service: row.get("service"),
                matcher: serde_json::from_value(row.get("matcher")).map_err(corrupt)?,
                protocol: serde_json::from_value(serde_json::Value::String(row.get("protocol")))
                    .map_err(corrupt)?,
                proxy_protocol: row.get("proxy_protocol"),
                backends: serde_json::from_value(row.get("backends")).map_err(corrupt)?,
            })
        })
        .collect()
}

/// Decodes a row of `instances`.
pub fn instance_from_row(row: &sqlx::postgres::PgRow) -> Result<Instance, ApiError> {
    let corrupt = |what: &str| ApiError::internal(what);
    let text = |column: &str| serde_json::Value::String(row.get::<String, _>(column));
    let desired: DesiredState = serde_json::from_value(text("desired"))
        .map_err(|_| corrupt("stored desired state is invalid"))?;
    let state: InstanceState = serde_json::from_value(text("state"))
        .map_err(|_| corrupt("stored instance state is invalid"))?;
    Ok(Instance {
        id: InstanceId::from_uuid(row.get("id")),
        env_id: EnvId::from_uuid(row.get("env_id")),
        release_id: ReleaseId::from_uuid(row.get("release_id")),
        process: ProcessName::new(row.get::<String, _>("process"))
            .map_err(|_| corrupt("stored process name is invalid"))?,
        host_id: HostId::from_uuid(row.get("host_id")),
        ipv6: row
            .get::<String, _>("ipv6")
            .parse()
            .map_err(|_| corrupt("stored address is invalid"))?,
        ipv4: row
            .get::<String, _>("ipv4")
            .parse()
            .map_err(|_| corrupt("stored address is invalid"))?,
        desired,
        state,
        detail: row.get("detail"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
    })
}
