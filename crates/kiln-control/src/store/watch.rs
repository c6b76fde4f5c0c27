//! Waking long-polling watchers when the log grows.
//!
//! One task per process holds a `LISTEN` connection on [`super::NOTIFY_CHANNEL`] and bumps a
//! counter on every notification; a waiting request subscribes to the counter *before* it
//! reads, so a notification that arrives between its read and its wait still wakes it. If the
//! listening connection drops, notifications can be lost, so waiters also re-read every
//! [`REPOLL_INTERVAL`]; correctness never depends on a notification, only latency does.
//!
//! Cursors stay gap-free because appends draw `seq` under a lock held until commit (see
//! [`super`]): everything at or below a visible `seq` is already visible.

use std::future::Future;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{NOTIFY_CHANNEL, Store, StoreError};

/// Longest time a waiter goes without re-reading, in case a notification was lost.
pub const REPOLL_INTERVAL: Duration = Duration::from_secs(5);

/// Delay before reconnecting a failed `LISTEN` connection.
const LISTEN_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Wakes watchers on new events.
#[derive(Debug, Clone)]
pub struct Notifier {
    changes: watch::Receiver<u64>,
}

impl Notifier {
    /// Starts the listening task and returns a notifier fed by it.
    pub async fn start(store: &Store) -> Result<Self, StoreError> {
        let mut listener = PgListener::connect_with(store.pool())
            .await
            .map_err(StoreError::database("connect listener"))?;
        listener
            .listen(NOTIFY_CHANNEL)
            .await
            .map_err(StoreError::database("listen"))?;

        let (sender, changes) = watch::channel(0u64);
        tokio::spawn(async move {
            loop {
                match listener.try_recv().await {
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "event listener failed, reconnecting");
                        tokio::time::sleep(LISTEN_RETRY_DELAY).await;
                    }
                }
                // Wake waiters on notifications and after reconnects, which may have
                // swallowed notifications.
                sender.send_modify(|count| *count = count.wrapping_add(1));
                if sender.is_closed() {
                    return;
                }
            }
        });
        Ok(Self { changes })
    }

    /// Returns a receiver whose value changes on every append notification (and after a
    /// reconnect of the listening connection).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// Calls `poll` until it returns `Some`, or until `wait` has passed, re-polling after
    /// every append notification. Returns the last result, `None` after a timeout.
    pub async fn wait_for<T, F, Fut>(
        &self,
        wait: Duration,
        mut poll: F,
    ) -> Result<Option<T>, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>, StoreError>>,
    {
        let deadline = Instant::now() + wait;
        let mut changes = self.changes.clone();
        loop {
            changes.borrow_and_update();
            if let Some(value) = poll().await? {
                return Ok(Some(value));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let next = deadline.min(now + REPOLL_INTERVAL);
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep_until(next).await;
                    }
                }
                () = tokio::time::sleep_until(next) => {}
            }
        }
    }
}
