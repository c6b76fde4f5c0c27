//! The event log as an audit log and change feed: per org (`kiln events`) and, for
//! operators, whole. Both long-poll: with `wait`, a call with nothing new waits until an
//! append's notification or the timeout.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use kiln_api::events::EventQuery;
use kiln_api::{EventPage, MAX_WAIT_SECS};
use kiln_core::EnvId;

use super::error::ApiError;
use super::extract::QueryParams;
use super::{AppState, scope};
use crate::auth::Caller;
use crate::store::EventFilter;

/// Default and maximum page size.
pub const MAX_PAGE: u32 = 1000;

/// `GET /v1/orgs/{org}/events`.
pub async fn org_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    QueryParams(query): QueryParams<EventQuery>,
) -> Result<Json<EventPage>, ApiError> {
    let org_scope = scope::org(&caller, &org)?;
    let mut filter = EventFilter {
        org_id: Some(org_scope.id),
        ..EventFilter::default()
    };
    match (&query.app, &query.env) {
        (None, Some(_)) => {
            return Err(ApiError::invalid(
                "env",
                "filtering by env needs app as well",
            ));
        }
        (Some(app), None) => {
            filter.app_id = Some(
                scope::app(state.store.pool(), &caller, &org, app.as_str())
                    .await?
                    .id,
            );
        }
        (Some(app), Some(env)) => {
            let env: EnvId = scope::env(
                state.store.pool(),
                &caller,
                &org,
                app.as_str(),
                env.as_str(),
            )
            .await?
            .id;
            filter.env_id = Some(env);
        }
        (None, None) => {}
    }
    page(&state, &query, filter).await.map(Json)
}

/// `GET /v1/events` (operator).
pub async fn all_events(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(query): QueryParams<EventQuery>,
) -> Result<Json<EventPage>, ApiError> {
    scope::operator(&caller)?;
    if query.app.is_some() || query.env.is_some() {
        return Err(ApiError::invalid(
            "app",
            "filter by app and env on /v1/orgs/{org}/events",
        ));
    }
    page(&state, &query, EventFilter::default()).await.map(Json)
}

async fn page(
    state: &AppState,
    query: &EventQuery,
    filter: EventFilter,
) -> Result<EventPage, ApiError> {
    let after = query.after.unwrap_or(0);
    let limit = query.limit.unwrap_or(MAX_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::invalid(
            "limit",
            format!("limit {limit} is out of range 1..={MAX_PAGE}"),
        ));
    }
    let wait = wait_duration(query.wait)?;
    let head = state.store.head().await?;
    if after > head {
        return Err(cursor_past_head(after, head));
    }

    let mut cursor = after;
    let found = state
        .notifier
        .wait_for(wait, || {
            let store = state.store.clone();
            async move {
                let (events, next) = store.read_page(after, limit, &filter).await?;
                if events.is_empty() {
                    return Ok(None);
                }
                Ok(Some(EventPage {
                    events,
                    cursor: next,
                }))
            }
        })
        .await?;
    if let Some(page) = found {
        return Ok(page);
    }

    // Nothing matched before the timeout. The cursor may still advance past events this
    // filter skips; a final read returns whatever arrived since, never skipping it.
    let (events, next) = state.store.read_page(after, limit, &filter).await?;
    cursor = cursor.max(next);
    Ok(EventPage { events, cursor })
}

/// Returns the error for an `after` cursor above the head of its log. Such a cursor was never
/// returned by the server, and accepting it would hide every entry up to it.
pub fn cursor_past_head(after: u64, head: u64) -> ApiError {
    ApiError::invalid(
        "after",
        format!(
            "after {after} is past the current head {head}; pass a cursor returned by an earlier page"
        ),
    )
    .with_details(serde_json::json!({ "field": "after", "head": head }))
}

/// Validates a `wait` query value in seconds.
pub fn wait_duration(wait: Option<u64>) -> Result<Duration, ApiError> {
    let wait = wait.unwrap_or(0);
    if wait > MAX_WAIT_SECS {
        return Err(ApiError::invalid(
            "wait",
            format!("wait {wait} is above the maximum of {MAX_WAIT_SECS} seconds"),
        ));
    }
    Ok(Duration::from_secs(wait))
}
