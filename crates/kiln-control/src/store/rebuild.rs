//! Rebuilding the projections by replaying the event log, and diffing the result against the
//! live tables.
//!
//! The replay runs in one `REPEATABLE READ` transaction: it creates empty copies of the
//! projection tables in a scratch schema, points `search_path` at it, applies every event
//! through the same [`super::projections::apply`] as live appends, and compares each table
//! with `EXCEPT ALL` in both directions. Because the log and the live tables are read from
//! one snapshot, the check is exact even while appends continue. A verify rolls the
//! transaction back; a rebuild copies the rebuilt rows over the live tables first, holding
//! the append lock so no append interleaves.

use sqlx::Row;

use super::projections::TABLES;
use super::{APPEND_LOCK_KEY, Store, StoreError, envelope_from_row};

/// Events replayed per read.
const REPLAY_BATCH: i64 = 1000;

/// Rows shown per table and direction in a diff.
const DIFF_SAMPLE_ROWS: i64 = 5;

/// Differences of one table between the live projection and the rebuilt one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDiff {
    /// The table.
    pub table: &'static str,
    /// Rows only in the live table (as JSON), up to a small sample.
    pub only_live: Vec<String>,
    /// Rows only in the rebuilt table (as JSON), up to a small sample.
    pub only_rebuilt: Vec<String>,
    /// Number of rows only in the live table.
    pub only_live_count: i64,
    /// Number of rows only in the rebuilt table.
    pub only_rebuilt_count: i64,
}

/// Result of a rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    /// Events replayed.
    pub events: u64,
    /// Tables that differ; empty when the rebuild matches the live projections.
    pub diffs: Vec<TableDiff>,
    /// Whether the live tables were replaced by the rebuilt ones.
    pub replaced: bool,
}

impl RebuildReport {
    /// Returns true when every table matched.
    pub fn matches(&self) -> bool {
        self.diffs.is_empty()
    }
}

/// What to do with the rebuilt tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildMode {
    /// Only compare; leave the live tables untouched.
    Verify,
    /// Compare, then replace the live tables with the rebuilt ones.
    Replace,
}

impl Store {
    /// Replays the whole log into scratch tables and compares them with the live
    /// projections; with [`RebuildMode::Replace`] the live tables are then overwritten.
    pub async fn rebuild_projections(
        &self,
        mode: RebuildMode,
    ) -> Result<RebuildReport, StoreError> {
        let db = StoreError::database;
        let schema = format!("kiln_rebuild_{}", std::process::id());
        let mut tx = self.begin().await?;

        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut *tx)
            .await
            .map_err(db("set isolation"))?;
        if mode == RebuildMode::Replace {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(APPEND_LOCK_KEY)
                .execute(&mut *tx)
                .await
                .map_err(db("take append lock"))?;
        }

        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut *tx)
            .await
            .map_err(db("create scratch schema"))?;
        for table in TABLES {
            sqlx::query(&format!(
                "CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL)"
            ))
            .execute(&mut *tx)
            .await
            .map_err(db("create scratch table"))?;
        }
        sqlx::query(&format!("SET LOCAL search_path TO {schema}"))
            .execute(&mut *tx)
            .await
            .map_err(db("set search_path"))?;

        let mut events = 0u64;
        let mut after = 0i64;
        loop {
            let rows = sqlx::query(
                "SELECT seq, stream, stream_version, org_id, type, payload, actor, time
                 FROM public.events WHERE seq > $1 ORDER BY seq LIMIT $2",
            )
            .bind(after)
            .bind(REPLAY_BATCH)
            .fetch_all(&mut *tx)
            .await
            .map_err(db("read events"))?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                let envelope = envelope_from_row(row)?;
                after = envelope.seq as i64;
                super::projections::apply(&mut tx, &envelope).await?;
                events += 1;
            }
        }

        let mut diffs = Vec::new();
        for table in TABLES {
            let live = format!("public.{table}");
            let rebuilt = format!("{schema}.{table}");
            let (only_live_count, only_live) = difference(&mut tx, &live, &rebuilt).await?;
            let (only_rebuilt_count, only_rebuilt) = difference(&mut tx, &rebuilt, &live).await?;
            if only_live_count > 0 || only_rebuilt_count > 0 {
                diffs.push(TableDiff {
                    table,
                    only_live,
                    only_rebuilt,
                    only_live_count,
                    only_rebuilt_count,
                });
            }
        }

        if mode == RebuildMode::Verify {
            tx.rollback().await.map_err(db("roll back verify"))?;
            return Ok(RebuildReport {
                events,
                diffs,
                replaced: false,
            });
        }

        for table in TABLES {
            sqlx::query(&format!("DELETE FROM public.{table}"))
                .execute(&mut *tx)
                .await
                .map_err(db("clear live table"))?;
            sqlx::query(&format!(
                "INSERT INTO public.{table} SELECT * FROM {schema}.{table}"
            ))
            .execute(&mut *tx)
            .await
            .map_err(db("fill live table"))?;
        }
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut *tx)
            .await
            .map_err(db("drop scratch schema"))?;
        tx.commit().await.map_err(db("commit rebuild"))?;
        Ok(RebuildReport {
            events,
            diffs,
            replaced: true,
        })
    }
}

async fn difference(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    left: &str,
    right: &str,
) -> Result<(i64, Vec<String>), StoreError> {
    let db = StoreError::database;
    let count: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM (SELECT * FROM {left} EXCEPT ALL SELECT * FROM {right}) d"
    ))
    .fetch_one(&mut **tx)
    .await
    .map_err(db("count differing rows"))?;
    if count == 0 {
        return Ok((0, Vec::new()));
    }
    let rows = sqlx::query(&format!(
        "SELECT row_to_json(d)::text AS row
         FROM (SELECT * FROM {left} EXCEPT ALL SELECT * FROM {right}) d LIMIT $1"
    ))
    .bind(DIFF_SAMPLE_ROWS)
    .fetch_all(&mut **tx)
    .await
    .map_err(db("sample differing rows"))?;
    Ok((count, rows.iter().map(|row| row.get("row")).collect()))
}
