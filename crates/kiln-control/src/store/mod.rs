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

/// One event of a batch that spans streams, with the stream it goes to and the version that
/// stream must be at once the batch's earlier events are counted.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    /// The stream.
    pub stream: String,
    /// The version `stream` must be at.
    pub expected: ExpectedVersion,
    /// The event.
    pub event: NewEvent,
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
    /// A fenced append came from a leader whose term is no longer the current one.
    #[error("leadership term {held} is stale; the current term is {current}")]
    StaleFence {
        /// The term the writer holds.
        held: i64,
        /// The term in the database.
        current: i64,
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
    /// The append function returned a different number of rows than events were appended.
    #[error("appending {expected} events to stream {stream} returned {returned} rows")]
    AppendResult {
        /// The stream.
        stream: String,
        /// Events appended.
        expected: usize,
        /// Rows returned.
        returned: usize,
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

    /// Appends `events` to `stream` in one autocommit statement, updating the projections.
    ///
    /// The statement calls the server function `kiln_append`, which checks and bumps the
    /// stream version, applies the projections, takes the append lock and inserts the events,
    /// so an append costs one round trip and holds the lock only inside the server.
    pub async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        actor: &str,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(StoreError::database("acquire connection"))?;
        append_on(&mut conn, stream, expected, events, actor).await
    }

    /// Appends `events` to `stream` inside the caller's transaction. The caller must commit
    /// it; the advisory lock taken here is held until then, so keep the rest of the
    /// transaction short. Appending to another existing stream afterwards in the same
    /// transaction can deadlock with an agent's report batch, which locks its streams before
    /// it waits for the append lock: append to several streams with [`Store::append_each_in`].
    pub async fn append_in(
        tx: &mut Transaction<'static, Postgres>,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        actor: &str,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        append_on(tx, stream, expected, events, actor).await
    }

    /// Appends `events` to `stream` in one autocommit statement if `term` is still the current
    /// term of `leadership`, as a leader's fenced write. Fails with
    /// [`StoreError::StaleFence`] and writes nothing otherwise.
    pub async fn append_fenced(
        &self,
        leadership: &str,
        term: i64,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        actor: &str,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(StoreError::database("acquire connection"))?;
        append_with(
            &mut conn,
            Some((leadership, term)),
            stream,
            expected,
            events,
            actor,
        )
        .await
    }

    /// Appends events of any number of streams in one autocommit statement: all of them or,
    /// when one stream is not at its expected version, none.
    pub async fn append_each(
        &self,
        events: Vec<StreamEvent>,
        actor: &str,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(StoreError::database("acquire connection"))?;
        append_each_on(&mut conn, events, actor).await
    }

    /// Appends events of any number of streams inside the caller's transaction, as its last
    /// append: the advisory lock taken here is held until commit, and another append after it
    /// in the same transaction could wait on a stream that a transaction waiting for this lock
    /// holds.
    pub async fn append_each_in(
        tx: &mut Transaction<'static, Postgres>,
        events: Vec<StreamEvent>,
        actor: &str,
    ) -> Result<Vec<EventEnvelope>, StoreError> {
        append_each_on(tx, events, actor).await
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

/// Runs `kiln_append` on `conn` (a pooled connection in autocommit mode, or an open
/// transaction) and returns the envelopes with the `seq` values it assigned.
///
/// The function checks the expected version, applies each event to the projections through
/// `kiln_project`, then takes the append lock before it draws any `seq`. The lock is held
/// until the surrounding transaction commits, so `seq` order is commit order.
async fn append_on(
    conn: &mut sqlx::PgConnection,
    stream: &str,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
    actor: &str,
) -> Result<Vec<EventEnvelope>, StoreError> {
    append_with(conn, None, stream, expected, events, actor).await
}

/// SQLSTATE that `kiln_append_fenced` raises for a stale term.
const STALE_FENCE_CODE: &str = "KL004";

/// Runs `kiln_append`, or `kiln_append_fenced` when `fence` names a leadership and its term.
async fn append_with(
    conn: &mut sqlx::PgConnection,
    fence: Option<(&str, i64)>,
    stream: &str,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
    actor: &str,
) -> Result<Vec<EventEnvelope>, StoreError> {
    let (expected_kind, expected_version) = expected_args(expected);
    let mut columns = EventColumns::with_capacity(events.len());
    for new in &events {
        columns.push(new)?;
    }

    let time = now();
    let query = match fence {
        Some((leadership, term)) => sqlx::query_as(
            "SELECT seq, stream_version
             FROM kiln_append_fenced($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(leadership)
        .bind(term),
        None => sqlx::query_as(
            "SELECT seq, stream_version FROM kiln_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        ),
    };
    let query = query
        .bind(stream)
        .bind(expected_kind)
        .bind(expected_version)
        .bind(actor)
        .bind(time);
    let result: Result<Vec<(Option<i64>, i64)>, sqlx::Error> =
        columns.bind(query).fetch_all(&mut *conn).await;
    let rows = match result {
        Ok(rows) => rows,
        Err(error) => {
            if let (Some((_, held)), Some(current)) = (fence, stale_fence_of(&error)) {
                return Err(StoreError::StaleFence { held, current });
            }
            return Err(StoreError::database("append events")(error));
        }
    };

    if let [(None, actual)] = rows.as_slice() {
        return Err(StoreError::Conflict {
            stream: stream.to_owned(),
            expected,
            actual: *actual as u64,
        });
    }
    if rows.len() != events.len() {
        return Err(StoreError::AppendResult {
            stream: stream.to_owned(),
            expected: events.len(),
            returned: rows.len(),
        });
    }

    let envelopes = events
        .into_iter()
        .zip(rows)
        .map(|(new, (seq, stream_version))| EventEnvelope {
            seq: seq.unwrap_or(0) as u64,
            stream: stream.to_owned(),
            stream_version: stream_version as u64,
            org_id: new.org_id,
            actor: actor.to_owned(),
            time,
            event: new.event,
        })
        .collect();
    Ok(envelopes)
}

/// SQLSTATE that `kiln_append_each` raises when a stream is not at its expected version.
const STREAM_CONFLICT_CODE: &str = "KL003";

/// The kind and version `ExpectedVersion` is passed to the append functions as.
fn expected_args(expected: ExpectedVersion) -> (&'static str, i64) {
    match expected {
        ExpectedVersion::Any => ("any", 0),
        ExpectedVersion::NoStream | ExpectedVersion::Exact(0) => ("no_stream", 0),
        ExpectedVersion::Exact(version) => ("exact", version as i64),
    }
}

/// Runs `kiln_append_each` on `conn` and returns the envelopes in the order of `events`.
async fn append_each_on(
    conn: &mut sqlx::PgConnection,
    events: Vec<StreamEvent>,
    actor: &str,
) -> Result<Vec<EventEnvelope>, StoreError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut streams = Vec::with_capacity(events.len());
    let mut kinds = Vec::with_capacity(events.len());
    let mut versions = Vec::with_capacity(events.len());
    let mut columns = EventColumns::with_capacity(events.len());
    for item in &events {
        let (kind, version) = expected_args(item.expected);
        streams.push(item.stream.as_str());
        kinds.push(kind);
        versions.push(version);
        columns.push(&item.event)?;
    }

    let time = now();
    let query = sqlx::query_as(
        "SELECT seq, stream_version
         FROM kiln_append_each($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&streams)
    .bind(&kinds)
    .bind(&versions)
    .bind(actor)
    .bind(time);
    let result: Result<Vec<(i64, i64)>, sqlx::Error> =
        columns.bind(query).fetch_all(&mut *conn).await;
    let rows = match result {
        Ok(rows) => rows,
        Err(error) => {
            return Err(conflict_of(&error, &events).unwrap_or_else(|| {
                StoreError::database("append events of several streams")(error)
            }));
        }
    };
    if rows.len() != events.len() {
        return Err(StoreError::AppendResult {
            stream: streams.join(","),
            expected: events.len(),
            returned: rows.len(),
        });
    }

    let envelopes = events
        .into_iter()
        .zip(rows)
        .map(|(item, (seq, stream_version))| EventEnvelope {
            seq: seq as u64,
            stream: item.stream,
            stream_version: stream_version as u64,
            org_id: item.event.org_id,
            actor: actor.to_owned(),
            time,
            event: item.event.event,
        })
        .collect();
    Ok(envelopes)
}

/// The per-event arrays the append functions take, in the order of the events.
struct EventColumns {
    org_ids: Vec<Option<uuid::Uuid>>,
    env_ids: Vec<Option<uuid::Uuid>>,
    host_ids: Vec<Option<uuid::Uuid>>,
    types: Vec<&'static str>,
    payloads: Vec<serde_json::Value>,
}

impl EventColumns {
    fn with_capacity(capacity: usize) -> Self {
        Self {
            org_ids: Vec::with_capacity(capacity),
            env_ids: Vec::with_capacity(capacity),
            host_ids: Vec::with_capacity(capacity),
            types: Vec::with_capacity(capacity),
            payloads: Vec::with_capacity(capacity),
        }
    }

    /// Adds the columns of one event, encoding its payload.
    fn push(&mut self, new: &NewEvent) -> Result<(), StoreError> {
        self.org_ids.push(new.org_id.map(|id| id.as_uuid()));
        self.env_ids.push(new.event.env_id().map(|id| id.as_uuid()));
        self.host_ids
            .push(new.event.host_id().map(|id| id.as_uuid()));
        self.types.push(new.event.type_name());
        let payload = serde_json::to_value(&new.event)
            .map_err(|source| StoreError::Codec { seq: 0, source })?;
        self.payloads.push(payload);
        Ok(())
    }

    /// Binds the five arrays, which the append functions take as their last parameters.
    fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments> {
        query
            .bind(&self.org_ids)
            .bind(&self.env_ids)
            .bind(&self.host_ids)
            .bind(&self.types)
            .bind(&self.payloads)
    }
}

/// Returns the server's error when `error` is the one an append function raises with `code`.
fn raised<'a>(error: &'a sqlx::Error, code: &str) -> Option<&'a sqlx::postgres::PgDatabaseError> {
    let sqlx::Error::Database(db) = error else {
        return None;
    };
    let db = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()?;
    (db.code() == code).then_some(db)
}

/// Reads the current term from the error `kiln_append_fenced` raises for a stale one.
fn stale_fence_of(error: &sqlx::Error) -> Option<i64> {
    raised(error, STALE_FENCE_CODE)?.detail()?.parse().ok()
}

/// Reads the stream and its version from the conflict `kiln_append_each` raises.
fn conflict_of(error: &sqlx::Error, events: &[StreamEvent]) -> Option<StoreError> {
    let db = raised(error, STREAM_CONFLICT_CODE)?;
    let stream = db.detail()?.to_owned();
    let actual = db.hint()?.parse().ok()?;
    let expected = events
        .iter()
        .find(|item| item.stream == stream)
        .map_or(ExpectedVersion::Any, |item| item.expected);
    Some(StoreError::Conflict {
        stream,
        expected,
        actual,
    })
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
