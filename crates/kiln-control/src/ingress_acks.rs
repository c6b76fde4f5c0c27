//! Ingress acknowledgements of route tables, so a deploy stops an instance only after the
//! ingresses have stopped sending it new connections.
//!
//! An ingress follows `GET /v1/ingress/routes` with the cursor of the table it applied last,
//! so every such request acknowledges that table. The handler stores the cursor per ingress
//! token in `ingress_acks`. Before the orchestrator stops instances it waits until every
//! ingress seen within [`LIVE_WINDOW`] has acknowledged the environment's latest
//! `RoutesChanged` event, up to a deadline (`route_drain_deadline_secs`, default
//! [`DEFAULT_DRAIN_DEADLINE`]): an ingress that stopped polling must not hold deploys up.

use std::time::Duration;

use kiln_core::{EnvId, TokenId};

use crate::store::{NOTIFY_CHANNEL, StoreError, streams};

/// Window in which an ingress must have polled to count as live. Each poll waits at most
/// 30 s, so a live ingress polls at least twice in this window.
pub const LIVE_WINDOW: Duration = Duration::from_secs(90);

/// Default longest wait for acknowledgements before instances are stopped anyway.
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Records that the ingress of `token` applied the route table at `cursor`. A cursor that
/// moves forward wakes the orchestrator, which may be waiting for it.
pub async fn record(pool: &sqlx::PgPool, token: TokenId, cursor: u64) -> Result<(), StoreError> {
    sqlx::query(
        "WITH before AS (SELECT cursor FROM ingress_acks WHERE token_id = $1),
              stored AS (
                  INSERT INTO ingress_acks (token_id, cursor, seen_at) VALUES ($1, $2, now())
                  ON CONFLICT (token_id) DO UPDATE
                  SET cursor = GREATEST(ingress_acks.cursor, EXCLUDED.cursor),
                      seen_at = EXCLUDED.seen_at
                  RETURNING cursor)
         SELECT pg_notify($3, '') FROM stored
         WHERE stored.cursor > coalesce((SELECT cursor FROM before), -1)",
    )
    .bind(token.as_uuid())
    .bind(i64::try_from(cursor).unwrap_or(i64::MAX))
    .bind(NOTIFY_CHANNEL)
    .execute(pool)
    .await
    .map_err(StoreError::database("record ingress acknowledgement"))?;
    Ok(())
}

/// Reports whether every live ingress has applied the latest route change of `env` (true
/// when the env never had routes or no ingress is live).
pub async fn routes_applied(pool: &sqlx::PgPool, env: EnvId) -> Result<bool, StoreError> {
    sqlx::query_scalar(
        "SELECT NOT EXISTS (
             SELECT 1 FROM ingress_acks
             WHERE seen_at > now() - make_interval(secs => $2)
               AND cursor < (SELECT seq FROM events
                             WHERE stream = $1 AND type = 'RoutesChanged'
                             ORDER BY stream_version DESC LIMIT 1))",
    )
    .bind(streams::env(env))
    .bind(LIVE_WINDOW.as_secs_f64())
    .fetch_one(pool)
    .await
    .map_err(StoreError::database("read ingress acknowledgements"))
}
