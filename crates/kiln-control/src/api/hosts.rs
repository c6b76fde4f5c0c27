//! Hosts, for operators: create (with the host's token), list, show, cordon, uncordon,
//! drain.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kiln_api::types::{CreateHost, CreatedHost, Host, HostCapacity, HostState, List, TokenKind};
use kiln_api::{ErrorCode, Event};
use kiln_core::HostId;
use sqlx::Row;

use super::error::ApiError;
use super::extract::JsonBody;
use super::{AppState, scope};
use crate::auth::Caller;
use crate::store::{ExpectedVersion, NewEvent, Store, streams};

const HOST_COLUMNS: &str = "h.id, h.name, h.state, h.vcpus, h.memory_mib, h.driver, h.overlay_public_key, \
                            h.overlay_endpoint, h.ipv6_prefix, h.created_at, l.expires_at";

/// `GET /v1/hosts`.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<List<Host>>, ApiError> {
    scope::operator(&caller)?;
    let rows = sqlx::query(&format!(
        "SELECT {HOST_COLUMNS} FROM hosts h LEFT JOIN host_leases l ON l.host_id = h.id ORDER BY h.name"
    ))
    .fetch_all(state.store.pool())
    .await
    .map_err(ApiError::database("list hosts"))?;
    let items = rows.iter().map(host_from_row).collect::<Result<_, _>>()?;
    Ok(Json(List { items }))
}

/// `POST /v1/hosts`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<CreateHost>,
) -> Result<(StatusCode, Json<CreatedHost>), ApiError> {
    scope::operator(&caller)?;
    kiln_core::names::validate_label("host", &request.name)
        .map_err(|error| ApiError::invalid("name", error.to_string()))?;

    let id = HostId::new();
    let stream = streams::host(id);
    let mut tx = state.store.begin().await?;
    let event = Event::HostCreated {
        host_id: id,
        name: request.name.clone(),
    };
    Store::append_in(
        &mut tx,
        &stream,
        ExpectedVersion::NoStream,
        vec![NewEvent::cluster(event)],
        &caller.actor(),
    )
    .await?;
    let token = super::tokens::issue(
        &mut tx,
        &stream,
        TokenKind::Host,
        None,
        Some(id),
        &request.name,
        None,
        &caller.actor(),
    )
    .await?;
    tx.commit()
        .await
        .map_err(ApiError::database("commit host"))?;

    let host = load(state.store.pool(), id).await?;
    Ok((StatusCode::CREATED, Json(CreatedHost { host, token })))
}

/// `GET /v1/hosts/{host}`.
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(host): Path<String>,
) -> Result<Json<Host>, ApiError> {
    scope::operator(&caller)?;
    let id = by_name(state.store.pool(), &host).await?;
    Ok(Json(load(state.store.pool(), id).await?))
}

/// `POST /v1/hosts/{host}/cordon`.
pub async fn cordon(
    state: State<AppState>,
    caller: Caller,
    host: Path<String>,
) -> Result<Json<Host>, ApiError> {
    transition(
        state,
        caller,
        host,
        |host_id| Event::HostCordoned { host_id },
        &[HostState::Ready, HostState::Pending],
    )
    .await
}

/// `POST /v1/hosts/{host}/uncordon`.
pub async fn uncordon(
    state: State<AppState>,
    caller: Caller,
    host: Path<String>,
) -> Result<Json<Host>, ApiError> {
    transition(
        state,
        caller,
        host,
        |host_id| Event::HostUncordoned { host_id },
        &[HostState::Cordoned, HostState::Draining],
    )
    .await
}

/// `POST /v1/hosts/{host}/drain`.
pub async fn drain(
    state: State<AppState>,
    caller: Caller,
    host: Path<String>,
) -> Result<Json<Host>, ApiError> {
    transition(
        state,
        caller,
        host,
        |host_id| Event::HostDrainRequested { host_id },
        &[HostState::Ready, HostState::Cordoned, HostState::Pending],
    )
    .await
}

async fn transition(
    State(state): State<AppState>,
    caller: Caller,
    Path(host): Path<String>,
    event: impl Fn(HostId) -> Event,
    allowed_from: &[HostState],
) -> Result<Json<Host>, ApiError> {
    scope::operator(&caller)?;
    let id = by_name(state.store.pool(), &host).await?;
    let stream = streams::host(id);
    let version = state.store.stream_version(&stream).await?;
    let current = load(state.store.pool(), id).await?;

    let event = event(id);
    if !allowed_from.contains(&current.state) {
        // Repeating the same transition is a no-op; anything else is a precondition failure.
        let target = match event {
            Event::HostCordoned { .. } => HostState::Cordoned,
            Event::HostUncordoned { .. } => HostState::Ready,
            _ => HostState::Draining,
        };
        if current.state == target {
            return Ok(Json(current));
        }
        return Err(ApiError::new(
            ErrorCode::FailedPrecondition,
            format!(
                "host {host} is {:?}; this change is not possible from that state",
                current.state
            ),
        ));
    }
    state
        .store
        .append(
            &stream,
            ExpectedVersion::Exact(version),
            vec![NewEvent::cluster(event)],
            &caller.actor(),
        )
        .await?;
    Ok(Json(load(state.store.pool(), id).await?))
}

async fn by_name(pool: &sqlx::PgPool, name: &str) -> Result<HostId, ApiError> {
    let id: Option<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM hosts WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
        .map_err(ApiError::database("look up host"))?;
    id.map(HostId::from_uuid)
        .ok_or_else(|| ApiError::not_found("host", name))
}

/// Loads a host with its lease.
pub async fn load(pool: &sqlx::PgPool, id: HostId) -> Result<Host, ApiError> {
    let row = sqlx::query(&format!("SELECT {HOST_COLUMNS} FROM hosts h LEFT JOIN host_leases l ON l.host_id = h.id WHERE h.id = $1"))
        .bind(id.as_uuid())
        .fetch_optional(pool)
        .await
        .map_err(ApiError::database("load host"))?;
    let row = row.ok_or_else(|| ApiError::not_found("host", id))?;
    host_from_row(&row)
}

/// Decodes a row of `hosts` joined with `host_leases`.
pub fn host_from_row(row: &sqlx::postgres::PgRow) -> Result<Host, ApiError> {
    let corrupt = |what: &str| ApiError::internal(what);
    let text = |column: &str| {
        row.get::<Option<String>, _>(column)
            .map(serde_json::Value::String)
    };
    let state: HostState = serde_json::from_value(text("state").unwrap_or_default())
        .map_err(|_| corrupt("stored host state is invalid"))?;
    let vcpus: Option<i32> = row.get("vcpus");
    let memory: Option<i64> = row.get("memory_mib");
    let capacity = match (vcpus, memory) {
        (Some(vcpus), Some(memory)) => Some(HostCapacity {
            vcpus: vcpus as u32,
            memory_mib: memory as u64,
        }),
        _ => None,
    };
    let driver = match text("driver") {
        Some(driver) => {
            Some(serde_json::from_value(driver).map_err(|_| corrupt("stored driver is invalid"))?)
        }
        None => None,
    };
    let endpoint = match row.get::<Option<String>, _>("overlay_endpoint") {
        Some(endpoint) => Some(
            endpoint
                .parse()
                .map_err(|_| corrupt("stored endpoint is invalid"))?,
        ),
        None => None,
    };
    Ok(Host {
        id: HostId::from_uuid(row.get("id")),
        name: row.get("name"),
        state,
        capacity,
        driver,
        overlay_public_key: row.get("overlay_public_key"),
        overlay_endpoint: endpoint,
        ipv6_prefix: row.get("ipv6_prefix"),
        lease_expires_at: row.get("expires_at"),
        created_at: row.get("created_at"),
    })
}
