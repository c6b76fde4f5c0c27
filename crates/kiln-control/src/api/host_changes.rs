//! The host change feed: the hosts whose assignments new events concern, read once per append
//! for every waiting host.
//!
//! An agent long-polls `GET /v1/host/assignments` until an event concerns its host. Checking
//! that with a query per waiting agent after every append costs a query per host per event,
//! which grows with the fleet: with 100 hosts each instance state report caused about 200
//! queries. Instead one feed task per notifier reads, after each notification, the events
//! appended since its last read and the hosts they concern, in one query, and publishes the
//! highest `seq` that concerned each host. Waiting agents compare that with their cursor.
//!
//! An event concerns a host when it names the host, or when it names no host and belongs to an
//! env with an instance on the host. Events of other hosts' instances never change this host's
//! assignments. The feed covers events after the log head it read when it started; a cursor
//! older than that is checked against the database as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kiln_core::HostId;
use tokio::sync::watch;

use crate::store::watch::{Notifier, REPOLL_INTERVAL};
use crate::store::{Store, StoreError};

/// Pause before the feed reads again after a failed read.
const FEED_RETRY_DELAY: Duration = Duration::from_secs(1);

/// The hosts whose assignments changed after `from`, as last read by the feed.
#[derive(Debug, Clone, Default)]
pub struct ChangeIndex {
    /// The log head when the feed started; the index covers no earlier event.
    pub from: u64,
    /// The log head of the last read: every event up to it has been counted.
    pub head: u64,
    /// The highest `seq` that concerned each host.
    changed: HashMap<HostId, u64>,
}

impl ChangeIndex {
    /// Returns whether an event after `after` concerned `host`. Only meaningful for
    /// `after >= self.from`.
    pub fn changed_after(&self, host: HostId, after: u64) -> bool {
        self.changed.get(&host).is_some_and(|seq| *seq > after)
    }
}

/// A subscription to the feed of one notifier.
#[derive(Debug, Clone)]
pub struct HostChanges {
    index: watch::Receiver<Arc<ChangeIndex>>,
}

/// The feed of each live notifier, found by its channel. A notifier has no room for the feed
/// and handler state is built in several places, so the feed is started on first use.
static FEEDS: Mutex<Vec<(watch::Receiver<u64>, HostChanges)>> = Mutex::new(Vec::new());

impl HostChanges {
    /// Returns the feed of `notifier`, starting it on first use.
    pub async fn of(store: &Store, notifier: &Notifier) -> Result<Self, StoreError> {
        let changes = notifier.subscribe();
        if let Some(feed) = find_feed(&changes) {
            return Ok(feed);
        }

        let head = store.head().await?;
        let start = ChangeIndex {
            from: head,
            head,
            changed: HashMap::new(),
        };
        let (sender, index) = watch::channel(Arc::new(start));
        let feed = Self { index };
        {
            let mut feeds = FEEDS.lock().unwrap_or_else(PoisonError::into_inner);
            // Another request may have started the feed while this one read the head.
            if let Some((_, existing)) = feeds.iter().find(|(rx, _)| rx.same_channel(&changes)) {
                return Ok(existing.clone());
            }
            feeds.push((changes.clone(), feed.clone()));
        }
        tokio::spawn(run_feed(store.clone(), changes, sender, head));
        Ok(feed)
    }

    /// Returns a receiver of the index, updated after every read of the feed.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ChangeIndex>> {
        self.index.clone()
    }
}

/// Finds the feed of the notifier whose channel `changes` is, and drops the feeds of
/// notifiers that are gone.
fn find_feed(changes: &watch::Receiver<u64>) -> Option<HostChanges> {
    let mut feeds = FEEDS.lock().unwrap_or_else(PoisonError::into_inner);
    feeds.retain(|(rx, _)| rx.has_changed().is_ok());
    feeds
        .iter()
        .find(|(rx, _)| rx.same_channel(changes))
        .map(|(_, feed)| feed.clone())
}

/// Reads the hosts concerned by new events after every notification, until the notifier is
/// gone.
async fn run_feed(
    store: Store,
    mut changes: watch::Receiver<u64>,
    sender: watch::Sender<Arc<ChangeIndex>>,
    from: u64,
) {
    let mut index = ChangeIndex {
        from,
        head: from,
        changed: HashMap::new(),
    };
    loop {
        // Marked seen before the read, so an append during the read triggers another.
        changes.borrow_and_update();
        let pause = match read_changes(&store, index.head).await {
            Ok(Some((head, hosts))) => {
                for (host, seq) in hosts {
                    let entry = index.changed.entry(host).or_default();
                    *entry = (*entry).max(seq);
                }
                index.head = head;
                sender.send_replace(Arc::new(index.clone()));
                REPOLL_INTERVAL
            }
            Ok(None) => REPOLL_INTERVAL,
            Err(error) => {
                tracing::warn!(error = %super::error::error_chain(&error), "host change feed read failed");
                FEED_RETRY_DELAY
            }
        };
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Reads the log head and, when it moved past `last`, the hosts concerned by the events in
/// between with the highest `seq` for each. Every event up to the head is visible, because
/// appends draw `seq` in commit order.
async fn read_changes(
    store: &Store,
    last: u64,
) -> Result<Option<(u64, Vec<(HostId, u64)>)>, StoreError> {
    let head = store.head().await?;
    if head <= last {
        return Ok(None);
    }
    let rows: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
        "SELECT host, max(seq) FROM (
             SELECT host_id AS host, seq FROM events
             WHERE seq > $1 AND seq <= $2 AND host_id IS NOT NULL
             UNION ALL
             SELECT DISTINCT i.host_id, e.seq FROM events e
             JOIN instances i ON i.env_id = e.env_id
             WHERE e.seq > $1 AND e.seq <= $2 AND e.host_id IS NULL) AS concerned
         GROUP BY host",
    )
    .bind(i64::try_from(last).unwrap_or(i64::MAX))
    .bind(i64::try_from(head).unwrap_or(i64::MAX))
    .fetch_all(store.pool())
    .await
    .map_err(StoreError::database("read host changes"))?;
    let hosts = rows
        .into_iter()
        .map(|(host, seq)| (HostId::from_uuid(host), u64::try_from(seq).unwrap_or(0)))
        .collect();
    Ok(Some((head, hosts)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_index_compares_with_cursor() {
        let (host, other) = (HostId::new(), HostId::new());
        let index = ChangeIndex {
            from: 10,
            head: 20,
            changed: HashMap::from([(host, 15)]),
        };

        assert!(index.changed_after(host, 14));
        assert!(!index.changed_after(host, 15));
        assert!(!index.changed_after(host, 20));
        assert!(!index.changed_after(other, 10));
    }
}
