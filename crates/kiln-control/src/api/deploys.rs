//! Deploy intents: create, list, show. Creating a deploy records `DeployRequested` (and, for a
//! new or rollback release, `ReleaseCreated`) and points the environment at the release;
//! carrying the rollout out is the orchestrator's job, which reads these events.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kiln_api::Event;
use kiln_api::types::{CreateDeploy, CreatedDeploy, Deploy, DeployState, DeployTarget, List};
use kiln_core::{DeployId, EnvId, ReleaseId};
use sqlx::Row;

use super::error::ApiError;
use super::extract::JsonBody;
use super::releases::validate_release;
use super::{AppState, retry_on_conflict, scope, targets};
use crate::auth::Caller;
use crate::store::{ExpectedVersion, NewEvent, streams};

const DEPLOY_COLUMNS: &str =
    "id, env_id, release_id, previous_release_id, strategy, state, failure, created_at, updated_at";

/// `GET .../deploys`, newest first.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
) -> Result<Json<List<Deploy>>, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    let rows = sqlx::query(&format!(
        "SELECT {DEPLOY_COLUMNS} FROM deploys WHERE env_id = $1 ORDER BY created_at DESC, id DESC"
    ))
    .bind(env.id.as_uuid())
    .fetch_all(state.store.pool())
    .await
    .map_err(ApiError::database("list deploys"))?;
    let items = rows.iter().map(deploy_from_row).collect::<Result<_, _>>()?;
    Ok(Json(List { items }))
}

/// `GET .../deploys/{deploy}`.
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env, deploy)): Path<(String, String, String, String)>,
) -> Result<Json<Deploy>, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    let deploy_id: DeployId = deploy
        .parse()
        .map_err(|error: kiln_core::ids::IdError| ApiError::invalid("deploy", error.to_string()))?;
    let found = load(state.store.pool(), deploy_id).await?;
    found
        .filter(|deploy| deploy.env_id == env.id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found("deploy", deploy_id))
}

/// `POST .../deploys`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
    JsonBody(request): JsonBody<CreateDeploy>,
) -> Result<(StatusCode, Json<CreatedDeploy>), ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    if let DeployTarget::NewRelease(release) = &request.target {
        validate_release(release)?;
    }

    let stream = streams::env(env.id);
    let created = retry_on_conflict(|| async {
        let stream_version = state.store.stream_version(&stream).await?;
        let previous = current_release(state.store.pool(), env.id).await?;

        let prepared = targets::prepare(
            state.store.pool(),
            env.id,
            &request.target,
            ReleaseId::new(),
        )
        .await?;
        let release = prepared.release;
        let mut events = prepared.events;

        let deploy_id = DeployId::new();
        let strategy = request.strategy.unwrap_or(release.spec.strategy);
        events.push(Event::DeployRequested {
            deploy_id,
            env_id: env.id,
            release_id: release.id,
            previous_release_id: previous,
            strategy,
        });
        events.push(Event::EnvReleaseChanged {
            env_id: env.id,
            release_id: release.id,
        });

        let events = events
            .into_iter()
            .map(|event| NewEvent::org(env.org_id(), event))
            .collect();
        let envelopes = state
            .store
            .append(
                &stream,
                ExpectedVersion::Exact(stream_version),
                events,
                &caller.actor(),
            )
            .await?;
        let cursor = envelopes.first().map(|first| first.seq - 1).unwrap_or(0);
        let deploy = load(state.store.pool(), deploy_id)
            .await?
            .ok_or_else(|| ApiError::internal("deploy missing right after it was appended"))?;
        let release = super::releases::by_id(state.store.pool(), release.id)
            .await?
            .ok_or_else(|| ApiError::internal("release missing right after it was appended"))?;
        Ok(CreatedDeploy {
            deploy,
            release,
            cursor,
        })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// The current release of an environment.
pub async fn current_release(
    pool: &sqlx::PgPool,
    env_id: EnvId,
) -> Result<Option<ReleaseId>, ApiError> {
    let current: Option<Option<uuid::Uuid>> =
        sqlx::query_scalar("SELECT current_release_id FROM envs WHERE id = $1")
            .bind(env_id.as_uuid())
            .fetch_optional(pool)
            .await
            .map_err(ApiError::database("read current release"))?;
    let current = current.ok_or_else(|| ApiError::not_found("environment", env_id))?;
    Ok(current.map(ReleaseId::from_uuid))
}

/// Loads a deploy.
pub async fn load(pool: &sqlx::PgPool, id: DeployId) -> Result<Option<Deploy>, ApiError> {
    let row = sqlx::query(&format!(
        "SELECT {DEPLOY_COLUMNS} FROM deploys WHERE id = $1"
    ))
    .bind(id.as_uuid())
    .fetch_optional(pool)
    .await
    .map_err(ApiError::database("load deploy"))?;
    row.as_ref().map(deploy_from_row).transpose()
}

fn deploy_from_row(row: &sqlx::postgres::PgRow) -> Result<Deploy, ApiError> {
    let text = |column: &str| serde_json::Value::String(row.get::<String, _>(column));
    let state: DeployState = serde_json::from_value(text("state"))
        .map_err(|_| ApiError::internal("stored deploy state is invalid"))?;
    Ok(Deploy {
        id: DeployId::from_uuid(row.get("id")),
        env_id: EnvId::from_uuid(row.get("env_id")),
        release_id: ReleaseId::from_uuid(row.get("release_id")),
        previous_release_id: row
            .get::<Option<uuid::Uuid>, _>("previous_release_id")
            .map(ReleaseId::from_uuid),
        strategy: serde_json::from_value(text("strategy"))
            .map_err(|_| ApiError::internal("stored deploy strategy is invalid"))?,
        state,
        failure: row.get("failure"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
    })
}
