//! Background tasks that talk to the control plane, each retrying with backoff so an outage
//! never blocks the reconcile loop: registration and heartbeats, the assignment watcher, the
//! report outbox and the log shipper.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kiln_api::types::{Heartbeat, HostAssignments, LogBatch, RegisterHost, ReportInstanceState};
use kiln_core::InstanceId;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::agent::{Shared, error_chain};
use crate::backoff::Backoff;
use crate::control::ControlPlane;

/// First retry delay after a failed control plane call.
pub const FIRST_RETRY: Duration = Duration::from_millis(200);

/// Maximum retry delay.
pub const MAX_RETRY: Duration = Duration::from_secs(30);

/// Seconds one assignment long-poll waits for a change.
pub const WATCH_WAIT_SECS: u64 = 30;

/// Lines per shipped batch.
const BATCH_LINES: usize = 500;

/// Registers the host, then renews its lease every `interval`; registers again whenever a
/// heartbeat is rejected (for example after the lease expired).
pub async fn run_session<C: ControlPlane>(
    control: C,
    registration: RegisterHost,
    interval: Duration,
    shared: Arc<Shared>,
) {
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    let mut registered = false;
    loop {
        let result = if registered {
            let heartbeat = Heartbeat {
                running_instances: shared.running.load(Ordering::Relaxed),
            };
            control.heartbeat(&heartbeat).await
        } else {
            control.register(&registration).await
        };
        match result {
            Ok(lease) => {
                if !registered {
                    info!(host = %lease.host.id, lease_secs = lease.lease_secs, "host registered");
                }
                registered = true;
                *shared
                    .host_id
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(lease.host.id);
                shared.reachable.store(true, Ordering::Relaxed);
                backoff.reset();
                tokio::time::sleep(interval).await;
            }
            Err(error) => {
                shared.reachable.store(false, Ordering::Relaxed);
                if !error.is_retryable() {
                    // Rejected (for example the lease expired): register again.
                    registered = false;
                }
                let delay = backoff.next_delay();
                warn!(error = %error_chain(&error), retry_in = ?delay, registered, "control plane call failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Watches the host's assignments from `cursor`, publishing every new set. The cursor only
/// moves forward with a received set, so a reconnect resumes where the last one ended.
pub async fn run_watcher<C: ControlPlane>(
    control: C,
    mut cursor: u64,
    shared: Arc<Shared>,
    assignments: watch::Sender<Option<HostAssignments>>,
) {
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    let mut first = true;
    loop {
        // The first call returns at once, so a restarted agent learns the current set.
        let wait = if first { 0 } else { WATCH_WAIT_SECS };
        match control.watch(cursor, wait).await {
            Ok(set) => {
                shared.reachable.store(true, Ordering::Relaxed);
                backoff.reset();
                let changed = first || set.cursor != cursor;
                first = false;
                cursor = set.cursor;
                if changed && assignments.send(Some(set)).is_err() {
                    return;
                }
            }
            Err(error) => {
                shared.reachable.store(false, Ordering::Relaxed);
                let delay = backoff.next_delay();
                warn!(error = %error_chain(&error), cursor, retry_in = ?delay, "assignment watch failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Sends state reports in order, retrying each until the control plane takes it. A report
/// the control plane rejects as invalid is dropped (logged), so it cannot block later ones.
pub async fn run_reporter<C: ControlPlane>(
    control: C,
    mut outbox: mpsc::UnboundedReceiver<(InstanceId, ReportInstanceState)>,
    shared: Arc<Shared>,
) {
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    while let Some((instance, report)) = outbox.recv().await {
        loop {
            match control.report(instance, &report).await {
                Ok(()) => {
                    shared.reachable.store(true, Ordering::Relaxed);
                    backoff.reset();
                    break;
                }
                Err(error) if !error.is_retryable() && error.code().is_some() => {
                    warn!(%instance, state = ?report.state, error = %error_chain(&error), "state report rejected; dropped");
                    break;
                }
                Err(error) => {
                    shared.reachable.store(false, Ordering::Relaxed);
                    let delay = backoff.next_delay();
                    warn!(%instance, error = %error_chain(&error), retry_in = ?delay, "state report failed");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// Ships queued log lines every `interval`. Lines stay queued (bounded per instance) until
/// the control plane takes them.
pub async fn run_log_shipper<C: ControlPlane>(control: C, shared: Arc<Shared>, interval: Duration) {
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    loop {
        let sinks: Vec<_> = shared
            .logs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let mut failed = false;
        for sink in sinks {
            let lines = sink.peek_pending(BATCH_LINES);
            if lines.is_empty() {
                continue;
            }
            let count = lines.len();
            match control.ship_logs(&LogBatch { lines }).await {
                Ok(()) => sink.ack(count),
                Err(error) => {
                    warn!(error = %error_chain(&error), lines = count, "log shipping failed");
                    failed = true;
                    break;
                }
            }
        }
        let delay = if failed {
            backoff.next_delay()
        } else {
            backoff.reset();
            interval
        };
        tokio::time::sleep(delay).await;
    }
}
