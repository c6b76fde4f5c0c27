//! Leader election among control replicas, with a fencing token.
//!
//! A replica is leader while its dedicated connection holds a session-level PostgreSQL
//! advisory lock. On winning, it increments the term in `leader_terms`; the new term is the
//! fencing token. Singleton work writes only inside a transaction that first checks (and
//! share-locks) the term, so a former leader that lost its connection, and with it the lock,
//! cannot write after a new leader took over: its term no longer matches.

use std::time::Duration;

use sqlx::{Connection, PgConnection, Postgres, Transaction};
use tokio::sync::watch;

use crate::orchestrator::pg::PassScope;
use crate::store::{Store, StoreError};

/// Key of the advisory lock held by the leader.
pub const LEADER_LOCK_KEY: i64 = 0x6b69_6c6e_0010;

/// Name of the control plane's leadership in `leader_terms`.
pub const LEADERSHIP: &str = "control";

/// Leadership state published by the elector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leadership {
    /// Another replica leads, or none yet.
    Follower,
    /// This replica leads with this fencing token.
    Leader {
        /// The term (fencing token).
        term: i64,
    },
}

/// Errors of fenced writes.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// A newer leader exists.
    #[error("leadership term {held} is stale; the current term is {current}")]
    Stale {
        /// The term this replica holds.
        held: i64,
        /// The term in the database.
        current: i64,
    },
    /// The check failed.
    #[error("failed to check the leadership term")]
    Database(#[source] sqlx::Error),
}

/// Checks inside `tx` that `term` is still the current term, and share-locks it so no new
/// term can be written until `tx` ends.
pub async fn check_fence(
    tx: &mut Transaction<'static, Postgres>,
    term: i64,
) -> Result<(), FenceError> {
    let current: Option<i64> =
        sqlx::query_scalar("SELECT term FROM leader_terms WHERE name = $1 FOR SHARE")
            .bind(LEADERSHIP)
            .fetch_optional(&mut **tx)
            .await
            .map_err(FenceError::Database)?;
    let current = current.unwrap_or(0);
    if current != term {
        return Err(FenceError::Stale {
            held: term,
            current,
        });
    }
    Ok(())
}

/// Runs the election loop until the process ends, publishing the state on the returned
/// channel. `url` is used for the dedicated lock connection.
pub fn spawn_elector(url: String, interval: Duration) -> watch::Receiver<Leadership> {
    let (sender, receiver) = watch::channel(Leadership::Follower);
    tokio::spawn(async move {
        loop {
            match hold_leadership(&url, interval, &sender).await {
                Ok(()) => {}
                Err(error) => {
                    tracing::warn!(error = %crate::api::error::error_chain(&error), "leader election connection failed");
                }
            }
            sender.send_replace(Leadership::Follower);
            if sender.is_closed() {
                return;
            }
            tokio::time::sleep(interval).await;
        }
    });
    receiver
}

/// Connects, tries to take the lock until it succeeds, then keeps the connection alive and
/// returns when it fails.
async fn hold_leadership(
    url: &str,
    interval: Duration,
    sender: &watch::Sender<Leadership>,
) -> Result<(), sqlx::Error> {
    let mut connection = PgConnection::connect(url).await?;
    loop {
        let acquired: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LEADER_LOCK_KEY)
            .fetch_one(&mut connection)
            .await?;
        if acquired {
            break;
        }
        tokio::time::sleep(interval).await;
    }

    let term: i64 = sqlx::query_scalar(
        "INSERT INTO leader_terms (name, term) VALUES ($1, 1)
         ON CONFLICT (name) DO UPDATE SET term = leader_terms.term + 1
         RETURNING term",
    )
    .bind(LEADERSHIP)
    .fetch_one(&mut connection)
    .await?;
    tracing::info!(term, "became leader");
    sender.send_replace(Leadership::Leader { term });

    loop {
        tokio::time::sleep(interval).await;
        sqlx::query("SELECT 1").execute(&mut connection).await?;
        if sender.is_closed() {
            return Ok(());
        }
    }
}

/// Shortest gap between two passes of leader work woken by appends. A deploy's events come in
/// bursts (an agent reports several instances at once); the gap lets one pass handle a burst.
const EVENT_PASS_GAP: Duration = Duration::from_millis(20);

/// Time after which a pass woken by an append is a full pass again. Passes woken by appends
/// only move deploys on. Lease expiry, lost-host replacement, scale reconciliation and
/// idempotency pruning read every host or env, so between interval passes they run only once
/// per this gap while appends keep waking the leader.
const FULL_PASS_GAP: Duration = Duration::from_millis(250);

/// Runs the leader's work while this replica leads: expiring host leases, orchestrating
/// deploys and pruning old idempotency records.
///
/// A pass runs every `interval`, and also soon after any append (`events` changes on every
/// notification), so a deploy moves on as soon as an agent reports instead of waiting for the
/// next tick. Correctness never depends on a notification: the interval pass still runs.
pub async fn run_singleton_work(
    store: Store,
    mut leadership: watch::Receiver<Leadership>,
    mut events: watch::Receiver<u64>,
    interval: Duration,
    route_drain_deadline: Duration,
) {
    let mut listening = true;
    // Kept between passes for its cache of values that never change, such as a release's
    // spec, and its address book. It is rebuilt for every new term, with the settings read
    // again.
    let mut orchestrator = None;
    let mut orchestrator_term = None;
    let mut last_full: Option<tokio::time::Instant> = None;
    let mut woken_by_append = false;
    loop {
        let state = *leadership.borrow_and_update();
        // Mark the events seen before the pass, so an append during the pass wakes the next.
        events.borrow_and_update();
        // A new term, even of this replica, starts from a new orchestrator: another replica
        // may have led in between, and the orchestrator's address book must be read again.
        let term = match state {
            Leadership::Leader { term } => Some(term),
            _ => None,
        };
        if term != orchestrator_term {
            orchestrator = None;
            orchestrator_term = term;
        }
        let full = !woken_by_append || last_full.is_none_or(|at| at.elapsed() >= FULL_PASS_GAP);
        if full {
            last_full = Some(tokio::time::Instant::now());
        }
        if let Leadership::Leader { term } = state {
            let started = tokio::time::Instant::now();
            let result =
                singleton_pass(&store, term, &mut orchestrator, full, route_drain_deadline).await;
            tracing::debug!(term, full, elapsed = ?started.elapsed(), "leader pass done");
            if let Err(error) = result {
                tracing::warn!(error = %crate::api::error::error_chain(&error), term, "leader work failed");
            }
        }

        let is_leader = matches!(state, Leadership::Leader { .. });
        woken_by_append = false;
        tokio::select! {
            changed = leadership.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            changed = events.changed(), if listening && is_leader => {
                match changed {
                    Ok(()) => {
                        woken_by_append = true;
                        tokio::time::sleep(EVENT_PASS_GAP).await;
                    }
                    // The notifier is gone; the interval alone drives the passes from now on.
                    Err(_) => listening = false,
                }
            }
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// Errors of one pass of leader work.
#[derive(Debug, thiserror::Error)]
pub enum SingletonError {
    /// The fence check failed.
    #[error("fence check failed")]
    Fence(#[from] FenceError),
    /// A store operation failed.
    #[error("store operation failed")]
    Store(#[from] StoreError),
    /// The deploy orchestrator failed.
    #[error("deploy orchestration failed")]
    Orchestrator(#[from] crate::orchestrator::pg::OrchestratorError),
}

/// Runs one pass of leader work; `full` adds the work that reads every host or env (see
/// [`FULL_PASS_GAP`]).
async fn singleton_pass(
    store: &Store,
    term: i64,
    orchestrator: &mut Option<crate::orchestrator::pg::Orchestrator>,
    full: bool,
    route_drain_deadline: Duration,
) -> Result<(), SingletonError> {
    if full {
        expire_leases(store, term).await?;
    }

    if orchestrator.is_none()
        && let Some(settings) = crate::bootstrap::load_settings(store).await?
    {
        *orchestrator = Some(
            crate::orchestrator::pg::Orchestrator::new(
                store.clone(),
                settings.ula_prefix,
                kiln_scheduler::plan::Timeouts::default(),
            )?
            .with_route_drain_deadline(route_drain_deadline),
        );
    }
    if let Some(orchestrator) = orchestrator {
        let scope = if full {
            PassScope::Full
        } else {
            PassScope::Deploys
        };
        orchestrator.run_once(term, scope).await?;
    }

    if full {
        sqlx::query("DELETE FROM idempotency_keys WHERE created_at < now() - interval '24 hours'")
            .execute(store.pool())
            .await
            .map_err(StoreError::database("prune idempotency keys"))?;
    }
    Ok(())
}

/// Appends `HostLost` for every host whose lease expired.
async fn expire_leases(store: &Store, term: i64) -> Result<(), SingletonError> {
    let expired: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT h.id FROM hosts h JOIN host_leases l ON l.host_id = h.id
         WHERE l.expires_at < now() AND h.state IN ('ready', 'cordoned', 'draining')",
    )
    .fetch_all(store.pool())
    .await
    .map_err(StoreError::database("list expired leases"))?;

    for host in expired {
        let host_id = kiln_core::HostId::from_uuid(host);
        let mut tx = store.begin().await?;
        check_fence(&mut tx, term).await?;
        let event = kiln_api::Event::HostLost { host_id };
        Store::append_in(
            &mut tx,
            &crate::store::streams::host(host_id),
            crate::store::ExpectedVersion::Any,
            vec![crate::store::NewEvent::cluster(event)],
            "system:leader",
        )
        .await?;
        tx.commit()
            .await
            .map_err(StoreError::database("commit host loss"))?;
        tracing::warn!(%host_id, term, "host lease expired");
    }

    Ok(())
}
