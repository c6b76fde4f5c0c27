//! Watch cursors never skip an event, even when transactions that append commit in an order
//! different from the one in which they started.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kiln_api::Event;
use kiln_api::events::EventQuery;
use kiln_control::store::{EventFilter, ExpectedVersion, NewEvent, Store, StreamEvent, streams};
use kiln_core::{AppId, AppName, OrgId, OrgName};

use crate::harness;

/// Longest time a test waits for a background append to reach the lock.
const LOCK_WAIT_TIMEOUT: Duration = Duration::from_secs(30);

fn org_event(name: &str) -> (String, NewEvent) {
    let org_id = OrgId::new();
    let event = Event::OrgCreated {
        org_id,
        name: OrgName::new(name).unwrap(),
    };
    (streams::org(org_id), NewEvent::org(org_id, event))
}

async fn waiting_advisory_locks(store: &Store) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        .fetch_one(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn crossing_commits_are_never_skipped() {
    let (store, _db) = harness::store().await;

    // Transaction A appends first and stays open.
    let (stream_a, event_a) = org_event("first");
    let mut tx_a = store.begin().await.unwrap();
    let appended_a = Store::append_in(
        &mut tx_a,
        &stream_a,
        ExpectedVersion::Any,
        vec![event_a],
        "a",
    )
    .await
    .unwrap();

    // Transaction B starts later and tries to commit before A.
    let (stream_b, event_b) = org_event("second");
    let store_b = store.clone();
    let task_b = tokio::spawn(async move {
        store_b
            .append(&stream_b, ExpectedVersion::Any, vec![event_b], "b")
            .await
            .unwrap()
    });

    let deadline = Instant::now() + LOCK_WAIT_TIMEOUT;
    while waiting_advisory_locks(&store).await == 0 {
        assert!(Instant::now() < deadline, "append B never queued behind A");
        tokio::task::yield_now().await;
    }

    // A watcher reading now sees neither event and keeps its cursor at 0.
    let (events, cursor) = store
        .read_page(0, 100, &EventFilter::default())
        .await
        .unwrap();
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(cursor, 0);

    tx_a.commit().await.unwrap();
    let appended_b = task_b.await.unwrap();
    assert!(appended_a[0].seq < appended_b[0].seq);

    let (events, cursor) = store
        .read_page(0, 100, &EventFilter::default())
        .await
        .unwrap();
    let seqs: Vec<u64> = events.iter().map(|event| event.seq).collect();
    assert_eq!(seqs, vec![appended_a[0].seq, appended_b[0].seq]);
    assert_eq!(cursor, appended_b[0].seq);
}

#[tokio::test]
async fn concurrent_appenders_and_watchers_agree() {
    let (store, _db) = harness::store().await;
    const WRITERS: usize = 8;
    const APPENDS: usize = 40;

    let org_id = OrgId::new();
    store
        .append(
            &streams::org(org_id),
            ExpectedVersion::NoStream,
            vec![NewEvent::org(
                org_id,
                Event::OrgCreated {
                    org_id,
                    name: OrgName::new("busy").unwrap(),
                },
            )],
            "t",
        )
        .await
        .unwrap();

    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for index in 0..APPENDS {
                let event = Event::AppCreated {
                    app_id: AppId::new(),
                    org_id,
                    name: AppName::new(format!("w{writer}-{index}")).unwrap(),
                };
                let stream = format!("writer:{writer}");
                // A third of the writers use `append`, one autocommit statement. The others
                // append in a transaction that holds the append lock until its commit: with
                // `append_in`, or with `append_each_in` and a second event in another stream.
                if writer % 3 == 0 {
                    store
                        .append(
                            &stream,
                            ExpectedVersion::Any,
                            vec![NewEvent::org(org_id, event)],
                            "t",
                        )
                        .await
                        .unwrap();
                    continue;
                }
                let mut tx = store.begin().await.unwrap();
                if writer % 3 == 1 {
                    Store::append_in(
                        &mut tx,
                        &stream,
                        ExpectedVersion::Any,
                        vec![NewEvent::org(org_id, event)],
                        "t",
                    )
                    .await
                    .unwrap();
                } else {
                    let second = Event::AppCreated {
                        app_id: AppId::new(),
                        org_id,
                        name: AppName::new(format!("w{writer}-{index}-b")).unwrap(),
                    };
                    let events = vec![
                        StreamEvent {
                            stream: stream.clone(),
                            expected: ExpectedVersion::Any,
                            event: NewEvent::org(org_id, event),
                        },
                        StreamEvent {
                            stream: format!("{stream}:b"),
                            expected: ExpectedVersion::Any,
                            event: NewEvent::org(org_id, second),
                        },
                    ];
                    Store::append_each_in(&mut tx, events, "t").await.unwrap();
                }
                // Keep some transactions open a little longer so commits interleave.
                if index % 3 == writer % 3 {
                    sqlx::query("SELECT pg_sleep(0.002)")
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                tx.commit().await.unwrap();
            }
        }));
    }

    let batched_writers = (0..WRITERS).filter(|writer| writer % 3 == 2).count();
    let total = 1 + ((WRITERS + batched_writers) * APPENDS) as u64;
    let mut watchers = Vec::new();
    for limit in [1u32, 7, 1000] {
        let store = store.clone();
        watchers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut cursor = 0;
            while (seen.len() as u64) < total {
                let (events, next) = store
                    .read_page(cursor, limit, &EventFilter::default())
                    .await
                    .unwrap();
                for event in &events {
                    assert!(event.seq > cursor);
                    seen.push(event.seq);
                }
                assert!(next >= cursor);
                cursor = next;
                tokio::task::yield_now().await;
            }
            seen
        }));
    }

    for writer in writers {
        writer.await.unwrap();
    }
    let all: Vec<u64> = sqlx::query_scalar::<_, i64>("SELECT seq FROM events ORDER BY seq")
        .fetch_all(store.pool())
        .await
        .unwrap()
        .into_iter()
        .map(|seq| seq as u64)
        .collect();
    assert_eq!(all.len() as u64, total);
    for watcher in watchers {
        let seen = watcher.await.unwrap();
        assert_eq!(seen, all);
    }
    let unique: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len());
}

#[tokio::test]
async fn long_poll_returns_new_event() {
    let server = harness::TestServer::start().await;
    let client = server.org_client();
    let head = server.store.head().await.unwrap();

    let waiting = {
        let client = client.clone();
        let org = server.org.clone();
        tokio::spawn(async move {
            client
                .org_events(
                    &org,
                    &EventQuery {
                        after: Some(head),
                        wait: Some(30),
                        ..EventQuery::default()
                    },
                )
                .await
                .unwrap()
        })
    };
    client
        .create_app(
            &server.org,
            &kiln_api::types::CreateApp {
                name: AppName::new("woken").unwrap(),
            },
        )
        .await
        .unwrap();
    let page = waiting.await.unwrap();
    assert_eq!(page.events.len(), 1, "{page:?}");
    assert_eq!(page.events[0].event.type_name(), "AppCreated");
    assert_eq!(page.cursor, page.events[0].seq);
}

#[tokio::test]
async fn filtered_watch_advances_past_other_orgs() {
    let server = harness::TestServer::start().await;
    let (other, other_token) = server.other_org("beta").await;
    let head = server.store.head().await.unwrap();
    server
        .client(&other_token)
        .create_app(
            &other,
            &kiln_api::types::CreateApp {
                name: AppName::new("theirs").unwrap(),
            },
        )
        .await
        .unwrap();

    let page = server
        .org_client()
        .org_events(
            &server.org,
            &EventQuery {
                after: Some(head),
                ..EventQuery::default()
            },
        )
        .await
        .unwrap();
    assert!(page.events.is_empty(), "{page:?}");
    assert_eq!(page.cursor, server.store.head().await.unwrap());
}
