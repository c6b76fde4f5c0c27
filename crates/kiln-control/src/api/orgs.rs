//! Orgs: created by operators; an org token sees only its own org.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kiln_api::types::{CreateOrg, List, Org, TokenKind};
use kiln_api::{ErrorCode, Event};
use kiln_core::{OrgId, OrgName};
use sqlx::Row;

use super::AppState;
use super::error::ApiError;
use super::extract::{JsonBody, name};
use super::scope;
use crate::auth::Caller;
use crate::store::{ExpectedVersion, NewEvent, streams};

/// `GET /v1/orgs`.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<List<Org>>, ApiError> {
    let org_filter = match caller.token.kind {
        TokenKind::Operator => None,
        TokenKind::Org => caller.token.org_id,
        _ => {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "this endpoint needs an operator or org token",
            ));
        }
    };
    let rows = sqlx::query(
        "SELECT id, name, created_at FROM orgs WHERE ($1::uuid IS NULL OR id = $1) ORDER BY name",
    )
    .bind(org_filter.map(|id| id.as_uuid()))
    .fetch_all(state.store.pool())
    .await
    .map_err(ApiError::database("list orgs"))?;
    let items = rows.iter().map(org_from_row).collect::<Result<_, _>>()?;
    Ok(Json(List { items }))
}

/// `POST /v1/orgs`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<CreateOrg>,
) -> Result<(StatusCode, Json<Org>), ApiError> {
    scope::operator(&caller)?;
    let org = create_org(&state, &request.name, &caller.actor()).await?;
    Ok((StatusCode::CREATED, Json(org)))
}

/// Creates an org (also used by bootstrap).
pub async fn create_org(
    state_or_store: &impl AsStore,
    name: &OrgName,
    actor: &str,
) -> Result<Org, ApiError> {
    let id = OrgId::new();
    let event = Event::OrgCreated {
        org_id: id,
        name: name.clone(),
    };
    let envelopes = state_or_store
        .as_store()
        .append(
            &streams::org(id),
            ExpectedVersion::NoStream,
            vec![NewEvent::org(id, event)],
            actor,
        )
        .await?;
    let created_at = envelopes
        .first()
        .map(|e| e.time)
        .unwrap_or_else(crate::store::now);
    Ok(Org {
        id,
        name: name.clone(),
        created_at,
    })
}

/// Anything that contains the store.
pub trait AsStore {
    /// Returns the store.
    fn as_store(&self) -> &crate::store::Store;
}

impl AsStore for AppState {
    fn as_store(&self) -> &crate::store::Store {
        &self.store
    }
}

impl AsStore for crate::store::Store {
    fn as_store(&self) -> &crate::store::Store {
        self
    }
}

/// `GET /v1/orgs/{org}`.
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
) -> Result<Json<Org>, ApiError> {
    let org_name = name("org", &org, OrgName::new)?;
    match caller.token.kind {
        TokenKind::Operator => {}
        _ => {
            scope::org(&caller, &org)?;
        }
    }
    let row = sqlx::query("SELECT id, name, created_at FROM orgs WHERE name = $1")
        .bind(org_name.as_str())
        .fetch_optional(state.store.pool())
        .await
        .map_err(ApiError::database("show org"))?;
    let row = row.ok_or_else(|| ApiError::not_found("org", &org_name))?;
    Ok(Json(org_from_row(&row)?))
}

fn org_from_row(row: &sqlx::postgres::PgRow) -> Result<Org, ApiError> {
    Ok(Org {
        id: OrgId::from_uuid(row.get("id")),
        name: OrgName::new(row.get::<String, _>("name"))
            .map_err(|_| ApiError::internal("stored org name is invalid"))?,
        created_at: row.get("created_at"),
    })
}
