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
//! env with an instance on the host, unless its type never changes an assignment (see
//! [`skips_assignments`]). Events of other hosts' instances never change this host's
//! assignments. The feed covers events after the log head it read when it started; a cursor
//! older than that is checked against the database as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kiln_core::HostId;
use tokio::sync::watch;

use crate::store::watch::{Notifier, REPOLL_INTERVAL};
use crate::store::{Store, StoreError};

/// SQL condition on an `events` row (aliased `e`) that holds for events which cannot change
/// any host's assignments, so they never end a host's long poll. A host's own report of a
/// live state changes nothing it is assigned. A report of an exit does when the instance runs
/// once, because its desired state becomes stopped, so exits are never skipped. Deploy records,
/// route tables, releases, scale targets and secret metadata are not part of an assignment
/// (an assignment pins its release's secret version). Any other event type wakes the host, so
/// a new type errs on the side of an extra reload.
macro_rules! skips_assignments {
    () => {
        "(e.type IN ('DeployRequested', 'DeployStateChanged', 'DeployStepCompleted',
                     'RoutesChanged', 'ReleaseCreated', 'EnvReleaseChanged', 'EnvScaled',
                     'SecretSet', 'SecretUnset')
          OR (e.type = 'InstanceStateChanged'
              AND e.payload->'data'->>'state' NOT IN ('exited', 'failed')))"
    };
}
pub(crate) use skips_assignments;

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
    let rows: Vec<(uuid::Uuid, i64)> = sqlx::query_as(concat!(
        "SELECT host, max(seq) FROM (
             SELECT e.host_id AS host, e.seq FROM events e
             WHERE e.seq > $1 AND e.seq <= $2 AND e.host_id IS NOT NULL AND NOT ",
        skips_assignments!(),
        "
             UNION ALL
             SELECT DISTINCT i.host_id, e.seq FROM events e
             JOIN instances i ON i.env_id = e.env_id
             WHERE e.seq > $1 AND e.seq <= $2 AND e.host_id IS NULL AND NOT ",
        skips_assignments!(),
        ") AS concerned
         GROUP BY host"
    ))
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
    use std::collections::BTreeMap;

    use kiln_api::{Event, InstanceState};
    use kiln_core::{EnvId, InstanceId, OrgId, ProcessName, ReleaseId};

    use super::*;
    use crate::store::{ExpectedVersion, NewEvent, streams};

    async fn append(store: &Store, stream: &str, org: OrgId, event: Event) -> u64 {
        let appended = store
            .append(
                stream,
                ExpectedVersion::Any,
                vec![NewEvent::org(org, event)],
                "t",
            )
            .await
            .unwrap();
        appended[0].seq
    }

    /// Returns the hosts that a read of the feed after `last` reports, with their `seq`.
    async fn changed(store: &Store, last: u64) -> Vec<(HostId, u64)> {
        read_changes(store, last)
            .await
            .unwrap()
            .map(|(_, hosts)| hosts)
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn feed_skips_events_that_change_no_assignment() {
        let database = kiln_testkit::postgres::database().unwrap();
        let store = Store::connect(&database.url, 4).await.unwrap();
        store.migrate().await.unwrap();
        let (org, env, host, instance) =
            (OrgId::new(), EnvId::new(), HostId::new(), InstanceId::new());
        let stream = streams::instance(instance);
        let report = |state: InstanceState, exit_code: Option<i32>| Event::InstanceStateChanged {
            instance_id: instance,
            env_id: env,
            host_id: host,
            state,
            detail: None,
            exit_code,
            output: Vec::new(),
        };

        let placed = append(
            &store,
            &stream,
            org,
            Event::InstancePlaced {
                instance_id: instance,
                env_id: env,
                release_id: ReleaseId::new(),
                process: ProcessName::new("web").unwrap(),
                host_id: host,
                ipv6: "fd00::10".parse().unwrap(),
                ipv4: "100.64.0.10".parse().unwrap(),
            },
        )
        .await;
        assert_eq!(changed(&store, placed - 1).await, vec![(host, placed)]);

        // The host's own reports of a live state and the env's scale target change nothing
        // the host is assigned.
        append(&store, &stream, org, report(InstanceState::Running, None)).await;
        append(&store, &stream, org, report(InstanceState::Healthy, None)).await;
        let scaled = Event::EnvScaled {
            env_id: env,
            counts: BTreeMap::new(),
        };
        append(&store, &streams::env(env), org, scaled).await;
        assert!(changed(&store, placed).await.is_empty());

        // A config change of the env reaches the host through its instance; an exit does too.
        let config = Event::ConfigChanged {
            env_id: env,
            version: 1,
            set: BTreeMap::from([("MODE".to_owned(), "on".to_owned())]),
            unset: Vec::new(),
        };
        let configured = append(&store, &streams::env(env), org, config).await;
        assert_eq!(changed(&store, placed).await, vec![(host, configured)]);
        let exited = append(&store, &stream, org, report(InstanceState::Exited, Some(0))).await;
        assert_eq!(changed(&store, configured).await, vec![(host, exited)]);
    }

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
