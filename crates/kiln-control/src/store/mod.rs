//! The event store: an append-only log in PostgreSQL with projections updated in the same
//! transaction.
//!
//! [`Store::append`] is the only way state changes. It checks the stream's expected version
//! (optimistic concurrency), applies each event to the projection tables, then inserts the
//! events and commits. The global `seq` is drawn only after a transaction-level advisory lock
//! is taken, and that lock is held until commit, so events become visible in `seq` order: a
//! reader that has seen `seq = n` has seen every event below `n` that will ever exist. That is
//! what lets watchers keep a plain cursor (see [`watch`]).

pub mod projections;
pub mod rebuild;
pub mod streams;
pub mod watch;

use kiln_api::{Event, EventEnvelope};
use kiln_core::{EnvId, HostId, OrgId};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};
use time::OffsetDateTime;

/// Key of the transaction-level advisory lock that serializes drawing `seq` and committing.
pub const APPEND_LOCK_KEY: i64 = 0x6b69_6c6e_0001;

/// Name of the `NOTIFY` channel signalled by every append.
pub const NOTIFY_CHANNEL: &str = "kiln_events";

/// The migrations of the control plane's schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The stream version an append expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the current version is.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must be at exactly this version.
    Exact(u64),
}

/// One event to append, with the org it belongs to (for per-org reads and authorization).
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The org, or `None` for cluster events.
    pub org_id: Option<OrgId>,
    /// The event.
    pub event: Event,
}

impl NewEvent {
    /// Creates an event of `org_id`.
    pub fn org(org_id: OrgId, event: Event) -> Self {
        Self {
            org_id: Some(org_id),
            event,
        }
    }

    /// Creates a cluster event (hosts, operator and ingress tokens).
    pub fn cluster(event: Event) -> Self {
        Self {
            org_id: None,
            event,
        }
    }
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stream is not at the expected version.
    #[error("stream {stream} is at version {actual}, expected {expected:?}; re-read and retry")]
    Conflict {
        /// The stream.
        stream: String,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's version.
        actual: u64,
    },
    /// A projection's unique constraint rejected the change (a duplicate name, for example).
    #[error("unique constraint {constraint} rejected the change")]
    Duplicate {
        /// Name of the violated constraint.
        constraint: String,
    },
    /// An event could not be encoded or decoded.
    #[error("failed to encode or decode event at seq {seq}")]
    Codec {
        /// The event's `seq` (0 before it has one).
        seq: u64,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// A database operation failed.
    #[error("database operation {operation} failed")]
    Database {
        /// What the store was doing.
        operation: &'static str,
        /// Cause.
        #[source]
        source: sqlx::Error,
    },
}

impl StoreError {
    /// Wraps a database error, recognizing unique violations.
    pub fn database(operation: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |source| {
            if let sqlx::Error::Database(db) = &source
                && db.code().as_deref() == Some("23505")
            {
                return StoreError::Duplicate {
                    constraint: db.constraint().unwrap_or("unknown").to_owned(),
                };
            }
            StoreError::Database { operation, source }
        }
    }
}

/// The event store over one PostgreSQL database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects to `url` with at most `max_connections` connections.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        // No ping before handing out a connection, because it costs a round trip per
        // transaction. A broken connection then fails the caller's first query instead.
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .test_before_acquire(false)
            .connect(url)
            .await
            .map_err(StoreError::database("connect"))?;
        Ok(Self { pool })
    }

    /// Wraps an existing pool.
    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Returns the connection pool, for reads of projections.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }

    /// Begins a transaction for [`Store::append_in`].
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool
            .begin()
            .await
            .map_err(StoreError::database("begin"))
    }

    /// Appends `events` to `stream` in one transaction, updating the projections.
    ///
    /// Unlike [`Store::append_in`], the events are inserted at commit by a deferred trigger
    /// (migration `append_at_commit`), so the append lock is held only inside the server while
    /// the commit runs. Their `seq` values are read back after the commit.
    pub async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        actor: &str,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let count = events.len() as u64;
        let time = now();
        let staged = staged_events(stream, &events, actor, time)?;

        let mut tx = self.begin().await?;
        let first_version = bump_stream(&mut tx, stream, expected, count, Some(&staged)).await? + 1;
        let mut envelopes = envelopes(stream, first_version, events, actor, time);
        for envelope in &envelopes {
            projections::apply(&mut tx, envelope).await?;
        }
        tx.commit().await.map_err(StoreError::database("commit"))?;

        let seqs: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT seq, stream_version FROM events
             WHERE stream = $1 AND stream_version >= $2 AND stream_version < $2 + $3",
        )
        .bind(stream)
        .bind(first_version as i64)
        .bind(count as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::database("read appended seq"))?;
        for (seq, stream_version) in seqs {
            if let Some(envelope) = envelopes
                .iter_mut()
                .find(|envelope| envelope.stream_version as i64 == stream_version)
            {
                envelope.seq = seq as u64;
            }
        }
        Ok(envelopes)
    }

    /// Appends `events` to `stream` inside the caller's transaction. The caller may do more
    /// work (other appends, reads) in it and must commit it; the advisory lock taken here is
    /// held until then, so keep the rest of the transaction short.
    pub async fn append_in(
        tx: &mut Transaction<'static, Postgres>,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        actor: &str,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let count = events.len() as u64;
        let first_version = bump_stream(tx, stream, expected, count, None).await? + 1;
        let mut envelopes = envelopes(stream, first_version, events, actor, now());

        for envelope in &envelopes {
            projections::apply(tx, envelope).await?;
        }

        // The insert takes the append lock before it draws a seq; from there to commit,
        // appends are serialized, so seq order is commit order.
        insert_events(tx, &mut envelopes).await?;
        Ok(envelopes)
    }

    /// Returns the current version of `stream` (0 when it does not exist).
    pub async fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        let version: Option<i64> = sqlx::query_scalar("SELECT version FROM streams WHERE id = $1")
            .bind(stream)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::database("read stream version"))?;
        Ok(version.unwrap_or(0) as u64)
    }

    /// Returns the highest `seq` appended so far (0 for an empty log).
    pub async fn head(&self) -> Result<u64, StoreError> {
        let head: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM events")
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::database("read log head"))?;
        Ok(head.unwrap_or(0) as u64)
    }

    /// Reads up to `limit` events after `after` that pass `filter`, oldest first, and
    /// returns them with the cursor to continue from. When fewer than `limit` events match,
    /// the cursor is the log head read *before* the events, so it never passes an event
    /// that was not visible to the read.
    pub async fn read_page(
        &self,
        after: u64,
        limit: u32,
        filter: &EventFilter,
    ) -> Result<(Vec<EventEnvelope>, u64), StoreError> {
        let head = self.head().await?;
        if head <= after {
            return Ok((Vec::new(), after));
        }
        let events = self.read_after(after, head, limit, filter).await?;
        let cursor = match events.last() {
            Some(last) if events.len() as u32 >= limit => last.seq,
            _ => head,
        };
        Ok((events, cursor))
    }

    /// Reads up to `limit` events with `after < seq <= up_to` that pass `filter`, oldest
    /// first.
    pub async fn read_after(
        &self,
        after: u64,
        up_to: u64,
        limit: u32,
        filter: &EventFilter,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, stream, stream_version, org_id, type, payload, actor, time
             FROM events
             WHERE seq > $1 AND seq <= $8
               AND ($2::uuid IS NULL OR org_id = $2)
               AND ($3::uuid IS NULL OR env_id = $3)
               AND ($4::uuid IS NULL OR host_id = $4)
               AND ($5::uuid IS NULL OR payload->'data'->>'app_id' = $6
                    OR env_id IN (SELECT id FROM envs WHERE app_id = $5))
             ORDER BY seq
             LIMIT $7",
        )
        .bind(after as i64)
        .bind(filter.org_id.map(|id| id.as_uuid()))
        .bind(filter.env_id.map(|id| id.as_uuid()))
        .bind(filter.host_id.map(|id| id.as_uuid()))
        .bind(filter.app_id.map(|id| id.as_uuid()))
        .bind(filter.app_id.map(|id| id.to_string()))
        .bind(i64::from(limit))
        .bind(up_to as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::database("read events"))?;
        rows.iter().map(envelope_from_row).collect()
    }
}

/// Which events a read returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only events of this org.
    pub org_id: Option<OrgId>,
    /// Only events of this app (app events and events of its environments).
    pub app_id: Option<kiln_core::AppId>,
    /// Only events of this environment.
    pub env_id: Option<EnvId>,
    /// Only events concerning this host.
    pub host_id: Option<HostId>,
}

/// Returns the current time truncated to microseconds, the precision PostgreSQL stores, so
/// a projection rebuilt from the log compares equal to the live one.
pub fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1000 * 1000)
        .unwrap_or(now)
}

/// Builds the envelopes of one append, without `seq`.
fn envelopes(
    stream: &str,
    first_version: u64,
    events: Vec<NewEvent>,
    actor: &str,
    time: OffsetDateTime,
) -> Vec<EventEnvelope> {
    events
        .into_iter()
        .enumerate()
        .map(|(offset, new)| EventEnvelope {
            seq: 0,
            stream: stream.to_owned(),
            stream_version: first_version + offset as u64,
            org_id: new.org_id,
            actor: actor.to_owned(),
            time,
            event: new.event,
        })
        .collect()
}

/// Encodes the events of one [`Store::append`] as the JSON the `append_at_commit` trigger
/// reads from `kiln.pending_events`.
fn staged_events(
    stream: &str,
    events: &[NewEvent],
    actor: &str,
    time: OffsetDateTime,
) -> Result<String, StoreError> {
    let codec = |source| StoreError::Codec { seq: 0, source };
    let mut rows = Vec::with_capacity(events.len());
    for new in events {
        rows.push(serde_json::json!({
            "org_id": new.org_id.map(|id| id.as_uuid()),
            "env_id": new.event.env_id().map(|id| id.as_uuid()),
            "host_id": new.event.host_id().map(|id| id.as_uuid()),
            "type": new.event.type_name(),
            "payload": serde_json::to_value(&new.event).map_err(codec)?,
        }));
    }
    let time = time
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|error| StoreError::Codec {
            seq: 0,
            source: serde::ser::Error::custom(error),
        })?;
    serde_json::to_string(&serde_json::json!({
        "stream": stream,
        "actor": actor,
        "time": time,
        "events": rows,
    }))
    .map_err(codec)
}

/// Locks the stream row, checks the expected version and bumps it, returning the version
/// before the bump. With `staged`, the same statement stores the events for the commit-time
/// insert (see [`Store::append`]); without, it clears any staged events.
async fn bump_stream(
    tx: &mut Transaction<'static, Postgres>,
    stream: &str,
    expected: ExpectedVersion,
    count: u64,
    staged: Option<&str>,
) -> Result<u64, StoreError> {
    // No row comes back when the check fails (or, for `NoStream`, when the stream exists).
    // The `staged` CTE is read by the main query, because PostgreSQL skips a SELECT CTE that
    // nothing reads.
    let sql = match expected {
        ExpectedVersion::Any => {
            "WITH staged AS (SELECT set_config('kiln.pending_events', coalesce($4, ''), true))
             INSERT INTO streams (id, version) SELECT $1, $2 FROM staged
             ON CONFLICT (id) DO UPDATE SET version = streams.version + $2
             WHERE $3::bigint = 0
             RETURNING version"
        }
        ExpectedVersion::NoStream | ExpectedVersion::Exact(0) => {
            "WITH staged AS (SELECT set_config('kiln.pending_events', coalesce($4, ''), true))
             INSERT INTO streams (id, version) SELECT $1, $2 FROM staged WHERE $3::bigint = 0
             ON CONFLICT (id) DO NOTHING
             RETURNING version"
        }
        ExpectedVersion::Exact(_) => {
            "WITH staged AS (SELECT set_config('kiln.pending_events', coalesce($4, ''), true))
             UPDATE streams SET version = version + $2 FROM staged
             WHERE id = $1 AND version = $3
             RETURNING version"
        }
    };
    let expected_version = match expected {
        ExpectedVersion::Exact(version) => version as i64,
        _ => 0,
    };
    let bumped: Option<i64> = sqlx::query_scalar(sql)
        .bind(stream)
        .bind(count as i64)
        .bind(expected_version)
        .bind(staged)
        .fetch_optional(&mut **tx)
        .await
        .map_err(StoreError::database("bump stream"))?;
    if let Some(version) = bumped {
        return Ok(version as u64 - count);
    }

    let actual: Option<i64> = sqlx::query_scalar("SELECT version FROM streams WHERE id = $1")
        .bind(stream)
        .fetch_optional(&mut **tx)
        .await
        .map_err(StoreError::database("read stream version"))?;
    Err(StoreError::Conflict {
        stream: stream.to_owned(),
        expected,
        actual: actual.unwrap_or(0) as u64,
    })
}

/// Inserts the events of one append in one statement and sets their `seq`. The statement
/// first takes the append lock and queues the notification: the rows come from a join with the
/// lock's CTE, so the lock is held before any `seq` default is evaluated. Rows are inserted in
/// stream-version order, so their `seq` values ascend in the same order.
async fn insert_events(
    tx: &mut Transaction<'static, Postgres>,
    envelopes: &mut [EventEnvelope],
) -> Result<(), StoreError> {
    let Some(first) = envelopes.first() else {
        return Ok(());
    };
    let (stream, actor, time) = (first.stream.clone(), first.actor.clone(), first.time);

    let mut versions = Vec::with_capacity(envelopes.len());
    let mut org_ids = Vec::with_capacity(envelopes.len());
    let mut env_ids = Vec::with_capacity(envelopes.len());
    let mut host_ids = Vec::with_capacity(envelopes.len());
    let mut types = Vec::with_capacity(envelopes.len());
    let mut payloads = Vec::with_capacity(envelopes.len());
    for envelope in envelopes.iter() {
        versions.push(envelope.stream_version as i64);
        org_ids.push(envelope.org_id.map(|id| id.as_uuid()));
        env_ids.push(envelope.event.env_id().map(|id| id.as_uuid()));
        host_ids.push(envelope.event.host_id().map(|id| id.as_uuid()));
        types.push(envelope.event.type_name());
        payloads.push(
            serde_json::to_value(&envelope.event)
                .map_err(|source| StoreError::Codec { seq: 0, source })?,
        );
    }

    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "WITH appending AS (SELECT pg_advisory_xact_lock($1), pg_notify($2, ''))
         INSERT INTO events
             (stream, stream_version, org_id, env_id, host_id, type, payload, actor, time)
         SELECT $3, e.stream_version, e.org_id, e.env_id, e.host_id, e.type, e.payload, $4, $5
         FROM appending,
              unnest($6::bigint[], $7::uuid[], $8::uuid[], $9::uuid[], $10::text[],
                     $11::jsonb[]) AS e(stream_version, org_id, env_id, host_id, type, payload)
         ORDER BY e.stream_version
         RETURNING seq, stream_version",
    )
    .bind(APPEND_LOCK_KEY)
    .bind(NOTIFY_CHANNEL)
    .bind(&stream)
    .bind(&actor)
    .bind(time)
    .bind(&versions)
    .bind(&org_ids)
    .bind(&env_ids)
    .bind(&host_ids)
    .bind(&types)
    .bind(&payloads)
    .fetch_all(&mut **tx)
    .await
    .map_err(StoreError::database("insert events"))?;

    for (seq, stream_version) in rows {
        if let Some(envelope) = envelopes
            .iter_mut()
            .find(|envelope| envelope.stream_version as i64 == stream_version)
        {
            envelope.seq = seq as u64;
        }
    }
    Ok(())
}

/// Decodes one row of the `events` table.
pub fn envelope_from_row(row: &sqlx::postgres::PgRow) -> Result<EventEnvelope, StoreError> {
    let seq: i64 = row.get("seq");
    let payload: serde_json::Value = row.get("payload");
    let event: Event = serde_json::from_value(payload).map_err(|source| StoreError::Codec {
        seq: seq as u64,
        source,
    })?;
    let org_id: Option<uuid::Uuid> = row.get("org_id");
    let stream_version: i64 = row.get("stream_version");
    Ok(EventEnvelope {
        seq: seq as u64,
        stream: row.get("stream"),
        stream_version: stream_version as u64,
        org_id: org_id.map(OrgId::from_uuid),
        actor: row.get("actor"),
        time: row.get("time"),
        event,
    })
}
