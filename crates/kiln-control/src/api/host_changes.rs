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
//!
//! The feed also keeps, per host, what each recent event changed (an instance, every instance
//! of an env, or the host itself). A request for changes only then gets the assignments that
//! changed after its cursor without a query of the log.

use std::collections::{HashMap, VecDeque};
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
/// (an assignment pins its release's secret version). Nor is a host's state (cordoned,
/// draining, lost) or its tokens: the instances it must stop get their own stop requests. A
/// registration is not skipped, because it sets the host's network prefix. Any other event
/// type wakes the host, so a new type errs on the side of an extra reload.
macro_rules! skips_assignments {
    () => {
        "(e.type IN ('DeployRequested', 'DeployStateChanged', 'DeployStepCompleted',
                     'RoutesChanged', 'ReleaseCreated', 'EnvReleaseChanged', 'EnvScaled',
                     'SecretSet', 'SecretUnset', 'HostCreated', 'HostCordoned',
                     'HostUncordoned', 'HostDrainRequested', 'HostLost', 'TokenCreated')
          OR (e.type = 'InstanceStateChanged'
              AND e.payload->'data'->>'state' NOT IN ('exited', 'failed')))"
    };
}
pub(crate) use skips_assignments;

/// Most events one read of the feed covers.
const MAX_EVENTS_PER_READ: u64 = 10_000;

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
    log: Arc<ChangeLog>,
}

/// The part of a host's assignments that one event changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    /// One instance on the host (placed, stopped, exited, removed).
    Instance(uuid::Uuid),
    /// Every instance of an env on the host, such as after a config change.
    Env(uuid::Uuid),
    /// Everything on the host, such as its network prefix after a registration.
    Host,
}

/// Recent subjects kept per host; a cursor older than the oldest kept gets the complete set.
const SUBJECTS_KEPT_PER_HOST: usize = 1024;

/// The subjects of the events the feed has read, per host, oldest first.
///
/// The feed adds a read's subjects before it publishes the read's head. So every subject up
/// to a published head is here, unless it was trimmed, which [`HostLog::floor`] records.
#[derive(Debug, Default)]
struct ChangeLog {
    hosts: Mutex<HashMap<HostId, HostLog>>,
}

/// The subjects kept for one host.
#[derive(Debug, Default)]
struct HostLog {
    /// The `seq` of the newest subject trimmed. The log contains every subject after it.
    floor: u64,
    /// `(seq, subject)`, in `seq` order.
    subjects: VecDeque<(u64, Subject)>,
}

/// The changes of a host's assignments between two cursors: the instances named by an event,
/// and the envs whose events change every instance of theirs on the host.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Instances, sorted, without duplicates.
    pub instances: Vec<uuid::Uuid>,
    /// Envs, sorted, without duplicates.
    pub envs: Vec<uuid::Uuid>,
}

impl ChangeLog {
    fn add(&self, subjects: Vec<(HostId, u64, Subject)>) {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        for (host, seq, subject) in subjects {
            let log = hosts.entry(host).or_default();
            // Trimmed before the push, so the queue never grows past its size.
            while log.subjects.len() >= SUBJECTS_KEPT_PER_HOST {
                if let Some((trimmed, _)) = log.subjects.pop_front() {
                    log.floor = trimmed;
                }
            }
            log.subjects.push_back((seq, subject));
        }
    }

    /// Returns what changed `host` in `(after, upto]`, or `None` when the log cannot tell:
    /// subjects after `after` were trimmed, or an event changed the whole host. The caller
    /// makes sure the feed covers the range (`from <= after` and `upto <= head`).
    fn changes(&self, host: HostId, after: u64, upto: u64) -> Option<Changes> {
        let hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(log) = hosts.get(&host) else {
            return Some(Changes::default());
        };
        if after < log.floor {
            return None;
        }

        let start = log.subjects.partition_point(|(seq, _)| *seq <= after);
        let mut changes = Changes::default();
        for (seq, subject) in log.subjects.range(start..) {
            if *seq > upto {
                break;
            }
            match subject {
                Subject::Instance(id) => changes.instances.push(*id),
                Subject::Env(id) => changes.envs.push(*id),
                Subject::Host => return None,
            }
        }
        drop(hosts);

        changes.instances.sort_unstable();
        changes.instances.dedup();
        changes.envs.sort_unstable();
        changes.envs.dedup();
        Some(changes)
    }
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
        let feed = Self {
            index,
            log: Arc::default(),
        };
        {
            let mut feeds = FEEDS.lock().unwrap_or_else(PoisonError::into_inner);
            // Another request may have started the feed while this one read the head.
            if let Some((_, existing)) = feeds.iter().find(|(rx, _)| rx.same_channel(&changes)) {
                return Ok(existing.clone());
            }
            feeds.push((changes.clone(), feed.clone()));
        }
        tokio::spawn(run_feed(
            store.clone(),
            changes,
            sender,
            Arc::clone(&feed.log),
            head,
        ));
        Ok(feed)
    }

    /// Returns a receiver of the index, updated after every read of the feed.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ChangeIndex>> {
        self.index.clone()
    }

    /// Returns what changed `host`'s assignments in `(after, upto]`, where `index` is a
    /// published index that covers that range. `None` means the feed cannot tell and the
    /// complete set is needed.
    pub fn changes(
        &self,
        index: &ChangeIndex,
        host: HostId,
        after: u64,
        upto: u64,
    ) -> Option<Changes> {
        if after < index.from || upto > index.head || upto < after {
            return None;
        }
        self.log.changes(host, after, upto)
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
    log: Arc<ChangeLog>,
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
            Ok(Some(read)) => {
                for (host, seq, _) in &read.subjects {
                    let entry = index.changed.entry(*host).or_default();
                    *entry = (*entry).max(*seq);
                }
                // Subjects first, then the head that covers them.
                log.add(read.subjects);
                index.head = read.upto;
                sender.send_replace(Arc::new(index.clone()));
                if read.more {
                    Duration::ZERO
                } else {
                    REPOLL_INTERVAL
                }
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

/// One read of the feed.
#[derive(Debug)]
struct FeedRead {
    /// Every event up to this `seq` has been read.
    upto: u64,
    /// The subjects of each event on each host it concerns, in `seq` order.
    subjects: Vec<(HostId, u64, Subject)>,
    /// Events after `upto` were already in the log, so the feed reads again at once.
    more: bool,
}

/// Reads the log head and, when it moved past `last`, what each event in between changed on
/// each host it concerns. Every event up to the head is visible, because appends draw `seq`
/// in commit order.
async fn read_changes(store: &Store, last: u64) -> Result<Option<FeedRead>, StoreError> {
    let log_head = store.head().await?;
    if log_head <= last {
        return Ok(None);
    }
    // A long backlog (the feed fell behind while the database was unreachable) is read in
    // parts, so one read never loads more than a bounded number of events.
    let head = log_head.min(last.saturating_add(MAX_EVENTS_PER_READ));
    let rows: Vec<(uuid::Uuid, i64, Option<uuid::Uuid>, Option<uuid::Uuid>)> =
        sqlx::query_as(concat!(
            "SELECT e.host_id, e.seq, kiln_id(e.payload->'data'->>'instance_id'), NULL::uuid
             FROM events e
             WHERE e.seq > $1 AND e.seq <= $2 AND e.host_id IS NOT NULL AND NOT ",
            skips_assignments!(),
            "
             UNION ALL
             SELECT DISTINCT i.host_id, e.seq, NULL::uuid, e.env_id FROM events e
             JOIN instances i ON i.env_id = e.env_id
             WHERE e.seq > $1 AND e.seq <= $2 AND e.host_id IS NULL AND NOT ",
            skips_assignments!(),
            "
             ORDER BY 2"
        ))
        .bind(i64::try_from(last).unwrap_or(i64::MAX))
        .bind(i64::try_from(head).unwrap_or(i64::MAX))
        .fetch_all(store.pool())
        .await
        .map_err(StoreError::database("read host changes"))?;
    let subjects = rows
        .into_iter()
        .map(|(host, seq, instance, env)| {
            let subject = match (instance, env) {
                (Some(instance), _) => Subject::Instance(instance),
                (None, Some(env)) => Subject::Env(env),
                (None, None) => Subject::Host,
            };
            (
                HostId::from_uuid(host),
                u64::try_from(seq).unwrap_or(0),
                subject,
            )
        })
        .collect();
    Ok(Some(FeedRead {
        upto: head,
        subjects,
        more: log_head > head,
    }))
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

    /// Returns the hosts that a read of the feed after `last` reports, with the highest `seq`
    /// of each.
    async fn changed(store: &Store, last: u64) -> Vec<(HostId, u64)> {
        let subjects = read_changes(store, last)
            .await
            .unwrap()
            .map(|read| read.subjects)
            .unwrap_or_default();
        let mut hosts: Vec<(HostId, u64)> = Vec::new();
        for (host, seq, _) in subjects {
            match hosts.iter_mut().find(|(known, _)| *known == host) {
                Some(entry) => entry.1 = entry.1.max(seq),
                None => hosts.push((host, seq)),
            }
        }
        hosts
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
        // Nor does a cordon of the host: what it must stop gets stop requests of its own.
        let cordoned = Event::HostCordoned { host_id: host };
        append(&store, &streams::host(host), org, cordoned).await;
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
    fn change_log_lists_subjects_in_range() {
        let (host, other) = (HostId::new(), HostId::new());
        let (a, b, env) = (
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
        );
        let log = ChangeLog::default();
        log.add(vec![
            (host, 11, Subject::Instance(b)),
            (host, 12, Subject::Instance(a)),
            (other, 13, Subject::Host),
            (host, 14, Subject::Env(env)),
            (host, 15, Subject::Instance(b)),
            (host, 17, Subject::Host),
        ]);

        let mut both = vec![a, b];
        both.sort_unstable();
        let changes = log.changes(host, 10, 16).unwrap();
        assert_eq!(changes.instances, both);
        assert_eq!(changes.envs, vec![env]);
        // The range excludes `after` and includes `upto`.
        assert!(log.changes(host, 12, 14).unwrap().instances.is_empty());
        assert_eq!(log.changes(host, 11, 12).unwrap().instances, vec![a]);
        // Another host's registration is not this host's; this host's own is everything.
        assert!(log.changes(host, 16, 17).is_none());
        assert!(log.changes(other, 10, 13).is_none());
        assert_eq!(
            log.changes(HostId::new(), 0, 20).unwrap(),
            Changes::default()
        );
    }

    #[test]
    fn change_log_refuses_ranges_it_trimmed() {
        let host = HostId::new();
        let log = ChangeLog::default();
        let subjects = (1..=SUBJECTS_KEPT_PER_HOST as u64 + 5)
            .map(|seq| (host, seq, Subject::Instance(uuid::Uuid::new_v4())))
            .collect();
        log.add(subjects);

        // Subjects 1 to 5 were trimmed, so the log has no changes for a cursor before 5.
        assert!(log.changes(host, 4, 10).is_none());
        assert_eq!(log.changes(host, 5, 10).unwrap().instances.len(), 5);
    }

    #[test]
    fn feed_answers_only_ranges_it_covers() {
        let host = HostId::new();
        let index = ChangeIndex {
            from: 10,
            head: 20,
            changed: HashMap::new(),
        };
        let (_sender, receiver) = watch::channel(Arc::new(index.clone()));
        let feed = HostChanges {
            index: receiver,
            log: Arc::default(),
        };

        assert_eq!(feed.changes(&index, host, 10, 20), Some(Changes::default()));
        assert_eq!(feed.changes(&index, host, 9, 20), None);
        assert_eq!(feed.changes(&index, host, 10, 21), None);
        assert_eq!(feed.changes(&index, host, 15, 14), None);
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
