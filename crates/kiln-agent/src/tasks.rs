//! Background tasks that talk to the control plane, each retrying with backoff so an outage
//! never blocks the reconcile loop: registration and heartbeats, the assignment watcher, the
//! report outbox and the log shipper.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kiln_api::types::{
    Heartbeat, HostAssignments, InstanceStateReport, LogBatch, MAX_STATE_REPORTS, RegisterHost,
    ReportInstanceState, ReportInstanceStates,
};
use kiln_api::{ClientError, ErrorCode};
use kiln_core::InstanceId;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::agent::{Shared, error_chain};
use crate::backoff::Backoff;
use crate::control::ControlPlane;

/// First retry delay after a failed control plane call.
pub const FIRST_RETRY: Duration = Duration::from_millis(200);

/// Maximum retry delay.
pub const MAX_RETRY: Duration = Duration::from_secs(30);

/// Seconds one assignment long-poll waits for a change.
pub const WATCH_WAIT_SECS: u64 = 30;

/// Most state reports sent in one call: the control plane's limit.
const REPORT_BATCH: usize = MAX_STATE_REPORTS;

/// Server errors in a row after which a batch of state reports is sent one report at a time,
/// and after which a single report is dropped. With the retry backoff (doubling from 200 ms
/// up to 30 s) that is about two minutes of errors.
const SERVER_ERRORS_BEFORE_SPLIT: u32 = 10;

/// Estimated size above which a batch of state reports is not grown further, well below the
/// control plane's body limit for the call.
const REPORT_BATCH_BYTES: usize = 1024 * 1024;

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

/// Watches the host's assignments from `cursor`, publishing every new set. The first call
/// requests the complete set. Later calls request only the changes and apply them to the set
/// held here, so a host with many instances does not download all of them on every change.
/// The cursor only moves forward with a received response, so a reconnect resumes where the
/// last one ended.
pub async fn run_watcher<C: ControlPlane>(
    control: C,
    mut cursor: u64,
    shared: Arc<Shared>,
    assignments: watch::Sender<Option<HostAssignments>>,
) {
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    let mut current: Option<HostAssignments> = None;
    let mut changes_supported = true;
    loop {
        // The first call returns at once, so a restarted agent learns the current set.
        let first = current.is_none();
        let wait = if first { 0 } else { WATCH_WAIT_SECS };
        let changes = !first && changes_supported;
        match control.watch(cursor, wait, changes).await {
            Ok(page) => {
                shared.reachable.store(true, Ordering::Relaxed);
                backoff.reset();
                let changed = first || page.cursor != cursor;
                cursor = page.cursor;
                let set = match current.take() {
                    Some(mut set) => {
                        set.apply(page);
                        set
                    }
                    None if page.complete => page,
                    None => {
                        // Only a request for changes gets changes, so the control plane broke
                        // the contract. Request the complete set again after a pause.
                        let delay = backoff.next_delay();
                        warn!(cursor, retry_in = ?delay, "first assignments response was not the complete set; requesting it again");
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                };
                if changed && assignments.send(Some(set.clone())).is_err() {
                    return;
                }
                current = Some(set);
            }
            Err(error) if changes && rejects_changes_flag(&error) => {
                // A control plane older than the flag: complete sets from now on.
                warn!(error = %error_chain(&error), "control plane does not return assignment changes; requesting complete sets");
                changes_supported = false;
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

/// Returns true when `error` rejects the `changes` query parameter, as a control plane that
/// predates it does (`invalid_value`, an unknown parameter named in `details.field`).
fn rejects_changes_flag(error: &ClientError) -> bool {
    match error {
        ClientError::Api { body, .. } => {
            body.code == ErrorCode::InvalidValue && body.details["field"] == "changes"
        }
        _ => false,
    }
}

/// Sends state reports in order, as many per call as are queued (up to [`REPORT_BATCH`]
/// reports and about [`REPORT_BATCH_BYTES`]), so a host starting many instances at once
/// makes few calls. A queued state that a later report of its instance supersedes is dropped
/// ([`kiln_api::coalesce_reports`]): after an outage the agent sends each instance's latest
/// state, not every step it went through. A call that gets no response is retried until the
/// control plane takes it. A batch that the control plane rejects with a 4xx response, or that
/// fails with [`SERVER_ERRORS_BEFORE_SPLIT`] server errors in a row, is sent again one report
/// at a time. Only the reports that fail then are dropped (logged), so one bad report cannot
/// block the others.
pub async fn run_reporter<C: ControlPlane>(
    control: C,
    outbox: mpsc::UnboundedReceiver<(InstanceId, ReportInstanceState)>,
    shared: Arc<Shared>,
) {
    let backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    run_reporter_with_backoff(control, outbox, shared, backoff).await;
}

/// Runs [`run_reporter`] with the retry delays of `backoff`.
pub async fn run_reporter_with_backoff<C: ControlPlane>(
    control: C,
    mut outbox: mpsc::UnboundedReceiver<(InstanceId, ReportInstanceState)>,
    shared: Arc<Shared>,
    mut backoff: Backoff,
) {
    let mut queued: VecDeque<InstanceStateReport> = VecDeque::new();
    // A control plane older than the batch endpoint responds to it with `not_found`. The
    // agent then sends one report per call for as long as it runs.
    let mut batches = true;
    let mut server_errors = 0;
    loop {
        if queued.is_empty() {
            let Some((instance, report)) = outbox.recv().await else {
                return;
            };
            queued.push_back(InstanceStateReport::new(instance, report));
        }
        while let Ok((instance, report)) = outbox.try_recv() {
            queued.push_back(InstanceStateReport::new(instance, report));
        }
        if queued.len() > 1 {
            queued = kiln_api::coalesce_reports(queued.into()).into();
        }
        let batch = next_batch(&mut queued);
        // A batch the control plane keeps failing on may hold the report that makes it fail,
        // so it goes one report at a time, where such a report is dropped in the end.
        if !batches || server_errors >= SERVER_ERRORS_BEFORE_SPLIT {
            server_errors = 0;
            for report in &batch.reports {
                report_one(&control, report, &shared, &mut backoff).await;
            }
            continue;
        }

        match control.report_batch(&batch).await {
            Ok(reported) => {
                shared.reachable.store(true, Ordering::Relaxed);
                backoff.reset();
                server_errors = 0;
                if !reported.unknown.is_empty() {
                    info!(instances = ?reported.unknown, "reports on instances the control plane no longer places here were dropped");
                }
            }
            Err(error) if rejects_request(&error) => {
                if error.code() == Some(ErrorCode::NotFound) {
                    warn!(error = %error_chain(&error), "the control plane has no batch endpoint for state reports; sending one report per call");
                    batches = false;
                } else {
                    warn!(reports = batch.reports.len(), error = %error_chain(&error), "state report batch rejected; sending its reports one by one");
                }
                for report in &batch.reports {
                    report_one(&control, report, &shared, &mut backoff).await;
                }
            }
            Err(error) => {
                shared.reachable.store(false, Ordering::Relaxed);
                if is_server_error(&error) {
                    server_errors += 1;
                }
                let delay = backoff.next_delay();
                warn!(reports = batch.reports.len(), error = %error_chain(&error), retry_in = ?delay, "state report failed");
                tokio::time::sleep(delay).await;
                // Back at the front, so the next attempt also takes what was queued meanwhile
                // and drops the states it supersedes.
                for report in batch.reports.into_iter().rev() {
                    queued.push_front(report);
                }
            }
        }
    }
}

/// Returns whether the request itself was rejected (a 4xx response other than a conflict, a
/// request timeout or too many requests), so sending it again cannot succeed. A proxy's 4xx
/// without Kiln's error body counts too. A server error (a database failover, for example) or
/// no response at all is retried, because dropping a report there would lose an exit.
fn rejects_request(error: &ClientError) -> bool {
    match error {
        ClientError::Api { body, .. } => {
            (400..500).contains(&body.code.http_status()) && !body.code.is_retryable()
        }
        ClientError::UnexpectedResponse { status, .. } => {
            (400..500).contains(status) && !matches!(status, 408 | 429)
        }
        _ => false,
    }
}

/// Returns whether the control plane responded with a 5xx status.
fn is_server_error(error: &ClientError) -> bool {
    match error {
        ClientError::Api { status, .. } | ClientError::UnexpectedResponse { status, .. } => {
            *status >= 500
        }
        _ => false,
    }
}

/// Takes the oldest queued reports that fit in one call.
fn next_batch(queued: &mut VecDeque<InstanceStateReport>) -> ReportInstanceStates {
    let mut reports = Vec::new();
    let mut bytes = 0;
    while let Some(report) = queued.front() {
        // Field names, ids and quoting add well under this much to each report.
        let size = 256
            + report.detail.as_ref().map_or(0, String::len)
            + report
                .output
                .iter()
                .map(|line| line.len() + 4)
                .sum::<usize>();
        let full = reports.len() >= REPORT_BATCH || bytes + size > REPORT_BATCH_BYTES;
        if full && !reports.is_empty() {
            break;
        }
        bytes += size;
        reports.extend(queued.pop_front());
    }
    ReportInstanceStates { reports }
}

/// Sends one report on its own, retrying while the control plane is unreachable. A report
/// the control plane rejects, or fails with a server error [`SERVER_ERRORS_BEFORE_SPLIT`]
/// times in a row, is dropped (logged), so it cannot hold up the reports behind it.
async fn report_one<C: ControlPlane>(
    control: &C,
    report: &InstanceStateReport,
    shared: &Shared,
    backoff: &mut Backoff,
) {
    let instance = report.instance_id;
    let single = ReportInstanceState {
        state: report.state,
        detail: report.detail.clone(),
        exit_code: report.exit_code,
        output: report.output.clone(),
    };
    let mut server_errors = 0;
    loop {
        match control.report(instance, &single).await {
            Ok(()) => {
                shared.reachable.store(true, Ordering::Relaxed);
                backoff.reset();
                return;
            }
            Err(error) if rejects_request(&error) => {
                warn!(%instance, state = ?single.state, error = %error_chain(&error), "state report rejected; dropped");
                return;
            }
            Err(error) => {
                shared.reachable.store(false, Ordering::Relaxed);
                if is_server_error(&error) {
                    server_errors += 1;
                    if server_errors >= SERVER_ERRORS_BEFORE_SPLIT {
                        error!(%instance, state = ?single.state, error = %error_chain(&error), "state report failed on every attempt with a server error; dropped");
                        return;
                    }
                }
                let delay = backoff.next_delay();
                warn!(%instance, error = %error_chain(&error), retry_in = ?delay, "state report failed");
                tokio::time::sleep(delay).await;
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

#[cfg(test)]
mod tests {
    use kiln_api::InstanceState;

    use super::*;

    fn queued(count: usize, output_bytes: usize) -> VecDeque<InstanceStateReport> {
        (0..count)
            .map(|_| InstanceStateReport {
                instance_id: InstanceId::new(),
                state: InstanceState::Exited,
                detail: None,
                exit_code: Some(1),
                output: vec!["x".repeat(output_bytes)],
            })
            .collect()
    }

    #[test]
    fn batches_stop_at_report_limit() {
        let mut reports = queued(REPORT_BATCH + 3, 10);
        let first = reports.front().map(|report| report.instance_id);

        let batch = next_batch(&mut reports);

        assert_eq!(batch.reports.len(), REPORT_BATCH);
        assert_eq!(batch.reports[0].instance_id, first.unwrap());
        assert_eq!(reports.len(), 3);
        assert_eq!(next_batch(&mut reports).reports.len(), 3);
        assert!(next_batch(&mut reports).reports.is_empty());
    }

    #[test]
    fn batches_stop_at_size_limit() {
        let mut reports = queued(40, 50 * 1024);
        let batch = next_batch(&mut reports);
        let bytes: usize = batch
            .reports
            .iter()
            .map(|report| serde_json::to_vec(report).unwrap().len())
            .sum();
        assert!(bytes <= REPORT_BATCH_BYTES, "{bytes}");
        assert!(batch.reports.len() < 40);

        // One report larger than the limit still goes out, alone.
        let mut huge = queued(2, REPORT_BATCH_BYTES + 1);
        assert_eq!(next_batch(&mut huge).reports.len(), 1);
        assert_eq!(huge.len(), 1);
    }
}
