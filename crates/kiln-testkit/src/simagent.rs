//! A simulated host agent for control-plane tests: it speaks the real host API over HTTP
//! (register, heartbeat, watch assignments, report instance states) but boots no microVM.
//!
//! Orchestration tests run many of these against a real `kiln-control` to drive deploys end to
//! end in seconds. What an instance does after it is assigned (become healthy, fail its health
//! check, exit) is chosen per assignment by the test, so rollbacks can be provoked. The real
//! agent has its own tests with real microVMs; this fixture replaces it only where the
//! subject under test is the control plane.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kiln_api::{
    Assignment, AssignmentsQuery, Client, ClientError, DesiredState, Heartbeat, HostAssignments,
    HostCapacity, HostLease, InstanceState, InstanceStateReport, RegisterHost,
    ReportInstanceStates, VmmDriver,
};
use kiln_core::InstanceId;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Attempts at sending one batch of state reports before giving up.
const REPORT_ATTEMPTS: u32 = 150;

/// Most state reports sent in one call: the control plane's limit, as the real agent uses.
const REPORT_BATCH: usize = kiln_api::MAX_STATE_REPORTS;

/// Pause between report attempts.
const REPORT_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The behavior of a simulated instance once it is assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Reports preparing, booting, running, then healthy.
    Healthy,
    /// Like [`Outcome::Healthy`], but reports healthy only after `delay`: an instance that
    /// takes a while to boot, so a test can act while a deploy waits on it.
    HealthyAfter {
        /// Time between the running report and the healthy report.
        delay: Duration,
    },
    /// Reports preparing, booting, running, then unhealthy, and stays up.
    Unhealthy,
    /// Reports preparing, then failed with exit code 1.
    Fail,
    /// Reports preparing, booting, running, then exited with `code` and two output lines (the
    /// second names the code): a one-shot release command.
    Exit {
        /// The exit code reported.
        code: i32,
    },
    /// Reports preparing, booting, running, and nothing more until it is stopped: a release
    /// command that never finishes.
    Hang,
    /// Like [`Outcome::Exit`], but reports the exit only after `delay`: a release command that
    /// takes a while.
    ExitAfter {
        /// The exit code reported.
        code: i32,
        /// Time between the running report and the exit report.
        delay: Duration,
    },
}

/// Output lines a simulated run-once instance reports when it exits with `code`.
pub fn exit_output(code: i32) -> Vec<String> {
    vec![
        "simulated release command".to_owned(),
        format!("exiting with code {code}"),
    ]
}

/// Chooses the outcome of each assignment.
pub type Behavior = Arc<dyn Fn(&Assignment) -> Outcome + Send + Sync>;

/// Settings of a simulated agent.
#[derive(Clone)]
pub struct SimAgentConfig {
    /// Capacity it registers with.
    pub capacity: HostCapacity,
    /// Time between heartbeats.
    pub heartbeat_interval: Duration,
    /// Long-poll wait of each assignments watch, in seconds.
    pub watch_wait_secs: u64,
    /// Outcome of each assignment. The default makes run-once instances exit 0 and every
    /// other instance healthy.
    pub behavior: Behavior,
}

impl Default for SimAgentConfig {
    fn default() -> Self {
        Self {
            capacity: HostCapacity {
                vcpus: 16,
                memory_mib: 64 * 1024,
            },
            heartbeat_interval: Duration::from_millis(500),
            watch_wait_secs: 5,
            behavior: Arc::new(|assignment| {
                if assignment.run_once {
                    Outcome::Exit { code: 0 }
                } else {
                    Outcome::Healthy
                }
            }),
        }
    }
}

/// Error returned when a simulated agent cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SimAgentError {
    /// The client could not be built.
    #[error("failed to create the API client for {url}")]
    Client {
        /// Base URL of the control plane.
        url: String,
        /// The client error.
        #[source]
        source: ClientError,
    },
    /// Registration was rejected or failed.
    #[error("failed to register the simulated host")]
    Register(#[source] ClientError),
}

/// The simulated host's instances, as last reported to the control plane.
#[derive(Debug, Clone, Default)]
struct SimState {
    /// Instances it reported as started, with their last reported state.
    instances: BTreeMap<InstanceId, InstanceState>,
    /// Assignments seen, counted per instance: more than one means a duplicate start.
    starts: BTreeMap<InstanceId, u32>,
}

/// A running simulated agent. Dropping it stops its tasks, like a host that loses power.
pub struct SimAgent {
    lease: HostLease,
    state: Arc<Mutex<SimState>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl SimAgent {
    /// Registers with the control plane at `base_url` using a host token, then heartbeats and
    /// watches assignments in background tasks.
    pub async fn start(
        base_url: &str,
        host_token: &str,
        config: SimAgentConfig,
    ) -> Result<Self, SimAgentError> {
        let client = Client::new(base_url, host_token).map_err(|source| SimAgentError::Client {
            url: base_url.to_owned(),
            source,
        })?;

        let endpoint = SocketAddr::from(([127, 0, 0, 1], 51820));
        let lease = client
            .register_host(&RegisterHost {
                capacity: config.capacity,
                driver: VmmDriver::Qemu,
                overlay_public_key: "c2ltdWxhdGVkLWhvc3Qta2V5LXBsYWNlaG9sZGVyMDA=".to_owned(),
                overlay_endpoint: endpoint,
            })
            .await
            .map_err(SimAgentError::Register)?;

        let state = Arc::new(Mutex::new(SimState::default()));
        let (shutdown, stopped) = watch::channel(false);
        let (outbox, queued) = mpsc::unbounded_channel();
        let reporter = Reporter {
            outbox,
            state: Arc::clone(&state),
        };
        let tasks = vec![
            tokio::spawn(heartbeat_loop(
                client.clone(),
                config.heartbeat_interval,
                Arc::clone(&state),
                stopped.clone(),
            )),
            tokio::spawn(report_loop(client.clone(), queued, stopped.clone())),
            tokio::spawn(watch_loop(client, config, reporter, stopped)),
        ];

        Ok(Self {
            lease,
            state,
            shutdown,
            tasks,
        })
    }

    /// The lease returned at registration, with the host record.
    pub fn lease(&self) -> &HostLease {
        &self.lease
    }

    /// Instances the host runs now (started and not yet reported stopped or failed).
    pub fn running(&self) -> BTreeSet<InstanceId> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state
            .instances
            .iter()
            .filter(|(_, state)| !state.is_terminal())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Instances the host was assigned more than once: each is a duplicate start.
    pub fn duplicate_starts(&self) -> Vec<InstanceId> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state
            .starts
            .iter()
            .filter(|(_, count)| **count > 1)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Stops heartbeating and watching, so the host's lease expires.
    pub async fn power_off(mut self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn heartbeat_loop(
    client: Client,
    interval: Duration,
    state: Arc<Mutex<SimState>>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let running = {
            let state = state.lock().unwrap_or_else(PoisonError::into_inner);
            state
                .instances
                .values()
                .filter(|state| !state.is_terminal())
                .count()
        };
        let heartbeat = Heartbeat {
            running_instances: u32::try_from(running).unwrap_or(u32::MAX),
        };
        if let Err(error) = client.heartbeat(&heartbeat).await {
            tracing::warn!(error = %error, "simulated heartbeat failed");
        }

        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stopped.changed() => return,
        }
    }
}

async fn watch_loop(
    client: Client,
    config: SimAgentConfig,
    reporter: Reporter,
    mut stopped: watch::Receiver<bool>,
) {
    // The first call requests the complete set and later ones the changes, which are applied
    // to the set held here, as the real agent does.
    let mut current: Option<HostAssignments> = None;
    loop {
        let query = AssignmentsQuery {
            after: Some(current.as_ref().map_or(0, |set| set.cursor)),
            wait: Some(config.watch_wait_secs),
            changes: Some(current.is_some()),
        };
        let page = tokio::select! {
            page = client.watch_assignments(&query) => page,
            _ = stopped.changed() => return,
        };
        let page = match page {
            Ok(page) => page,
            Err(error) => {
                tracing::warn!(error = %error, "simulated assignments watch failed");
                // A bounded pause before retrying, so a down control plane is not hammered.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    _ = stopped.changed() => return,
                }
            }
        };
        let set = match current.take() {
            Some(mut set) => {
                set.apply(page);
                set
            }
            None => page,
        };
        reconcile(&config, &reporter, &set.assignments);
        current = Some(set);
    }
}

/// Brings the simulated host to the complete desired set: starts what is new, stops what is
/// marked stopped, and drops instances no longer assigned.
fn reconcile(config: &SimAgentConfig, reporter: &Reporter, assignments: &[Assignment]) {
    let state = &reporter.state;
    let assigned: BTreeSet<InstanceId> = assignments.iter().map(|a| a.instance_id).collect();
    // An instance that left the set while up (its environment was deleted) is stopped and
    // reported exited, as the real agent does, before it is forgotten.
    let dropped: Vec<InstanceId> = {
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        let live = state
            .instances
            .iter()
            .filter(|(id, current)| !assigned.contains(id) && !current.is_terminal())
            .map(|(id, _)| *id)
            .collect();
        state.instances.retain(|id, _| assigned.contains(id));
        live
    };
    for id in dropped {
        reporter.report(id, Report::new(InstanceState::Stopping, None));
        reporter.report(id, Report::new(InstanceState::Exited, Some(0)));
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        state.instances.remove(&id);
    }

    for assignment in assignments {
        let known = {
            let state = state.lock().unwrap_or_else(PoisonError::into_inner);
            state.instances.get(&assignment.instance_id).copied()
        };
        match (assignment.desired, known) {
            (DesiredState::Running, None) => {
                {
                    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
                    *state.starts.entry(assignment.instance_id).or_default() += 1;
                    state
                        .instances
                        .insert(assignment.instance_id, InstanceState::Pending);
                }
                // Each instance boots in a task of its own, as microVMs boot in parallel on a
                // real host. It was recorded as pending above, so it is never booted twice.
                let outcome = (config.behavior)(assignment);
                tokio::spawn(boot(reporter.clone(), assignment.instance_id, outcome));
            }
            (DesiredState::Stopped, Some(current)) if !current.is_terminal() => {
                let stopping = Report::new(InstanceState::Stopping, None);
                reporter.report(assignment.instance_id, stopping);
                let exited = Report::new(InstanceState::Exited, Some(0));
                reporter.report(assignment.instance_id, exited);
            }
            _ => {}
        }
    }
}

/// One state report of a simulated instance.
struct Report {
    state: InstanceState,
    exit_code: Option<i32>,
    output: Vec<String>,
}

impl Report {
    fn new(state: InstanceState, exit_code: Option<i32>) -> Self {
        Self {
            state,
            exit_code,
            output: Vec::new(),
        }
    }
}

async fn boot(reporter: Reporter, instance: InstanceId, outcome: Outcome) {
    let preparing = Report::new(InstanceState::Preparing, None);
    reporter.report(instance, preparing);
    if outcome == Outcome::Fail {
        let failed = Report::new(InstanceState::Failed, Some(1));
        reporter.report(instance, failed);
        return;
    }
    for reached in [InstanceState::Booting, InstanceState::Running] {
        reporter.report(instance, Report::new(reached, None));
    }
    let last = match outcome {
        Outcome::Hang => return,
        Outcome::ExitAfter { code, delay } => {
            tokio::time::sleep(delay).await;
            Report {
                state: InstanceState::Exited,
                exit_code: Some(code),
                output: exit_output(code),
            }
        }
        Outcome::Exit { code } => Report {
            state: InstanceState::Exited,
            exit_code: Some(code),
            output: exit_output(code),
        },
        Outcome::HealthyAfter { delay } => {
            tokio::time::sleep(delay).await;
            Report::new(InstanceState::Healthy, None)
        }
        Outcome::Unhealthy => Report::new(InstanceState::Unhealthy, None),
        Outcome::Healthy | Outcome::Fail => Report::new(InstanceState::Healthy, None),
    };
    reporter.report(instance, last);
}

/// Queues state reports for [`report_loop`] and keeps the simulated host's view of its
/// instances.
#[derive(Clone)]
struct Reporter {
    outbox: mpsc::UnboundedSender<InstanceStateReport>,
    state: Arc<Mutex<SimState>>,
}

impl Reporter {
    fn report(&self, instance: InstanceId, report: Report) {
        // Recorded before the report is sent, because the control plane may return this state
        // to a watch before the request returns. A watch that saw a run-once instance exited
        // and found it still running here would stop it and report a second, made-up exit.
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.instances.insert(instance, report.state);
        }
        // The loop is gone only when the host is powered off, which reports nothing more.
        let _ = self.outbox.send(InstanceStateReport {
            instance_id: instance,
            state: report.state,
            detail: Some("simulated".to_owned()),
            exit_code: report.exit_code,
            output: report.output,
        });
    }
}

/// Sends queued reports in order, as many per call as are waiting (up to [`REPORT_BATCH`]),
/// each instance's superseded states dropped, like the real agent. A call is retried while the
/// control plane is unreachable, because it may be restarting. A batch is dropped after
/// [`REPORT_ATTEMPTS`].
async fn report_loop(
    client: Client,
    mut queued: mpsc::UnboundedReceiver<InstanceStateReport>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let first = tokio::select! {
            first = queued.recv() => first,
            _ = stopped.changed() => return,
        };
        let Some(first) = first else { return };
        let mut reports = vec![first];
        while reports.len() < REPORT_BATCH {
            match queued.try_recv() {
                Ok(next) => reports.push(next),
                Err(_) => break,
            }
        }
        let batch = ReportInstanceStates {
            reports: kiln_api::coalesce_reports(reports),
        };
        for attempt in 1..=REPORT_ATTEMPTS {
            match client.report_instance_states(&batch).await {
                Ok(_) => break,
                Err(error) if error.is_retryable() && attempt < REPORT_ATTEMPTS => {
                    tokio::time::sleep(REPORT_RETRY_PAUSE).await;
                }
                Err(error) => {
                    tracing::warn!(error = %error, reports = batch.reports.len(), "simulated report failed");
                    break;
                }
            }
        }
    }
}
