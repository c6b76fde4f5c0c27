//! Recent logs of an environment (`kiln logs`), from the bounded window agents fill.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use kiln_api::types::{LogEntry, LogPage, LogQuery, LogStream};
use kiln_core::{InstanceId, ProcessName};
use sqlx::Row;

use super::error::ApiError;
use super::events::{cursor_past_head, wait_duration};
use super::extract::QueryParams;
use super::{AppState, scope};
use crate::auth::Caller;

/// Default number of lines returned.
pub const DEFAULT_LOG_LIMIT: u32 = 500;
/// Maximum number of lines returned.
pub const MAX_LOG_LIMIT: u32 = 5000;

/// Interval between reads while following logs (log lines do not go through the event
/// log, so no notification wakes the wait).
const LOG_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// `GET .../logs`.
pub async fn query(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
    QueryParams(query): QueryParams<LogQuery>,
) -> Result<Json<LogPage>, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    let limit = query.limit.unwrap_or(DEFAULT_LOG_LIMIT);
    if limit == 0 || limit > MAX_LOG_LIMIT {
        return Err(ApiError::invalid(
            "limit",
            format!("limit {limit} is out of range 1..={MAX_LOG_LIMIT}"),
        ));
    }
    let wait = wait_duration(query.wait)?;
    if let Some(after) = query.after {
        // NOTE: the head is the newest stored line, so once pruning removes every line, a
        // cursor returned earlier is rejected too; the client restarts without `after`.
        let head: i64 = sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM log_lines")
            .fetch_one(state.store.pool())
            .await
            .map_err(ApiError::database("read log head"))?;
        let head = head as u64;
        if after > head {
            return Err(cursor_past_head(after, head));
        }
    }
    let deadline = tokio::time::Instant::now() + wait;

    loop {
        let page = read(state.store.pool(), env.id, &query, limit).await?;
        if !page.entries.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(Json(page));
        }
        tokio::time::sleep(LOG_POLL_INTERVAL.min(deadline - tokio::time::Instant::now())).await;
    }
}

async fn read(
    pool: &sqlx::PgPool,
    env_id: kiln_core::EnvId,
    query: &LogQuery,
    limit: u32,
) -> Result<LogPage, ApiError> {
    // Without `after`, return the newest `limit` lines; with it, the oldest lines after it.
    let rows = sqlx::query(
        "SELECT * FROM (
             SELECT id, instance_id, process, stream, time, line FROM log_lines
             WHERE env_id = $1
               AND ($2::text IS NULL OR process = $2)
               AND ($3::uuid IS NULL OR instance_id = $3)
               AND ($4::timestamptz IS NULL OR time >= $4)
               AND id > $5
             ORDER BY CASE WHEN $7 THEN id END ASC, id DESC
             LIMIT $6
         ) newest ORDER BY id",
    )
    .bind(env_id.as_uuid())
    .bind(query.process.as_ref().map(ProcessName::as_str))
    .bind(query.instance.map(|id| id.as_uuid()))
    .bind(query.since)
    .bind(query.after.unwrap_or(0) as i64)
    .bind(i64::from(limit))
    .bind(query.after.is_some())
    .fetch_all(pool)
    .await
    .map_err(ApiError::database("read logs"))?;

    let mut entries = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: i64 = row.get("id");
        let stream: LogStream =
            serde_json::from_value(serde_json::Value::String(row.get("stream")))
                .map_err(|_| ApiError::internal("stored log stream is invalid"))?;
        entries.push(LogEntry {
            id: id as u64,
            instance_id: InstanceId::from_uuid(row.get("instance_id")),
            process: ProcessName::new(row.get::<String, _>("process"))
                .map_err(|_| ApiError::internal("stored process name is invalid"))?,
            stream,
            time: row.get("time"),
            line: row.get("line"),
        });
    }
    let cursor = entries
        .last()
        .map(|entry| entry.id)
        .unwrap_or(query.after.unwrap_or(0));
    Ok(LogPage { entries, cursor })
}
