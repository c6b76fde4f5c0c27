//! The reconcile loop and the executor: observe the VMs, [`plan`] against the desired
//! assignments, carry out each action, report every state change, write the status snapshot.
//!
//! Assignments arrive from a watcher task, and reports, heartbeats and log batches leave through
//! background tasks that retry with backoff, so an outage does not stall the loop. The one call
//! the loop makes itself is fetching an instance's secrets while starting it, bounded by the
//! client's request timeout. With the control plane unreachable, running instances keep running and the loop
//! keeps health-checking and restarting them from the last known assignments.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_api::InstanceState;
use kiln_api::types::{
    Assignment, DesiredState, HostAssignments, InstanceSecrets, MAX_REPORTED_OUTPUT_LINE_BYTES,
    ReportInstanceState,
};
use kiln_core::{HostId, InstanceId};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::config::LogConfig;
use crate::control::ControlPlane;
use crate::health::{DEFAULT_CHECK, diagnose, probe_within};
use crate::logs::LogSink;
use crate::plan::{Action, Phase, STABLE_AFTER, Tracked, plan, restart_delay};
use crate::records::{FinishedRun, InstanceRecord, StateDir, write_json};
use crate::runtime::{HostNetwork, Images, NetworkRequest, VmHandle, VmSpec, VmStatus, Vms};
use crate::status::{AgentStatus, InstanceStatus};
use crate::steps::{StepTimes, timed};

/// Size of an instance's writable disk, in MiB (sparse: it takes space only as it fills).
const WRITABLE_DISK_MIB: u64 = 1024;

/// Interval between health checks of an instance that has not passed one since it booted.
pub const STARTING_PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Timeout of those checks during the grace period.
pub const STARTING_PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// Health checks that must fail in a row, after the grace period, before an instance is
/// reported unhealthy. One slow response on a loaded host is not an outage, but three are.
/// They come an interval apart once the instance has passed a check, and every 100 ms
/// before that.
pub const UNHEALTHY_AFTER_FAILURES: u32 = 3;

/// Shortest sleep of the reconcile loop between passes.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(20);

/// State shared with the background tasks.
#[derive(Debug, Default)]
pub struct Shared {
    /// Whether the last control plane call succeeded.
    pub reachable: AtomicBool,
    /// The host id, once registered.
    pub host_id: Mutex<Option<HostId>>,
    /// The assignment cursor.
    pub cursor: AtomicU64,
    /// Number of microVMs running, for heartbeats.
    pub running: AtomicU32,
    /// Every instance's log, for the shipper.
    pub logs: Mutex<BTreeMap<InstanceId, LogSink>>,
}

/// The agent over a control plane `C`, images `I`, VMs `V` and host networking `N`.
pub struct Agent<C, I, V, N> {
    control: C,
    images: I,
    vms: V,
    network: N,
    state: StateDir,
    log_config: LogConfig,
    shared: Arc<Shared>,
    reports: mpsc::UnboundedSender<(InstanceId, ReportInstanceState)>,
    /// `None` until the first assignment set is known (from the watcher or from disk): until
    /// then nothing is stopped, so an agent restarted during an outage keeps every VM.
    desired: Option<BTreeMap<InstanceId, Assignment>>,
    tracked: BTreeMap<InstanceId, Tracked>,
    handles: BTreeMap<InstanceId, VmHandle>,
    reported: BTreeMap<InstanceId, (InstanceState, Option<String>)>,
    /// Exit code and output lines of the last terminal report, kept for run-once records.
    final_reports: BTreeMap<InstanceId, (Option<i32>, Vec<String>)>,
    /// Secret values, in memory only.
    secrets: BTreeMap<InstanceId, InstanceSecrets>,
}

impl<C, I, V, N> Agent<C, I, V, N>
where
    C: ControlPlane,
    I: Images,
    V: Vms,
    N: HostNetwork,
{
    /// Creates the agent and the receiving end of its report outbox (for
    /// [`crate::tasks::run_reporter`]).
    pub fn new(
        control: C,
        images: I,
        vms: V,
        network: N,
        state: StateDir,
        log_config: LogConfig,
        shared: Arc<Shared>,
    ) -> (
        Self,
        mpsc::UnboundedReceiver<(InstanceId, ReportInstanceState)>,
    ) {
        let (reports, outbox) = mpsc::unbounded_channel();
        let agent = Self {
            control,
            images,
            vms,
            network,
            state,
            log_config,
            shared,
            reports,
            desired: None,
            tracked: BTreeMap::new(),
            handles: BTreeMap::new(),
            reported: BTreeMap::new(),
            final_reports: BTreeMap::new(),
            secrets: BTreeMap::new(),
        };
        (agent, outbox)
    }

    /// Re-adopts the VMs recorded on disk and loads the last known assignments; returns the
    /// cursor to resume watching from.
    pub async fn readopt(&mut self) -> u64 {
        let now = Instant::now();
        let records = match self.state.load_records() {
            Ok(records) => records,
            Err(error) => {
                warn!(error = %error_chain(&error), "failed to load instance records");
                Vec::new()
            }
        };
        for record in records {
            let id = record.assignment.instance_id;
            if let Some(finished) = record.finished {
                self.readopt_finished(record.assignment, record.restarts, finished);
                continue;
            }
            let run_dir = self.state.run_dir(id);
            let sink = self.open_log(id);
            let adopted = match self.vms.adopt(id, &run_dir, sink).await {
                Ok(adopted) => adopted,
                Err(error) => {
                    warn!(instance = %id, error = %error_chain(&*error), "failed to adopt VM");
                    None
                }
            };
            let phase = match &adopted {
                Some(_) => Phase::Running,
                None => Phase::Exited { code: None },
            };
            info!(instance = %id, adopted = adopted.is_some(), "instance re-adopted from disk");
            let run_once_gone = adopted.is_none() && record.assignment.run_once;
            if let Some(handle) = adopted {
                self.handles.insert(id, handle);
            }
            self.tracked.insert(
                id,
                Tracked {
                    assignment: record.assignment,
                    phase,
                    booted_at: Some(now),
                    restarts: record.restarts,
                    next_start_at: None,
                    next_probe_at: Some(now),
                    probe_failures: 0,
                    has_resources: true,
                },
            );
            if run_once_gone {
                // Its exit code went with the agent that ran it; report the exit without one.
                let sink = self.log_sink(id);
                self.report_run_once_exit(id, None, sink.as_ref());
            }
        }
        if let Err(error) = self.sync_network().await {
            warn!(%error, "failed to restore the network of re-adopted instances");
        }

        match self.state.load_assignments() {
            Ok(Some(saved)) => {
                let cursor = saved.cursor;
                self.set_desired(saved);
                cursor
            }
            Ok(None) => 0,
            Err(error) => {
                warn!(error = %error_chain(&error), "failed to load saved assignments");
                0
            }
        }
    }

    /// Tracks a run-once instance that finished and was cleaned up before the agent stopped,
    /// and reports its result again in case the last report was lost with the old process.
    fn readopt_finished(&mut self, assignment: Assignment, restarts: u32, finished: FinishedRun) {
        let id = assignment.instance_id;
        let phase = match finished.state {
            InstanceState::Failed => Phase::Failed {
                reason: finished.detail.clone().unwrap_or_default(),
            },
            _ => Phase::Exited {
                code: finished.exit_code,
            },
        };
        info!(instance = %id, "finished run-once instance re-adopted from disk");
        self.open_log(id);
        self.tracked.insert(
            id,
            Tracked {
                assignment,
                phase,
                booted_at: None,
                restarts,
                next_start_at: None,
                next_probe_at: None,
                probe_failures: 0,
                has_resources: false,
            },
        );
        self.report_output(
            id,
            finished.state,
            finished.detail,
            finished.exit_code,
            finished.output,
        );
    }

    /// Replaces the desired assignment set.
    pub fn set_desired(&mut self, assignments: HostAssignments) {
        self.shared
            .cursor
            .store(assignments.cursor, Ordering::Relaxed);
        self.desired = Some(
            assignments
                .assignments
                .into_iter()
                .map(|assignment| (assignment.instance_id, assignment))
                .collect(),
        );
    }

    /// Runs the loop until `shutdown` resolves. VMs keep running after the agent stops.
    ///
    /// A pass runs when the assignments change, when a probe, restart or kill deadline is
    /// due, and at the latest every `tick`.
    pub async fn run(
        mut self,
        mut assignments: watch::Receiver<Option<HostAssignments>>,
        shutdown: impl std::future::Future<Output = ()>,
        tick: Duration,
    ) {
        tokio::pin!(shutdown);
        loop {
            self.reconcile_once(Instant::now()).await;
            self.write_status();
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                changed = assignments.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let latest = assignments.borrow_and_update().clone();
                    if let Some(latest) = latest {
                        if let Err(error) = self.state.save_assignments(&latest) {
                            warn!(error = %error_chain(&error), "failed to save assignments");
                        }
                        self.set_desired(latest);
                    }
                }
                () = tokio::time::sleep(self.next_pass_in(Instant::now(), tick)) => {}
            }
        }
        info!("agent stopping; microVMs keep running");
    }

    /// Returns how long the loop may sleep before something tracked is due, at most `tick`.
    ///
    /// Only deadlines the next pass acts on count: a restart of an instance that should run,
    /// and a kill deadline still ahead (a failed kill is retried at the pace of `tick`).
    fn next_pass_in(&self, now: Instant, tick: Duration) -> Duration {
        let wants_running = |id: &InstanceId| {
            self.desired
                .as_ref()
                .and_then(|desired| desired.get(id))
                .is_some_and(|assignment| assignment.desired == DesiredState::Running)
        };
        let due = self
            .tracked
            .iter()
            .filter_map(|(id, tracked)| match tracked.phase {
                Phase::Stopping { deadline } => Some(deadline).filter(|at| *at > now),
                Phase::Exited { .. } | Phase::Failed { .. } => {
                    tracked.next_start_at.filter(|_| wants_running(id))
                }
                Phase::Running | Phase::Healthy | Phase::Unhealthy => tracked.next_probe_at,
            });
        due.map(|at| at.saturating_duration_since(now))
            .fold(tick, Duration::min)
            .max(MIN_PASS_INTERVAL)
    }

    /// Runs one reconcile pass: observe, plan, execute.
    pub async fn reconcile_once(&mut self, now: Instant) {
        self.observe(now).await;
        let Some(desired) = &self.desired else {
            // Without an assignment set, only keep what runs healthy-checked.
            let probes: Vec<InstanceId> = self
                .tracked
                .iter()
                .filter(|(_, t)| t.phase.has_vm() && t.next_probe_at.is_none_or(|d| d <= now))
                .map(|(id, _)| *id)
                .collect();
            for id in probes {
                self.probe(id, now).await;
            }
            return;
        };
        let actions = plan(desired, &self.tracked, now);
        for action in actions {
            self.execute(action, now).await;
        }
    }

    /// Returns the state shared with the background tasks.
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Returns the tracked instances (for tests and status).
    pub fn tracked(&self) -> &BTreeMap<InstanceId, Tracked> {
        &self.tracked
    }

    async fn execute(&mut self, action: Action, now: Instant) {
        match action {
            Action::Start(id) => self.start(id, now).await,
            Action::Probe(id) => self.probe(id, now).await,
            Action::Stop(id) => self.stop(id, now).await,
            Action::Kill(id) => self.kill(id).await,
            Action::Cleanup(id) => self.cleanup(id).await,
            Action::Forget(id) => self.forget(id),
        }
    }

    /// Polls every VM and moves exited ones to `Exited`, scheduling a restart with backoff.
    async fn observe(&mut self, now: Instant) {
        let ids: Vec<InstanceId> = self.handles.keys().copied().collect();
        for id in ids {
            let Some(handle) = self.handles.get(&id) else {
                continue;
            };
            let status = match self.vms.status(handle).await {
                Ok(status) => status,
                Err(error) => {
                    warn!(instance = %id, error = %error_chain(&*error), "failed to observe VM");
                    continue;
                }
            };
            let sink = self.log_sink(id);
            let Some(tracked) = self.tracked.get_mut(&id) else {
                continue;
            };
            if status == VmStatus::Running {
                if tracked
                    .booted_at
                    .is_some_and(|at| now.duration_since(at) >= STABLE_AFTER)
                {
                    tracked.restarts = 0;
                }
                continue;
            }

            let VmStatus::Exited { code } = status else {
                continue;
            };
            self.handles.remove(&id);
            if tracked.assignment.run_once {
                tracked.phase = Phase::Exited { code };
                tracked.booted_at = None;
                self.report_run_once_exit(id, code, sink.as_ref());
                continue;
            }
            let was_stopping = matches!(tracked.phase, Phase::Stopping { .. });
            tracked.phase = Phase::Exited { code };
            tracked.booted_at = None;
            let wants_running = self
                .desired
                .as_ref()
                .and_then(|desired| desired.get(&id))
                .is_some_and(|a| a.desired == DesiredState::Running);
            let mut detail = match code {
                Some(code) => format!("exited with code {code}"),
                None => "the VM stopped".to_owned(),
            };
            if wants_running && !was_stopping {
                tracked.restarts += 1;
                let delay = restart_delay(tracked.restarts);
                tracked.next_start_at = Some(now + delay);
                detail.push_str(&format!(
                    "; restart {} in {}s",
                    tracked.restarts,
                    delay.as_secs()
                ));
                if tracked.is_crash_looping() {
                    detail = format!("crash loop: {detail}");
                    if let Some(sink) = &sink {
                        let tail = sink.tail();
                        let last = tail.iter().rev().take(5).rev().cloned().collect::<Vec<_>>();
                        if !last.is_empty() {
                            detail.push_str(&format!("; last lines: {}", last.join(" | ")));
                        }
                    }
                }
            }
            let restarts = tracked.restarts;
            let assignment = tracked.assignment.clone();
            info!(instance = %id, ?code, restarts, "VM exited");
            self.save_record(&assignment, None, restarts);
            let state = if detail.starts_with("crash loop") {
                InstanceState::Failed
            } else {
                InstanceState::Exited
            };
            self.report(id, state, Some(detail), code);
        }
    }

    /// Reports how a run-once instance ended: its exit code and last output lines. It is not
    /// restarted; the next pass cleans it up.
    fn report_run_once_exit(&mut self, id: InstanceId, code: Option<i32>, sink: Option<&LogSink>) {
        let detail = match code {
            Some(code) => format!("release command exited with code {code}"),
            None => "release command's VM stopped without an exit code".to_owned(),
        };
        let output = sink.map_or_else(Vec::new, |sink| {
            sink.output_tail(MAX_REPORTED_OUTPUT_LINE_BYTES)
        });
        info!(instance = %id, ?code, "run-once instance exited");
        self.report_output(id, InstanceState::Exited, Some(detail), code, output);
    }

    async fn start(&mut self, id: InstanceId, now: Instant) {
        let Some(assignment) = self.desired.as_ref().and_then(|d| d.get(&id)).cloned() else {
            return;
        };
        let restarts = self.tracked.get(&id).map_or(0, |t| t.restarts);
        self.tracked.insert(
            id,
            Tracked {
                assignment: assignment.clone(),
                phase: Phase::Failed {
                    reason: "starting".to_owned(),
                },
                booted_at: None,
                restarts,
                next_start_at: None,
                next_probe_at: None,
                probe_failures: 0,
                has_resources: true,
            },
        );
        self.report(id, InstanceState::Preparing, None, None);

        match self.boot(&assignment).await {
            Ok(handle) => {
                self.save_record(&assignment, Some(handle.clone()), restarts);
                self.handles.insert(id, handle);
                // The boot took a while: the grace period counts from its end, not from the
                // start of this pass. The first health check is due at once.
                let booted = Instant::now().max(now);
                if let Some(tracked) = self.tracked.get_mut(&id) {
                    tracked.phase = Phase::Running;
                    tracked.booted_at = Some(booted);
                    tracked.next_probe_at = Some(now);
                    tracked.probe_failures = 0;
                }
                info!(instance = %id, "instance booted");
                self.report(id, InstanceState::Running, None, None);
            }
            Err(reason) => {
                warn!(instance = %id, %reason, "instance failed to start");
                let sink = self.log_sink(id);
                if let Some(sink) = &sink {
                    sink.agent_line(&format!("start failed: {reason}"));
                }
                if assignment.run_once {
                    // Never retried: the release command's deploy fails with this reason.
                    if let Some(tracked) = self.tracked.get_mut(&id) {
                        tracked.phase = Phase::Failed {
                            reason: reason.clone(),
                        };
                    }
                    let output = sink.map_or_else(Vec::new, |sink| {
                        sink.output_tail(MAX_REPORTED_OUTPUT_LINE_BYTES)
                    });
                    self.report_output(id, InstanceState::Failed, Some(reason), None, output);
                    return;
                }
                if let Some(tracked) = self.tracked.get_mut(&id) {
                    tracked.restarts += 1;
                    tracked.next_start_at = Some(now + restart_delay(tracked.restarts));
                    tracked.phase = Phase::Failed {
                        reason: reason.clone(),
                    };
                }
                self.report(id, InstanceState::Failed, Some(reason), None);
            }
        }
    }

    /// Runs the named steps of a start; each failure names its step. Resources made before a
    /// failure stay until the instance is cleaned up or started again (they are reused).
    ///
    /// The image, the writable disk, the secrets and the network do not depend on each other,
    /// so they are prepared concurrently. The step durations go to the instance's log as one
    /// line.
    async fn boot(&mut self, assignment: &Assignment) -> Result<VmHandle, String> {
        let id = assignment.instance_id;
        let mut steps = StepTimes::new();

        let run_dir = self.state.run_dir(id);
        let restarts = self.tracked.get(&id).map_or(0, |t| t.restarts);
        // The record exists before the VM does: a restarted agent then finds the VM through
        // its run directory and never boots a second one.
        let began = Instant::now();
        self.state
            .save_record(&InstanceRecord {
                assignment: assignment.clone(),
                vm: None,
                restarts,
                finished: None,
            })
            .map_err(|error| format!("saving the instance record: {}", error_chain(&error)))?;
        steps.record("record", began.elapsed());

        let disk = run_dir.join("disk.ext4");
        let requests = self.network_requests();
        let cached_secrets = self
            .secrets
            .get(&id)
            .filter(|cached| cached.secrets_version == assignment.secrets_version)
            .cloned();
        let control = &self.control;
        let fetch_secrets = async {
            if assignment.secrets_version == 0 {
                return Ok(None);
            }
            if let Some(cached) = cached_secrets {
                return Ok(Some(cached));
            }
            control.secrets(id).await.map(Some)
        };
        let (
            (image, image_time),
            (created, disk_time),
            (secrets, secrets_time),
            (networks, network_time),
        ) = tokio::join!(
            timed(self.images.prepare(&assignment.image)),
            timed(self.images.create_disk(&disk, WRITABLE_DISK_MIB)),
            timed(fetch_secrets),
            timed(self.network.apply(&requests)),
        );
        steps.record("image", image_time);
        steps.record("disk", disk_time);
        steps.record("secrets", secrets_time);
        steps.record("network", network_time);

        let image = image.map_err(|error| {
            format!(
                "preparing image {}: {}",
                assignment.image.digest,
                error_chain(&*error)
            )
        })?;
        created.map_err(|error| format!("creating the writable disk: {}", error_chain(&*error)))?;
        let secrets =
            secrets.map_err(|error| format!("fetching secrets: {}", error_chain(&error)))?;
        if let Some(secrets) = &secrets {
            self.secrets.insert(id, secrets.clone());
        }
        let networks = networks
            .map_err(|error| format!("setting up the network: {}", error_chain(&*error)))?;
        let network = networks
            .get(&id)
            .cloned()
            .ok_or_else(|| "setting up the network: no TAP for the instance".to_owned())?;

        let mut env = image.env.clone();
        env.extend(assignment.env_vars.clone());
        // The instance's identity, set last so neither the image nor the config can fake it.
        env.insert("KILN_APP".to_owned(), assignment.app.to_string());
        env.insert("KILN_ENV".to_owned(), assignment.env.to_string());
        env.insert(
            "KILN_RELEASE".to_owned(),
            format!("v{}", assignment.release_version),
        );
        env.insert("KILN_INSTANCE".to_owned(), id.to_string());
        env.insert("KILN_PROCESS".to_owned(), assignment.process.to_string());
        let command = if assignment.command.is_empty() {
            image.default_command.clone()
        } else {
            assignment.command.clone()
        };
        let logs = self.open_log(id);
        self.report(id, InstanceState::Booting, None, None);
        let spec = VmSpec {
            instance: id,
            run_dir,
            vcpus: assignment.vcpus,
            memory_mib: assignment.memory_mib,
            image,
            disk,
            network,
            command,
            env,
            secrets,
            startup_scripts: assignment
                .startup_scripts
                .iter()
                .map(|script| kiln_vmm::proto::StartupScript {
                    command: script.command.clone(),
                    timeout_secs: script.timeout_secs,
                })
                .collect(),
            kill_signal: assignment.kill_signal.clone(),
            logs,
        };
        let (booted, boot_time) = timed(self.vms.boot(spec)).await;
        steps.record("vm boot", boot_time);
        let handle =
            booted.map_err(|error| format!("booting the microVM: {}", error_chain(&*error)))?;
        info!(instance = %id, steps = %steps.summary(), "start steps done");
        if let Some(sink) = self.log_sink(id) {
            sink.agent_line(&steps.summary());
        }
        Ok(handle)
    }

    async fn probe(&mut self, id: InstanceId, now: Instant) {
        let Some(tracked) = self.tracked.get(&id) else {
            return;
        };
        let assignment = &tracked.assignment;
        let port = assignment
            .ports
            .iter()
            .find(|port| port.health_check.is_some())
            .or_else(|| assignment.ports.first())
            .cloned();
        let Some(port) = port else {
            // Nothing to check: a process without ports is healthy while it runs.
            if tracked.phase == Phase::Running {
                self.set_phase(id, Phase::Healthy, None);
            }
            if let Some(tracked) = self.tracked.get_mut(&id) {
                tracked.next_probe_at = Some(now + Duration::from_secs(5));
            }
            return;
        };
        let check = port.health_check.clone().unwrap_or(DEFAULT_CHECK);
        let target = std::net::SocketAddr::new(assignment.network.ipv6.into(), port.port);
        let grace = Duration::from_secs(u64::from(check.grace_period_secs));
        let in_grace = tracked
            .booted_at
            .is_some_and(|at| now.duration_since(at) < grace);
        let interval = Duration::from_secs(u64::from(check.interval_secs.max(1)));
        let mut timeout = Duration::from_secs(u64::from(check.timeout_secs.max(1)));
        // Until the first check passes, probe often with a short timeout, so the instance is
        // healthy soon after the app listens instead of up to a whole interval later. A
        // short timeout fails fast while the guest's network is not up yet, because the
        // host's neighbor solicitations go unanswered until then. After the grace period the
        // full timeout applies, so a slow app is never judged by the short one.
        let starting = tracked.phase == Phase::Running;
        if starting && in_grace {
            timeout = timeout.min(STARTING_PROBE_TIMEOUT);
        }
        let result = probe_within(target, &check, timeout, assignment.hostname.as_deref()).await;

        let next_in = if starting && result.is_err() {
            interval.min(STARTING_PROBE_INTERVAL)
        } else {
            interval
        };
        let mut failures = 0;
        if let Some(tracked) = self.tracked.get_mut(&id) {
            tracked.next_probe_at = Some(now + next_in);
            tracked.probe_failures = match (&result, in_grace) {
                (Ok(()), _) => 0,
                (Err(_), true) => tracked.probe_failures,
                (Err(_), false) => tracked.probe_failures.saturating_add(1),
            };
            failures = tracked.probe_failures;
        }
        match result {
            Ok(()) => self.set_phase(id, Phase::Healthy, None),
            Err(_) if in_grace => {}
            Err(failure) if failures < UNHEALTHY_AFTER_FAILURES => {
                debug!(instance = %id, failures, %failure, "health check failed");
            }
            Err(failure) => {
                let explanation = match self.handles.get(&id) {
                    Some(handle) => match self.vms.listening_sockets(handle).await {
                        Ok(sockets) => diagnose(port.port, &sockets),
                        Err(error) => {
                            format!("listening sockets unknown: {}", error_chain(&*error))
                        }
                    },
                    None => "the VM is not running".to_owned(),
                };
                let detail = format!("health check failed: {failure}; {explanation}");
                self.set_phase(id, Phase::Unhealthy, Some(detail));
            }
        }
    }

    async fn stop(&mut self, id: InstanceId, now: Instant) {
        let Some(tracked) = self.tracked.get(&id) else {
            return;
        };
        let signal = tracked.assignment.kill_signal.clone();
        let timeout = Duration::from_secs(u64::from(tracked.assignment.kill_timeout_secs));
        if let Some(handle) = self.handles.get(&id)
            && let Err(error) = self.vms.stop(handle, timeout).await
        {
            warn!(instance = %id, error = %error_chain(&*error), "stop signal failed; killing at the deadline");
        }
        info!(instance = %id, %signal, ?timeout, "instance stopping");
        self.set_phase(
            id,
            Phase::Stopping {
                deadline: now + timeout,
            },
            None,
        );
    }

    async fn kill(&mut self, id: InstanceId) {
        if let Some(handle) = self.handles.get(&id) {
            if let Err(error) = self.vms.kill(handle).await {
                warn!(instance = %id, error = %error_chain(&*error), "failed to kill VM");
                return;
            }
            info!(instance = %id, "kill timeout passed; VM stopped hard");
        }
    }

    async fn cleanup(&mut self, id: InstanceId) {
        let mut run_once = None;
        if let Some(tracked) = self.tracked.get_mut(&id) {
            tracked.has_resources = false;
            if tracked.assignment.run_once {
                run_once = Some((tracked.assignment.clone(), tracked.restarts));
            }
        }
        self.secrets.remove(&id);
        if let Err(error) = self.sync_network().await {
            warn!(instance = %id, %error, "failed to remove the instance's network");
        }

        // A run-once instance keeps its record, with its result, until it is no longer
        // assigned: an agent restarted in between must not run it again.
        let removed = match run_once {
            Some((assignment, restarts)) => {
                let record = InstanceRecord {
                    assignment,
                    vm: None,
                    restarts,
                    finished: self.finished_run(id),
                };
                self.state
                    .save_record(&record)
                    .and_then(|()| self.state.remove_run_files(id))
            }
            None => self.state.remove_run_dir(id),
        };
        if let Err(error) = removed {
            warn!(instance = %id, error = %error_chain(&error), "failed to remove run directory");
        }
        info!(instance = %id, "instance cleaned up");
    }

    /// The last reported result of a run-once instance, for its record.
    fn finished_run(&self, id: InstanceId) -> Option<FinishedRun> {
        let (state, detail) = self.reported.get(&id)?.clone();
        let (exit_code, output) = self.final_reports.get(&id).cloned().unwrap_or_default();
        Some(FinishedRun {
            state,
            detail,
            exit_code,
            output,
        })
    }

    fn forget(&mut self, id: InstanceId) {
        self.tracked.remove(&id);
        self.reported.remove(&id);
        self.final_reports.remove(&id);
        self.lock_logs().remove(&id);
        if let Err(error) = self.state.remove_logs(id) {
            warn!(instance = %id, error = %error_chain(&error), "failed to remove logs");
        }
        // A run-once instance's record outlives its cleanup; nothing else is left by now.
        if let Err(error) = self.state.remove_run_dir(id) {
            warn!(instance = %id, error = %error_chain(&error), "failed to remove run directory");
        }
    }

    /// Applies the network of every instance that has or is about to get a VM.
    async fn sync_network(
        &mut self,
    ) -> Result<BTreeMap<InstanceId, crate::runtime::GuestNetwork>, String> {
        let requests = self.network_requests();
        self.network
            .apply(&requests)
            .await
            .map_err(|error| format!("setting up the network: {}", error_chain(&*error)))
    }

    /// Returns the network of every instance that has or is about to get a VM.
    fn network_requests(&self) -> Vec<NetworkRequest> {
        self.tracked
            .values()
            .filter(|tracked| tracked.has_resources)
            .map(|tracked| NetworkRequest {
                instance: tracked.assignment.instance_id,
                org: tracked.assignment.org_id,
                ipv6: tracked.assignment.network.ipv6,
                ipv4: tracked.assignment.network.ipv4,
            })
            .collect()
    }

    fn set_phase(&mut self, id: InstanceId, phase: Phase, detail: Option<String>) {
        let Some(tracked) = self.tracked.get_mut(&id) else {
            return;
        };
        tracked.phase = phase.clone();
        let state = match phase {
            Phase::Running => InstanceState::Running,
            Phase::Healthy => InstanceState::Healthy,
            Phase::Unhealthy => InstanceState::Unhealthy,
            Phase::Stopping { .. } => InstanceState::Stopping,
            Phase::Exited { .. } => InstanceState::Exited,
            Phase::Failed { .. } => InstanceState::Failed,
        };
        self.report(id, state, detail, None);
    }

    /// Queues a report unless it repeats the last one.
    fn report(
        &mut self,
        id: InstanceId,
        state: InstanceState,
        detail: Option<String>,
        exit_code: Option<i32>,
    ) {
        self.report_output(id, state, detail, exit_code, Vec::new());
    }

    /// Queues a report with the last output lines of a run-once instance, unless it repeats
    /// the last report.
    fn report_output(
        &mut self,
        id: InstanceId,
        state: InstanceState,
        detail: Option<String>,
        exit_code: Option<i32>,
        output: Vec<String>,
    ) {
        let current = (state, detail.clone());
        if self.reported.get(&id) == Some(&current) {
            return;
        }
        self.reported.insert(id, current);
        if let Some(sink) = self.log_sink(id) {
            let text = match &detail {
                Some(detail) => format!("state {state:?}: {detail}"),
                None => format!("state {state:?}"),
            };
            sink.agent_line(&text);
        }
        if state.is_terminal() {
            self.final_reports.insert(id, (exit_code, output.clone()));
        }
        let report = ReportInstanceState {
            state,
            detail,
            exit_code,
            output,
        }
        .within_limits();
        // The reporter task ends only when the agent does.
        let _ = self.reports.send((id, report));
    }

    fn save_record(&self, assignment: &Assignment, vm: Option<VmHandle>, restarts: u32) {
        let record = InstanceRecord {
            assignment: assignment.clone(),
            vm,
            restarts,
            finished: None,
        };
        if let Err(error) = self.state.save_record(&record) {
            warn!(instance = %assignment.instance_id, error = %error_chain(&error), "failed to save instance record");
        }
    }

    fn open_log(&self, id: InstanceId) -> LogSink {
        if let Some(sink) = self.log_sink(id) {
            return sink;
        }
        let dir = self.state.log_dir(id);
        let sink = match LogSink::open(&dir, id, self.log_config.clone()) {
            Ok(sink) => sink,
            Err(error) => {
                warn!(instance = %id, dir = %dir.display(), %error, "failed to open log directory; logging to a temporary one");
                let fallback = std::env::temp_dir().join(format!("kiln-agent-log-{id}"));
                match LogSink::open(&fallback, id, self.log_config.clone()) {
                    Ok(sink) => sink,
                    Err(_) => return LogSink::discard(id),
                }
            }
        };
        self.lock_logs().insert(id, sink.clone());
        sink
    }

    fn log_sink(&self, id: InstanceId) -> Option<LogSink> {
        self.lock_logs().get(&id).cloned()
    }

    fn lock_logs(&self) -> std::sync::MutexGuard<'_, BTreeMap<InstanceId, LogSink>> {
        self.shared
            .logs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Builds the status snapshot.
    pub fn status(&self) -> AgentStatus {
        let now = Instant::now();
        let instances = self
            .tracked
            .iter()
            .map(|(id, tracked)| {
                let assignment = &tracked.assignment;
                let (state, detail) = match self.reported.get(id) {
                    Some((state, detail)) => (*state, detail.clone()),
                    None => (InstanceState::Pending, None),
                };
                InstanceStatus {
                    id: *id,
                    env: format!("{}/{}/{}", assignment.org, assignment.app, assignment.env),
                    process: assignment.process.to_string(),
                    release_version: assignment.release_version,
                    state,
                    crash_loop: tracked.is_crash_looping(),
                    detail,
                    ipv6: assignment.network.ipv6,
                    ipv4: assignment.network.ipv4,
                    uptime_secs: tracked.booted_at.map(|at| now.duration_since(at).as_secs()),
                    restarts: tracked.restarts,
                    dropped_log_lines: self.log_sink(*id).map_or(0, |sink| sink.dropped_total()),
                }
            })
            .collect();
        AgentStatus {
            time: OffsetDateTime::now_utc(),
            pid: std::process::id(),
            host_id: *self
                .shared
                .host_id
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            control_plane_reachable: self.shared.reachable.load(Ordering::Relaxed),
            cursor: self.shared.cursor.load(Ordering::Relaxed),
            instances,
        }
    }

    fn write_status(&self) {
        let running = self.tracked.values().filter(|t| t.phase.has_vm()).count();
        self.shared.running.store(
            u32::try_from(running).unwrap_or(u32::MAX),
            Ordering::Relaxed,
        );
        let path = self.state.status_file();
        if let Err(error) = write_json(&path, &self.status()) {
            warn!(error = %error_chain(&error), "failed to write status file");
        }
    }
}

/// Formats an error and its sources as one line.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
