//! Apps of an org.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kiln_api::types::{App, CreateApp, List};
use kiln_api::{ErrorCode, Event};
use kiln_core::{AppId, AppName, OrgId};
use sqlx::Row;

use super::error::ApiError;
use super::extract::JsonBody;
use super::{AppState, scope};
use crate::auth::Caller;
use crate::store::{ExpectedVersion, NewEvent, streams};

/// `GET /v1/orgs/{org}/apps`.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
) -> Result<Json<List<App>>, ApiError> {
    let org = scope::org(&caller, &org)?;
    let rows = sqlx::query(
        "SELECT id, org_id, name, created_at FROM apps WHERE org_id = $1 ORDER BY name",
    )
    .bind(org.id.as_uuid())
    .fetch_all(state.store.pool())
    .await
    .map_err(ApiError::database("list apps"))?;
    let items = rows.iter().map(app_from_row).collect::<Result<_, _>>()?;
    Ok(Json(List { items }))
}

/// `POST /v1/orgs/{org}/apps`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    JsonBody(request): JsonBody<CreateApp>,
) -> Result<(StatusCode, Json<App>), ApiError> {
    let org = scope::org(&caller, &org)?;
    let id = AppId::new();
    let event = Event::AppCreated {
        app_id: id,
        org_id: org.id,
        name: request.name.clone(),
    };
    let envelopes = state
        .store
        .append(
            &streams::org(org.id),
            ExpectedVersion::Any,
            vec![NewEvent::org(org.id, event)],
            &caller.actor(),
        )
        .await?;
    let app = App {
        id,
        org_id: org.id,
        name: request.name,
        created_at: envelopes[0].time,
    };
    Ok((StatusCode::CREATED, Json(app)))
}

/// `GET /v1/orgs/{org}/apps/{app}`.
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app)): Path<(String, String)>,
) -> Result<Json<App>, ApiError> {
    let app = scope::app(state.store.pool(), &caller, &org, &app).await?;
    let row = sqlx::query("SELECT id, org_id, name, created_at FROM apps WHERE id = $1")
        .bind(app.id.as_uuid())
        .fetch_one(state.store.pool())
        .await
        .map_err(ApiError::database("show app"))?;
    Ok(Json(app_from_row(&row)?))
}

/// `DELETE /v1/orgs/{org}/apps/{app}`: only an app without environments.
pub async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let app = scope::app(state.store.pool(), &caller, &org, &app).await?;
    let envs: i64 = sqlx::query_scalar("SELECT count(*) FROM envs WHERE app_id = $1")
        .bind(app.id.as_uuid())
        .fetch_one(state.store.pool())
        .await
        .map_err(ApiError::database("count environments"))?;
    if envs > 0 {
        return Err(ApiError::new(
            ErrorCode::FailedPrecondition,
            format!(
                "app {} still has {envs} environment(s); delete them first",
                app.name
            ),
        ));
    }
    let event = Event::AppDeleted { app_id: app.id };
    state
        .store
        .append(
            &streams::org(app.org.id),
            ExpectedVersion::Any,
            vec![NewEvent::org(app.org.id, event)],
            &caller.actor(),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn app_from_row(row: &sqlx::postgres::PgRow) -> Result<App, ApiError> {
    Ok(App {
        id: AppId::from_uuid(row.get("id")),
        org_id: OrgId::from_uuid(row.get("org_id")),
        name: AppName::new(row.get::<String, _>("name"))
            .map_err(|_| ApiError::internal("stored app name is invalid"))?,
        created_at: row.get("created_at"),
    })
}
