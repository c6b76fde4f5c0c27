//! Scripted stand-ins for the control plane, the image pipeline and the VMM driver, used to
//! drive the reconcile loop step by step. Host networking in these tests is real (kiln-net in
//! a private network namespace) or this file's `FakeNetwork` where a test only checks
//! decisions.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_agent::logs::LogSink;
use kiln_agent::runtime::{
    GuestNetwork, HostNetwork, Images, NetworkRequest, PreparedImage, RuntimeError, VmHandle,
    VmSpec, VmStatus, Vms,
};
use kiln_api::types::{
    Heartbeat, HostAssignments, HostLease, ImageRef, InstanceSecrets, LogBatch, RegisterHost,
    ReportInstanceState, ReportInstanceStates, ReportedInstanceStates,
};
use kiln_api::{ClientError, ErrorBody, ErrorCode, InstanceState};
use kiln_core::InstanceId;

#[derive(Clone, Default)]
pub(crate) struct FakeControl {
    pub(crate) inner: Arc<Mutex<ControlState>>,
}

#[derive(Default)]
pub(crate) struct ControlState {
    pub(crate) unreachable: bool,
    /// Calls refused while unreachable.
    pub(crate) failed_calls: u32,
    /// Calls that still fail with a server error (500), as during a database failover.
    pub(crate) server_errors: u32,
    /// Rejects batched reports with `not_found`, as a control plane older than the endpoint.
    pub(crate) no_batch_endpoint: bool,
    /// Batched report calls received.
    pub(crate) batch_calls: u32,
    pub(crate) reports: Vec<(InstanceId, ReportInstanceState)>,
    pub(crate) secrets: BTreeMap<InstanceId, InstanceSecrets>,
    pub(crate) shipped: Vec<String>,
    /// The shipped lines whole, with stream and instance.
    pub(crate) shipped_lines: Vec<kiln_api::types::LogLine>,
    /// Responses to assignment watches, in order. A watch with none left fails as unavailable.
    pub(crate) watch_pages: VecDeque<HostAssignments>,
    /// `(after, changes)` of every assignment watch.
    pub(crate) watch_calls: Vec<(u64, bool)>,
    /// Rejects requests for assignment changes, as a control plane older than the flag.
    pub(crate) rejects_changes: bool,
}

fn unavailable() -> ClientError {
    ClientError::Api {
        method: "POST".to_owned(),
        path: "/v1/host".to_owned(),
        status: 503,
        body: ErrorBody::new(ErrorCode::Unavailable, "control plane unavailable"),
    }
}

impl FakeControl {
    fn check(&self) -> Result<(), ClientError> {
        let mut inner = self.inner.lock().unwrap();
        if inner.unreachable {
            inner.failed_calls += 1;
            return Err(unavailable());
        }
        if inner.server_errors > 0 {
            inner.server_errors -= 1;
            return Err(ClientError::Api {
                method: "POST".to_owned(),
                path: "/v1/host".to_owned(),
                status: 500,
                body: ErrorBody::new(ErrorCode::Internal, "internal error"),
            });
        }
        Ok(())
    }

    pub(crate) fn states(&self, instance: InstanceId) -> Vec<InstanceState> {
        self.inner
            .lock()
            .unwrap()
            .reports
            .iter()
            .filter(|(id, _)| *id == instance)
            .map(|(_, report)| report.state)
            .collect()
    }
}

impl kiln_agent::control::ControlPlane for FakeControl {
    async fn register(&self, _request: &RegisterHost) -> Result<HostLease, ClientError> {
        Err(unavailable())
    }

    async fn heartbeat(&self, _request: &Heartbeat) -> Result<HostLease, ClientError> {
        Err(unavailable())
    }

    async fn watch(
        &self,
        after: u64,
        _wait: u64,
        changes: bool,
    ) -> Result<HostAssignments, ClientError> {
        let mut inner = self.inner.lock().unwrap();
        inner.watch_calls.push((after, changes));
        if changes && inner.rejects_changes {
            let mut body = ErrorBody::new(
                ErrorCode::InvalidValue,
                "invalid query parameters: unknown field `changes`",
            );
            body.details = serde_json::json!({ "field": "changes" });
            return Err(ClientError::Api {
                method: "GET".to_owned(),
                path: "/v1/host/assignments".to_owned(),
                status: 400,
                body,
            });
        }
        inner.watch_pages.pop_front().ok_or_else(unavailable)
    }

    async fn report(
        &self,
        instance: InstanceId,
        report: &ReportInstanceState,
    ) -> Result<(), ClientError> {
        self.check()?;
        self.inner
            .lock()
            .unwrap()
            .reports
            .push((instance, report.clone()));
        Ok(())
    }

    async fn report_batch(
        &self,
        batch: &ReportInstanceStates,
    ) -> Result<ReportedInstanceStates, ClientError> {
        {
            let mut inner = self.inner.lock().unwrap();
            inner.batch_calls += 1;
            if inner.no_batch_endpoint {
                return Err(ClientError::Api {
                    method: "POST".to_owned(),
                    path: "/v1/host/instances/states".to_owned(),
                    status: 404,
                    body: ErrorBody::new(ErrorCode::NotFound, "no such endpoint"),
                });
            }
        }
        for report in &batch.reports {
            let single = ReportInstanceState {
                state: report.state,
                detail: report.detail.clone(),
                exit_code: report.exit_code,
                output: report.output.clone(),
            };
            kiln_agent::control::ControlPlane::report(self, report.instance_id, &single).await?;
        }
        Ok(ReportedInstanceStates {
            recorded: u32::try_from(batch.reports.len()).unwrap(),
            unknown: Vec::new(),
        })
    }

    async fn secrets(&self, instance: InstanceId) -> Result<InstanceSecrets, ClientError> {
        self.check()?;
        self.inner
            .lock()
            .unwrap()
            .secrets
            .get(&instance)
            .cloned()
            .ok_or_else(unavailable)
    }

    async fn ship_logs(&self, batch: &LogBatch) -> Result<(), ClientError> {
        self.check()?;
        let mut state = self.inner.lock().unwrap();
        state
            .shipped
            .extend(batch.lines.iter().map(|line| line.line.clone()));
        state.shipped_lines.extend(batch.lines.iter().cloned());
        Ok(())
    }
}

#[derive(Clone, Default)]
pub(crate) struct FakeImages {
    pub(crate) fail: Arc<Mutex<bool>>,
}

impl Images for FakeImages {
    async fn prepare(&self, image: &ImageRef) -> Result<PreparedImage, RuntimeError> {
        if *self.fail.lock().unwrap() {
            return Err(format!("manifest {} not found", image.digest).into());
        }
        Ok(PreparedImage {
            digest: image.digest.clone(),
            rootfs: "/nonexistent/rootfs.ext4".into(),
            default_command: vec!["/bin/app".to_owned()],
            working_dir: None,
            user: None,
            uid: 0,
            gid: 0,
            env: BTreeMap::new(),
        })
    }

    async fn create_disk(&self, path: &Path, _size_mib: u64) -> Result<(), RuntimeError> {
        std::fs::write(path, b"disk")?;
        Ok(())
    }
}

/// A VM as the fake driver tracks it.
pub(crate) struct FakeVm {
    pub(crate) running: bool,
    pub(crate) exit_code: Option<i32>,
    pub(crate) listening: Vec<SocketAddr>,
    pub(crate) spec_env: BTreeMap<String, String>,
    pub(crate) secret_names: Vec<String>,
    pub(crate) logs: LogSink,
    pub(crate) stop_signals: Vec<String>,
    pub(crate) kill_signal: String,
    /// Whether the VM exits when it gets the stop signal.
    pub(crate) obeys_stop: bool,
}

#[derive(Clone, Default)]
pub(crate) struct FakeVms {
    pub(crate) inner: Arc<Mutex<VmsState>>,
}

#[derive(Default)]
pub(crate) struct VmsState {
    pub(crate) vms: BTreeMap<u32, (InstanceId, FakeVm)>,
    pub(crate) next_pid: u32,
    pub(crate) boots: BTreeMap<InstanceId, u32>,
    /// Boots of an instance while another VM of it was still running.
    pub(crate) duplicates: u32,
    pub(crate) listening_default: Vec<SocketAddr>,
    pub(crate) obeys_stop: bool,
}

impl FakeVms {
    pub(crate) fn new() -> Self {
        let vms = Self::default();
        vms.inner.lock().unwrap().obeys_stop = true;
        vms
    }

    pub(crate) fn crash(&self, instance: InstanceId, code: i32) {
        let mut state = self.inner.lock().unwrap();
        for (id, vm) in state.vms.values_mut() {
            if *id == instance && vm.running {
                vm.logs.write(
                    kiln_api::types::LogStream::Stderr,
                    b"panic: out of cheese\n",
                );
                vm.running = false;
                vm.exit_code = Some(code);
            }
        }
    }

    pub(crate) fn running(&self) -> usize {
        self.inner
            .lock()
            .unwrap()
            .vms
            .values()
            .filter(|(_, vm)| vm.running)
            .count()
    }

    pub(crate) fn boots(&self, instance: InstanceId) -> u32 {
        self.inner
            .lock()
            .unwrap()
            .boots
            .get(&instance)
            .copied()
            .unwrap_or(0)
    }
}

impl Vms for FakeVms {
    async fn boot(&self, spec: VmSpec) -> Result<VmHandle, RuntimeError> {
        let mut state = self.inner.lock().unwrap();
        let duplicate = state
            .vms
            .values()
            .any(|(id, vm)| *id == spec.instance && vm.running);
        if duplicate {
            state.duplicates += 1;
        }
        state.next_pid += 1;
        let pid = state.next_pid;
        *state.boots.entry(spec.instance).or_default() += 1;
        std::fs::write(spec.run_dir.join("fake.pid"), pid.to_string())?;
        spec.logs
            .write(kiln_api::types::LogStream::Console, b"booted\n");
        let listening = state.listening_default.clone();
        let obeys_stop = state.obeys_stop;
        state.vms.insert(
            pid,
            (
                spec.instance,
                FakeVm {
                    running: true,
                    exit_code: None,
                    listening,
                    spec_env: spec.env.clone(),
                    secret_names: spec
                        .secrets
                        .map(|s| s.values.keys().cloned().collect())
                        .unwrap_or_default(),
                    logs: spec.logs,
                    stop_signals: Vec::new(),
                    kill_signal: spec.kill_signal.clone(),
                    obeys_stop,
                },
            ),
        );
        Ok(VmHandle {
            pid,
            data: serde_json::Value::Null,
        })
    }

    async fn adopt(
        &self,
        instance: InstanceId,
        run_dir: &Path,
        logs: LogSink,
    ) -> Result<Option<VmHandle>, RuntimeError> {
        let Ok(text) = std::fs::read_to_string(run_dir.join("fake.pid")) else {
            return Ok(None);
        };
        let pid: u32 = text.parse()?;
        let mut state = self.inner.lock().unwrap();
        match state.vms.get_mut(&pid) {
            Some((id, vm)) if *id == instance && vm.running => {
                vm.logs = logs;
                Ok(Some(VmHandle {
                    pid,
                    data: serde_json::Value::Null,
                }))
            }
            _ => Ok(None),
        }
    }

    async fn status(&self, handle: &VmHandle) -> Result<VmStatus, RuntimeError> {
        let state = self.inner.lock().unwrap();
        let (_, vm) = state.vms.get(&handle.pid).ok_or("no such VM")?;
        Ok(if vm.running {
            VmStatus::Running
        } else {
            VmStatus::Exited { code: vm.exit_code }
        })
    }

    async fn stop(&self, handle: &VmHandle, _timeout: Duration) -> Result<(), RuntimeError> {
        let mut state = self.inner.lock().unwrap();
        let (_, vm) = state.vms.get_mut(&handle.pid).ok_or("no such VM")?;
        vm.stop_signals.push(vm.kill_signal.clone());
        if vm.obeys_stop {
            vm.running = false;
            vm.exit_code = Some(0);
        }
        Ok(())
    }

    async fn kill(&self, handle: &VmHandle) -> Result<(), RuntimeError> {
        let mut state = self.inner.lock().unwrap();
        let (_, vm) = state.vms.get_mut(&handle.pid).ok_or("no such VM")?;
        vm.running = false;
        vm.exit_code = None;
        Ok(())
    }

    async fn listening_sockets(&self, handle: &VmHandle) -> Result<Vec<SocketAddr>, RuntimeError> {
        let state = self.inner.lock().unwrap();
        let (_, vm) = state.vms.get(&handle.pid).ok_or("no such VM")?;
        Ok(vm.listening.clone())
    }
}

/// Records the desired network sets without touching the kernel.
#[derive(Clone, Default)]
pub(crate) struct FakeNetwork {
    pub(crate) applied: Arc<Mutex<Vec<Vec<InstanceId>>>>,
}

impl HostNetwork for FakeNetwork {
    async fn apply(
        &mut self,
        instances: &[NetworkRequest],
    ) -> Result<BTreeMap<InstanceId, GuestNetwork>, RuntimeError> {
        self.applied
            .lock()
            .unwrap()
            .push(instances.iter().map(|r| r.instance).collect());
        Ok(instances
            .iter()
            .map(|request| {
                let network = GuestNetwork {
                    tap: "fake".to_owned(),
                    mac: "02:00:00:00:00:01".to_owned(),
                    ipv6: request.ipv6,
                    ipv6_gateway: "fe80::1".parse().unwrap(),
                    ipv4: request.ipv4,
                    ipv4_gateway: "169.254.0.1".parse().unwrap(),
                };
                (request.instance, network)
            })
            .collect())
    }
}
