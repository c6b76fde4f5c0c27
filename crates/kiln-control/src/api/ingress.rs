//! The route table for ingresses (ingress token): every route, long-polling for changes.

use axum::Json;
use axum::extract::State;
use kiln_api::types::{RouteTable, WatchQuery};

use super::error::ApiError;
use super::events::wait_duration;
use super::extract::QueryParams;
use super::{AppState, scope};
use crate::auth::Caller;
use crate::store::StoreError;

/// `GET /v1/ingress/routes`.
pub async fn routes(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(query): QueryParams<WatchQuery>,
) -> Result<Json<RouteTable>, ApiError> {
    scope::ingress(&caller)?;
    let wait = wait_duration(query.wait)?;
    let after = query.after.unwrap_or(0);
    if query.after.is_some() {
        // A request for the table after `after` acknowledges the table at `after`.
        crate::ingress_acks::record(state.store.pool(), caller.token.id, after).await?;
    }

    let changed = state
        .notifier
        .wait_for(wait, || {
            let pool = state.store.pool().clone();
            let store = state.store.clone();
            async move {
                let head = store.head().await?;
                if after == 0 || head < after {
                    return Ok(Some(head));
                }
                let relevant: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM events WHERE seq > $1 AND seq <= $2
                                    AND type IN ('RoutesChanged', 'EnvDeleted',
                                                 'Ipv4AddressAllocated', 'Ipv4AddressReleased'))",
                )
                .bind(after as i64)
                .bind(head as i64)
                .fetch_one(&pool)
                .await
                .map_err(StoreError::database("check route changes"))?;
                Ok(relevant.then_some(head))
            }
        })
        .await?;
    let cursor = match changed {
        Some(head) => head,
        None => state.store.head().await?.max(after),
    };

    let routes = super::read::load_routes(state.store.pool(), None).await?;
    let routes = super::ips::add_ipv4_routes(state.store.pool(), routes).await?;
    Ok(Json(RouteTable { cursor, routes }))
}
