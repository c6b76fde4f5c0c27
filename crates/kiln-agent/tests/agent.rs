//! The agent's reconcile loop driven step by step: scripted control plane, images and VMs
//! (see `fakes.rs`), real health checks against loopback listeners, real on-disk state, and
//! real host networking (kiln-net in a private network namespace) for the leak test.

// Helpers outside `#[test]` functions panic on setup failures just like the tests do.
#![allow(clippy::unwrap_used)]

#[path = "support/fakes.rs"]
mod fakes;
#[path = "vm/bench.rs"]
mod vm_bench;
#[path = "vm/console.rs"]
mod vm_console;
#[path = "vm/network.rs"]
mod vm_network;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fakes::{FakeControl, FakeImages, FakeNetwork, FakeVms};
use kiln_agent::agent::{Agent, Shared, UNHEALTHY_AFTER_FAILURES};
use kiln_agent::config::LogConfig;
use kiln_agent::network::KilnNetwork;
use kiln_agent::plan::Phase;
use kiln_agent::records::StateDir;
use kiln_agent::runtime::HostNetwork;
use kiln_api::InstanceState;
use kiln_api::types::{
    Assignment, DesiredState, HealthCheck, HealthCheckKind, HostAssignments, ImageRef,
    InstanceNetwork, InstanceSecrets, ReportInstanceState, ServicePort, ServiceProtocol,
};
use kiln_core::{AppId, EnvId, HostId, InstanceId, OrgId, ReleaseId};
use kiln_testkit::netns::NetNs;
use tokio::sync::mpsc;

/// How long a test waits for a background task to deliver something.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

fn assignment(port: u16) -> Assignment {
    Assignment {
        instance_id: InstanceId::new(),
        org_id: OrgId::new(),
        org: "acme".parse().unwrap(),
        app_id: AppId::new(),
        app: "web".parse().unwrap(),
        env_id: EnvId::new(),
        env: "prod".parse().unwrap(),
        release_id: ReleaseId::new(),
        release_version: 3,
        process: "web".parse().unwrap(),
        image: ImageRef {
            reference: "registry.test/web:1".to_owned(),
            digest: format!("sha256:{}", "b".repeat(64)),
        },
        command: Vec::new(),
        env_vars: BTreeMap::from([("PORT".to_owned(), port.to_string())]),
        secrets_version: 0,
        vcpus: 1,
        memory_mib: 128,
        // The "guest" service is a loopback listener of the test.
        network: InstanceNetwork {
            ipv6: Ipv6Addr::LOCALHOST,
            ipv6_prefix: "fd00::/64".to_owned(),
            ipv4: Ipv4Addr::new(100, 64, 0, 2),
        },
        ports: vec![ServicePort {
            service: "web".to_owned(),
            port,
            protocol: ServiceProtocol::Tcp,
            health_check: Some(HealthCheck {
                kind: HealthCheckKind::Tcp,
                interval_secs: 1,
                timeout_secs: 1,
                grace_period_secs: 0,
            }),
        }],
        volumes: Vec::new(),
        kill_signal: "SIGTERM".to_owned(),
        kill_timeout_secs: 10,
        hostname: None,
        startup_scripts: Vec::new(),
        desired: DesiredState::Running,
        run_once: false,
    }
}

fn assignments(cursor: u64, list: &[Assignment]) -> HostAssignments {
    HostAssignments {
        host_id: HostId::new(),
        cursor,
        complete: true,
        assignments: list.to_vec(),
        removed: Vec::new(),
    }
}

type TestAgent<N> = Agent<FakeControl, FakeImages, FakeVms, N>;

struct Harness<N> {
    agent: TestAgent<N>,
    outbox: mpsc::UnboundedReceiver<(InstanceId, ReportInstanceState)>,
    control: FakeControl,
    images: FakeImages,
    vms: FakeVms,
    state: StateDir,
}

impl<N: HostNetwork> Harness<N> {
    fn new(root: &std::path::Path, vms: FakeVms, network: N) -> Self {
        let control = FakeControl::default();
        let images = FakeImages::default();
        let state = StateDir::new(root).unwrap();
        let (agent, outbox) = Agent::new(
            control.clone(),
            images.clone(),
            vms.clone(),
            network,
            state.clone(),
            LogConfig::default(),
            Arc::new(Shared::default()),
        );
        Self {
            agent,
            outbox,
            control,
            images,
            vms,
            state,
        }
    }

    /// Runs one pass and delivers the reports it queued, as the reporter task would.
    async fn pass(&mut self, now: Instant) {
        self.agent.reconcile_once(now).await;
        while let Ok((id, report)) = self.outbox.try_recv() {
            self.control
                .inner
                .lock()
                .unwrap()
                .reports
                .push((id, report));
        }
    }

    fn phase(&self, id: InstanceId) -> Option<Phase> {
        self.agent.tracked().get(&id).map(|t| t.phase.clone())
    }
}

#[tokio::test]
async fn assignment_reaches_healthy() {
    let root = tempfile::tempdir().unwrap();
    let service = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
    let mut a = assignment(service.local_addr().unwrap().port());
    a.secrets_version = 2;
    let mut h = Harness::new(root.path(), FakeVms::new(), FakeNetwork::default());
    h.control.inner.lock().unwrap().secrets.insert(
        a.instance_id,
        InstanceSecrets {
            instance_id: a.instance_id,
            secrets_version: 2,
            values: BTreeMap::from([("DATABASE_URL".to_owned(), "postgres://x".to_owned())]),
        },
    );
    h.agent
        .set_desired(assignments(1, std::slice::from_ref(&a)));

    let now = Instant::now();
    h.pass(now).await;
    assert_eq!(h.phase(a.instance_id), Some(Phase::Running));
    h.pass(now).await;
    assert_eq!(h.phase(a.instance_id), Some(Phase::Healthy));

    assert_eq!(
        h.control.states(a.instance_id),
        [
            InstanceState::Preparing,
            InstanceState::Booting,
            InstanceState::Running,
            InstanceState::Healthy
        ]
    );
    let vms = h.vms.inner.lock().unwrap();
    let (_, vm) = vms.vms.values().next().unwrap();
    assert_eq!(vm.secret_names, ["DATABASE_URL"]);
    assert_eq!(vm.spec_env.get("PORT"), a.env_vars.get("PORT"));
    let record =
        std::fs::read_to_string(h.state.run_dir(a.instance_id).join("record.json")).unwrap();
    assert!(
        !record.contains("postgres://x"),
        "secret value on disk: {record}"
    );
}

#[tokio::test]
async fn unhealthy_report_explains_ipv4_only() {
    let root = tempfile::tempdir().unwrap();
    let closed = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let vms = FakeVms::new();
    vms.inner.lock().unwrap().listening_default = vec![SocketAddr::from(([0, 0, 0, 0], port))];
    let a = assignment(port);
    let mut h = Harness::new(root.path(), vms, FakeNetwork::default());
    h.agent
        .set_desired(assignments(1, std::slice::from_ref(&a)));

    let now = Instant::now();
    h.pass(now).await;
    probe_until_unhealthy(&mut h, &a, now).await;

    let reports = h.control.inner.lock().unwrap().reports.clone();
    let (_, last) = reports.last().unwrap();
    let detail = last.detail.clone().unwrap();
    assert!(detail.contains("IPv4 only"), "{detail}");
    assert!(detail.contains(&format!("[::]:{port}")), "{detail}");
}

#[tokio::test]
async fn health_failures_ignored_during_grace() {
    let root = tempfile::tempdir().unwrap();
    let mut a = assignment(1);
    a.ports[0].health_check.as_mut().unwrap().grace_period_secs = 30;
    let mut h = Harness::new(root.path(), FakeVms::new(), FakeNetwork::default());
    h.agent
        .set_desired(assignments(1, std::slice::from_ref(&a)));

    let now = Instant::now();
    h.pass(now).await;
    h.pass(now).await;
    assert_eq!(h.phase(a.instance_id), Some(Phase::Running));
    probe_until_unhealthy(&mut h, &a, now + Duration::from_secs(31)).await;
}

/// Runs a pass per health check interval from `from` on, for an instance whose checks all
/// fail, and asserts that it turns unhealthy on exactly the failure that reaches the
/// threshold, not before.
async fn probe_until_unhealthy<N: HostNetwork>(h: &mut Harness<N>, a: &Assignment, from: Instant) {
    let interval = Duration::from_secs(1);
    for failure in 1..=UNHEALTHY_AFTER_FAILURES {
        h.pass(from + interval * failure).await;
        let expected = if failure < UNHEALTHY_AFTER_FAILURES {
            Phase::Running
        } else {
            Phase::Unhealthy
        };
        assert_eq!(
            h.phase(a.instance_id),
            Some(expected),
            "after failure {failure}"
        );
    }
}

#[tokio::test]
async fn health_failures_below_threshold_keep_instance_healthy() {
    let root = tempfile::tempdir().unwrap();
    let service = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
    let port = service.local_addr().unwrap().port();
    let a = assignment(port);
    let mut h = Harness::new(root.path(), FakeVms::new(), FakeNetwork::default());
    h.agent
        .set_desired(assignments(1, std::slice::from_ref(&a)));
    let now = Instant::now();
    h.pass(now).await;
    h.pass(now).await;
    assert_eq!(h.phase(a.instance_id), Some(Phase::Healthy));
    let second = |n: u32| now + Duration::from_secs(u64::from(n));

    // The app stops responding for fewer checks than the threshold, then responds again. The
    // instance stays healthy throughout, and the count starts over.
    drop(service);
    for n in 1..UNHEALTHY_AFTER_FAILURES {
        h.pass(second(n)).await;
        assert_eq!(h.phase(a.instance_id), Some(Phase::Healthy), "failure {n}");
    }
    let service = tokio::net::TcpListener::bind(("::1", port)).await.unwrap();
    h.pass(second(UNHEALTHY_AFTER_FAILURES)).await;
    assert_eq!(h.phase(a.instance_id), Some(Phase::Healthy));
    assert_eq!(h.agent.tracked()[&a.instance_id].probe_failures, 0);

    // Then it stops responding for good, and turns unhealthy on the threshold-th failure.
    drop(service);
    let start = UNHEALTHY_AFTER_FAILURES + 1;
    for n in start..start + UNHEALTHY_AFTER_FAILURES {
        h.pass(second(n)).await;
        let expected = if n + 1 < start + UNHEALTHY_AFTER_FAILURES {
            Phase::Healthy
        } else {
            Phase::Unhealthy
        };
        assert_eq!(h.phase(a.instance_id), Some(expected), "check {n}");
    }
}

#[tokio::test]
async fn first_check_retried_within_interval() {
    let root = tempfile::tempdir().unwrap();
    let closed = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut a = assignment(port);
    let check = a.ports[0].health_check.as_mut().unwrap();
    check.interval_secs = 30;
    check.grace_period_secs = 60;
    let mut h = Harness::new(root.path(), FakeVms::new(), FakeNetwork::default());
    h.agent
        .set_desired(assignments(1, std::slice::from_ref(&a)));

    let now = Instant::now();
    h.pass(now).await;
    h.pass(now).await;
    assert_eq!(h.phase(a.instance_id), Some(Phase::Running));

    // The app listens a moment after the first check failed: the next check comes after
    // the short starting interval, not after the check's 30 s.
    let _service = tokio::net::TcpListener::bind(("::1", port)).await.unwrap();
    h.pass(now + kiln_agent::agent::STARTING_PROBE_INTERVAL)
        .await;
    assert_eq!(h.phase(a.instance_id), Some(Phase::Healthy));

    // Once healthy, the check's own interval applies.
    let next = h.agent.tracked()[&a.instance_id].next_probe_at.unwrap();
    assert!(next >= now + Duration::from_secs(30));
}

#[tokio::test]
async fn run_loop_wakes_for_due_check() {
    let root = tempfile::tempdir().unwrap();
    let service = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
    let a = assignment(service.local_addr().unwrap().port());
    let Harness {
        mut agent,
        mut outbox,
        ..
    } = Harness::new(root.path(), FakeVms::new(), FakeNetwork::default());
    agent.set_desired(assignments(1, std::slice::from_ref(&a)));
    let (_sender, receiver) = tokio::sync::watch::channel(None);

    // With a tick of an hour, only the due health check can wake the loop for the pass that
    // makes the booted instance healthy.
    let run = agent.run(
        receiver,
        std::future::pending::<()>(),
        Duration::from_secs(3600),
    );
    let healthy = async {
        while let Some((_, report)) = outbox.recv().await {
            if report.state == InstanceState::Healthy {
                return;
            }
        }
    };
    tokio::select! {
        () = run => panic!("the loop ended"),
        () = healthy => {}
        () = tokio::time::sleep(DELIVERY_TIMEOUT) => {
            panic!("not healthy within {DELIVERY_TIMEOUT:?}")
        }
    }
}

#[tokio::test]
async fn crash_restarts_with_backoff_then_crash_loop() {
    let root = tempfile::tempdir().unwrap();
    let a = assignment(1);
    let id = a.instance_id;
    let mut h = Harness::new(root.path(), FakeVms::new(), FakeNetwork::default());
    h.agent
        .set_desired(assignments(1, std::slice::from_ref(&a)));

    let mut now = Instant::now();
    h.pass(now).await;
    assert_eq!(h.vms.boots(id), 1);

    for restart in 1..=3u32 {
        h.vms.crash(id, 3);
        h.pass(now).await;
        assert_eq!(h.phase(id), Some(Phase::Exited { code: Some(3) }));
        let delay = kiln_agent::plan::restart_delay(restart);
        // Not yet: the backoff has not passed.
        h.pass(now + delay - Duration::from_millis(1)).await;
        assert_eq!(h.vms.boots(id), restart);
        now += delay;
        h.pass(now).await;
        assert_eq!(h.vms.boots(id), restart + 1);
    }

    h.vms.crash(id, 3);
    h.pass(now).await;
    let status = h.agent.status();
    let instance = &status.instances[0];
    assert!(instance.crash_loop);
    assert_eq!(instance.state, InstanceState::Failed);
    let detail = instance.detail.clone().unwrap();
    assert!(
        detail.starts_with("crash loop: exited with code 3"),
        "{detail}"
    );
    assert!(detail.contains("out of cheese"), "{detail}");
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["instances"][0]["crash_loop"], true);
}

#[tokio::test]
async fn start_failure_reported_and_retried() {
    let root = tempfile::tempdir().unwrap();
    let a = assignment(1);
    let id = a.instance_id;
    let mut h = Harness::new(root.path(), FakeVms::new(), FakeNetwork::default());
    *h.images.fail.lock().unwrap() = true;
    h.agent
        .set_desired(assignments(1, std::slice::from_ref(&a)));

    let now = Instant::now();
    h.pass(now).await;
    let Some(Phase::Failed { reason }) = h.phase(id) else {
        panic!("expected Failed, got {:?}", h.phase(id));
    };
    assert!(reason.starts_with("preparing image sha256:"), "{reason}");
    assert!(reason.contains("not found"), "{reason}");
    assert_eq!(h.vms.boots(id), 0);

    *h.images.fail.lock().unwrap() = false;
    h.pass(now + Duration::from_secs(1)).await;
    assert_eq!(h.vms.boots(id), 1);
}

#[tokio::test]
async fn restarted_agent_adopts_without_duplicate() {
    let root = tempfile::tempdir().unwrap();
    let service = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
    let a = assignment(service.local_addr().unwrap().port());
    let id = a.instance_id;
    let vms = FakeVms::new();
    let mut first = Harness::new(root.path(), vms.clone(), FakeNetwork::default());
    first
        .agent
        .set_desired(assignments(7, std::slice::from_ref(&a)));
    first
        .state
        .save_assignments(&assignments(7, std::slice::from_ref(&a)))
        .unwrap();
    first.pass(Instant::now()).await;

    // The agent dies right after the boot, before it saved the VM handle (kill -9).
    let mut record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(first.state.run_dir(id).join("record.json")).unwrap(),
    )
    .unwrap();
    record["vm"] = serde_json::Value::Null;
    std::fs::write(
        first.state.run_dir(id).join("record.json"),
        serde_json::to_vec(&record).unwrap(),
    )
    .unwrap();
    drop(first);

    let mut second = Harness::new(root.path(), vms.clone(), FakeNetwork::default());
    let cursor = second.agent.readopt().await;
    assert_eq!(cursor, 7);
    assert_eq!(second.phase(id), Some(Phase::Running));
    second.pass(Instant::now()).await;
    assert_eq!(second.phase(id), Some(Phase::Healthy));
    assert_eq!(vms.boots(id), 1);
    assert_eq!(vms.inner.lock().unwrap().duplicates, 0);
    assert_eq!(vms.running(), 1);
}

#[tokio::test]
async fn outage_keeps_adopted_instances_running() {
    let root = tempfile::tempdir().unwrap();
    let a = assignment(1);
    let id = a.instance_id;
    let vms = FakeVms::new();
    let mut first = Harness::new(root.path(), vms.clone(), FakeNetwork::default());
    first
        .agent
        .set_desired(assignments(1, std::slice::from_ref(&a)));
    first.pass(Instant::now()).await;
    drop(first);

    // No saved assignment set and no control plane: the new agent knows nothing desired,
    // so it stops nothing.
    let mut second = Harness::new(root.path(), vms.clone(), FakeNetwork::default());
    second.control.inner.lock().unwrap().unreachable = true;
    assert_eq!(second.agent.readopt().await, 0);
    for _ in 0..3 {
        second.pass(Instant::now() + Duration::from_secs(60)).await;
    }
    assert_eq!(vms.running(), 1);
    assert!(second.phase(id).unwrap().has_vm());

    // Once the assignments arrive without the instance, it is stopped.
    second.agent.set_desired(assignments(2, &[]));
    second.pass(Instant::now()).await;
    assert_eq!(vms.running(), 0);
}

#[tokio::test]
async fn stop_signal_then_kill_then_cleanup() {
    let root = tempfile::tempdir().unwrap();
    let vms = FakeVms::new();
    vms.inner.lock().unwrap().obeys_stop = false;
    let a = assignment(1);
    let id = a.instance_id;
    let mut h = Harness::new(root.path(), vms.clone(), FakeNetwork::default());
    h.agent
        .set_desired(assignments(1, std::slice::from_ref(&a)));
    let now = Instant::now();
    h.pass(now).await;
    assert!(h.state.run_dir(id).join("disk.ext4").exists());

    let mut stopped = a.clone();
    stopped.desired = DesiredState::Stopped;
    h.agent.set_desired(assignments(2, &[stopped]));
    h.pass(now).await;
    let Some(Phase::Stopping { deadline }) = h.phase(id) else {
        panic!("expected Stopping, got {:?}", h.phase(id));
    };
    assert_eq!(deadline, now + Duration::from_secs(10));
    {
        let state = vms.inner.lock().unwrap();
        let (_, vm) = state.vms.values().next().unwrap();
        assert_eq!(vm.stop_signals, ["SIGTERM"]);
        assert!(vm.running, "the fake guest ignores SIGTERM");
    }

    h.pass(deadline - Duration::from_millis(1)).await;
    assert_eq!(vms.running(), 1);
    h.pass(deadline).await;
    assert_eq!(vms.running(), 0);
    h.pass(deadline).await;
    h.pass(deadline).await;
    assert!(!h.state.run_dir(id).exists());
    assert!(h.control.states(id).contains(&InstanceState::Stopping));
    assert_eq!(h.control.states(id).last(), Some(&InstanceState::Exited));

    h.agent.set_desired(assignments(3, &[]));
    h.pass(deadline).await;
    assert!(h.agent.tracked().is_empty());
    assert!(!h.state.log_dir(id).exists());
}

/// Starts the agent's report sender against `control` and returns its queue and task.
fn spawn_reporter(
    control: &FakeControl,
) -> (
    mpsc::UnboundedSender<(InstanceId, ReportInstanceState)>,
    tokio::task::JoinHandle<()>,
) {
    let (sender, outbox) = mpsc::unbounded_channel();
    let task = tokio::spawn(kiln_agent::tasks::run_reporter(
        control.clone(),
        outbox,
        Arc::new(Shared::default()),
    ));
    (sender, task)
}

#[tokio::test]
async fn outage_keeps_latest_states_and_exits() {
    let control = FakeControl::default();
    control.inner.lock().unwrap().unreachable = true;
    let (sender, task) = spawn_reporter(&control);
    let report = |state, exit_code| ReportInstanceState {
        state,
        detail: None,
        exit_code,
        output: Vec::new(),
    };
    let (booted, restarted) = (InstanceId::new(), InstanceId::new());
    let queued = [
        (booted, report(InstanceState::Preparing, None)),
        (restarted, report(InstanceState::Running, None)),
        (booted, report(InstanceState::Booting, None)),
        (restarted, report(InstanceState::Exited, Some(3))),
        (booted, report(InstanceState::Running, None)),
        (restarted, report(InstanceState::Preparing, None)),
    ];
    for (id, report) in queued {
        sender.send((id, report)).unwrap();
    }
    // Retried while the control plane is away, so later reports supersede queued ones.
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while control.inner.lock().unwrap().failed_calls < 2 {
        assert!(
            Instant::now() < deadline,
            "no retry within {DELIVERY_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    control.inner.lock().unwrap().unreachable = false;

    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while control.states(restarted).len() < 2 || control.states(booted).is_empty() {
        assert!(
            Instant::now() < deadline,
            "reports not delivered within {DELIVERY_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(control.states(booted), [InstanceState::Running]);
    assert_eq!(
        control.states(restarted),
        [InstanceState::Exited, InstanceState::Preparing]
    );
    let delivered: Vec<InstanceId> = control
        .inner
        .lock()
        .unwrap()
        .reports
        .iter()
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        delivered,
        [restarted, booted, restarted],
        "queue order kept"
    );
    task.abort();
}

#[tokio::test]
async fn server_errors_delay_reports() {
    let control = FakeControl::default();
    control.inner.lock().unwrap().server_errors = 2;
    let (sender, task) = spawn_reporter(&control);
    let id = InstanceId::new();
    let exited = ReportInstanceState {
        state: InstanceState::Exited,
        detail: None,
        exit_code: Some(0),
        output: vec!["done".to_owned()],
    };
    sender.send((id, exited.clone())).unwrap();

    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while control.states(id).is_empty() {
        assert!(
            Instant::now() < deadline,
            "report not delivered within {DELIVERY_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(control.inner.lock().unwrap().server_errors, 0);
    assert_eq!(control.inner.lock().unwrap().reports, vec![(id, exited)]);
    task.abort();
}

#[tokio::test]
async fn failing_report_stops_blocking_others() {
    let control = FakeControl::default();
    // Enough server errors for the batch to be split and its first report dropped.
    control.inner.lock().unwrap().server_errors = 20;
    let (sender, outbox) = mpsc::unbounded_channel();
    let quick =
        kiln_agent::backoff::Backoff::new(Duration::from_millis(1), Duration::from_millis(5));
    let task = tokio::spawn(kiln_agent::tasks::run_reporter_with_backoff(
        control.clone(),
        outbox,
        Arc::new(Shared::default()),
        quick,
    ));
    let (poison, healthy) = (InstanceId::new(), InstanceId::new());
    let report = |state| ReportInstanceState {
        state,
        detail: None,
        exit_code: None,
        output: Vec::new(),
    };
    sender
        .send((poison, report(InstanceState::Running)))
        .unwrap();
    sender
        .send((healthy, report(InstanceState::Healthy)))
        .unwrap();

    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while control.states(healthy).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the second report never got through"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        control.states(poison).is_empty(),
        "the failing report was dropped"
    );
    task.abort();
}

#[tokio::test]
async fn old_control_plane_gets_single_reports() {
    let control = FakeControl::default();
    control.inner.lock().unwrap().no_batch_endpoint = true;
    let (sender, task) = spawn_reporter(&control);
    let (first, second) = (InstanceId::new(), InstanceId::new());
    let running = ReportInstanceState {
        state: InstanceState::Running,
        detail: None,
        exit_code: None,
        output: Vec::new(),
    };
    sender.send((first, running.clone())).unwrap();

    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while control.states(first).is_empty() {
        assert!(
            Instant::now() < deadline,
            "report not delivered within {DELIVERY_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sender.send((second, running)).unwrap();
    while control.states(second).is_empty() {
        assert!(
            Instant::now() < deadline,
            "report not delivered within {DELIVERY_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    assert_eq!(
        control.inner.lock().unwrap().batch_calls,
        1,
        "asked once, then remembered"
    );
    assert_eq!(control.states(first), [InstanceState::Running]);
    task.abort();
}

#[tokio::test]
async fn logs_shipped_to_control_plane() {
    let root = tempfile::tempdir().unwrap();
    let a = assignment(1);
    let shared;
    let control;
    {
        let mut h = Harness::new(root.path(), FakeVms::new(), FakeNetwork::default());
        h.agent
            .set_desired(assignments(1, std::slice::from_ref(&a)));
        h.pass(Instant::now()).await;
        shared = h.agent.shared();
        control = h.control.clone();
    }
    let task = tokio::spawn(kiln_agent::tasks::run_log_shipper(
        control.clone(),
        shared,
        Duration::from_millis(20),
    ));
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while !control
        .inner
        .lock()
        .unwrap()
        .shipped
        .iter()
        .any(|l| l == "booted")
    {
        assert!(
            Instant::now() < deadline,
            "logs not shipped within {DELIVERY_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
}

fn count_links(namespace: &NetNs) -> usize {
    namespace
        .ip(&["-o", "link", "show"])
        .unwrap()
        .lines()
        .filter(|line| line.contains(": kt"))
        .count()
}

fn count_files(root: &std::path::Path) -> usize {
    fn walk(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| {
                let path = entry.unwrap().path();
                if path.is_dir() { walk(&path) + 1 } else { 1 }
            })
            .sum()
    }
    walk(root)
}

#[test]
fn hundred_cycles_leak_nothing() {
    let namespace = NetNs::create("agent").unwrap();
    let root = tempfile::tempdir().unwrap();
    namespace
        .block_on(|| async {
            let network = KilnNetwork::new(kiln_net::HostNetworkConfig::default()).unwrap();
            let vms = FakeVms::new();
            let mut h = Harness::new(root.path(), vms.clone(), network);
            let files_before = count_files(root.path());
            let mut now = Instant::now();

            for cycle in 0..100u64 {
                let mut a = assignment(1);
                a.network.ipv6 = format!("fd00::{}", cycle + 2).parse().unwrap();
                h.agent
                    .set_desired(assignments(cycle * 2 + 1, std::slice::from_ref(&a)));
                h.pass(now).await;
                assert_eq!(count_links(&namespace), 1, "cycle {cycle}");

                h.agent.set_desired(assignments(cycle * 2 + 2, &[]));
                // Stop, observe the exit, clean up, forget.
                for _ in 0..4 {
                    h.pass(now).await;
                }
                now += Duration::from_millis(1);
                assert!(h.agent.tracked().is_empty(), "cycle {cycle}");
            }

            assert_eq!(vms.running(), 0);
            assert_eq!(count_links(&namespace), 0);
            let ruleset = namespace
                .exec("/usr/sbin/nft", &["list", "ruleset"])
                .unwrap();
            assert!(!ruleset.contains("kiln"), "{ruleset}");
            // Only the status file may have appeared.
            assert!(count_files(root.path()) <= files_before + 1);
        })
        .unwrap();
}

// Real microVMs: QEMU (TCG here) booting kiln-init, real kiln-net in a private network
// namespace, health checks over the TAP. The image pipeline is replaced by a busybox root
// filesystem built directly (kiln-image has its own tests against a real registry).

/// How long a real microVM may take from assignment to healthy under TCG.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(240);

/// Interval between reconcile passes while a test waits for a state.
const PASS_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Clone)]
struct BusyboxImages {
    rootfs: std::path::PathBuf,
    /// User and group id the workload runs as.
    uid: u32,
}

impl kiln_agent::runtime::Images for BusyboxImages {
    async fn prepare(
        &self,
        image: &ImageRef,
    ) -> Result<kiln_agent::runtime::PreparedImage, kiln_agent::runtime::RuntimeError> {
        Ok(kiln_agent::runtime::PreparedImage {
            digest: image.digest.clone(),
            rootfs: self.rootfs.clone(),
            default_command: vec!["/bin/sh".to_owned()],
            working_dir: Some("/srv".to_owned()),
            user: Some(self.uid.to_string()),
            uid: self.uid,
            gid: self.uid,
            env: BTreeMap::new(),
        })
    }

    async fn create_disk(
        &self,
        path: &std::path::Path,
        size_mib: u64,
    ) -> Result<(), kiln_agent::runtime::RuntimeError> {
        kiln_testkit::guest::data_disk(path, u32::try_from(size_mib.min(64)).unwrap())?;
        Ok(())
    }
}

type VmAgent = Agent<
    FakeControl,
    BusyboxImages,
    kiln_agent::vmm::VmmVms<kiln_vmm::qemu::QemuDriver>,
    KilnNetwork,
>;

struct VmHarness {
    agent: VmAgent,
    outbox: mpsc::UnboundedReceiver<(InstanceId, ReportInstanceState)>,
    control: FakeControl,
}

fn vm_harness(root: &std::path::Path, images: BusyboxImages) -> VmHarness {
    let driver = kiln_vmm::qemu::QemuDriver::new(kiln_vmm::qemu::QemuConfig {
        allow_software_virtualization: true,
        ..kiln_vmm::qemu::QemuConfig::default()
    })
    .unwrap();
    let settings = kiln_agent::vmm::VmmSettings {
        assets: kiln_vmm::GuestAssets::in_dir(&kiln_testkit::guest::guest_assets_dir().unwrap()),
        boot_timeout: Duration::from_secs(120),
        console_limit_bytes: 1024 * 1024,
    };
    let control = FakeControl::default();
    let (agent, outbox) = Agent::new(
        control.clone(),
        images,
        kiln_agent::vmm::VmmVms::new(driver, settings),
        KilnNetwork::new(kiln_net::HostNetworkConfig::default()).unwrap(),
        StateDir::new(root).unwrap(),
        LogConfig::default(),
        Arc::new(Shared::default()),
    );
    VmHarness {
        agent,
        outbox,
        control,
    }
}

impl VmHarness {
    async fn pass(&mut self) {
        self.agent.reconcile_once(Instant::now()).await;
        while let Ok((id, report)) = self.outbox.try_recv() {
            self.control
                .inner
                .lock()
                .unwrap()
                .reports
                .push((id, report));
        }
    }

    /// Runs passes until `done` holds, failing after `timeout`.
    async fn pass_until(&mut self, what: &str, timeout: Duration, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            self.pass().await;
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} not reached within {timeout:?}; reports: {:?}",
                self.control.inner.lock().unwrap().reports
            );
            tokio::time::sleep(PASS_INTERVAL).await;
        }
    }

    fn phase(&self, id: InstanceId) -> Option<Phase> {
        self.agent.tracked().get(&id).map(|t| t.phase.clone())
    }

    fn log_tail(&self, id: InstanceId) -> Vec<String> {
        let shared = self.agent.shared();
        let logs = shared.logs.lock().unwrap();
        logs.get(&id).map(|sink| sink.tail()).unwrap_or_default()
    }
}

/// Kills every QEMU recorded under the state directory, so a failing test leaks no VM.
struct KillVmsOnDrop(std::path::PathBuf);

impl Drop for KillVmsOnDrop {
    fn drop(&mut self) {
        for pid in qemu_pids(&self.0) {
            if kiln_vmm::process::is_alive(pid) {
                kiln_vmm::process::signal(pid, libc::SIGKILL);
            }
        }
    }
}

fn qemu_pids(root: &std::path::Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(root.join("instances")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| kiln_vmm::record::VmRecord::load(&entry.path().join("vm")).ok())
        .map(|record| record.pid)
        .collect()
}

fn vm_assignment(host_part: u16, script: &str) -> Assignment {
    let mut a = assignment(8080);
    a.network.ipv6 = Ipv6Addr::new(0xfd00, 0x6b69, 0x6c6e, 1, 0, 0, 0, host_part);
    a.network.ipv4 = Ipv4Addr::new(100, 64, 0, u8::try_from(host_part).unwrap());
    a.command = vec!["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()];
    let check = a.ports[0].health_check.as_mut().unwrap();
    check.grace_period_secs = 300;
    a
}

#[test]
fn real_vm_healthy_readopted_stopped() {
    let namespace = NetNs::create("vmok").unwrap();
    let root = tempfile::tempdir().unwrap();
    let _guard = KillVmsOnDrop(root.path().to_path_buf());
    let rootfs = root.path().join("rootfs.ext4");
    kiln_testkit::guest::RootfsBuilder::new()
        .build(&rootfs)
        .unwrap();
    let images = BusyboxImages {
        rootfs,
        uid: kiln_testkit::guest::APP_UID,
    };

    let a = vm_assignment(2, "echo READY; exec httpd -f -p [::]:8080 -h /www");
    let id = a.instance_id;

    // Each phase runs on its own runtime: when a phase ends, its runtime and every task and
    // socket of the agent go away, as when the agent process is killed.
    let pids = namespace
        .block_on(|| async {
            let mut h = vm_harness(root.path(), images.clone());
            h.agent
                .set_desired(assignments(1, std::slice::from_ref(&a)));
            h.pass_until("healthy", HEALTHY_TIMEOUT, |h| {
                h.phase(id) == Some(Phase::Healthy)
            })
            .await;
            assert_eq!(
                h.control.states(id),
                [
                    InstanceState::Preparing,
                    InstanceState::Booting,
                    InstanceState::Running,
                    InstanceState::Healthy
                ]
            );
            assert!(
                h.log_tail(id).iter().any(|line| line == "READY"),
                "{:?}",
                h.log_tail(id)
            );
            let pids = qemu_pids(root.path());
            assert_eq!(pids.len(), 1);
            pids
        })
        .unwrap();

    namespace
        .block_on(|| async {
            // The restarted agent adopts the running VM instead of booting a second one.
            let mut h = vm_harness(root.path(), images.clone());
            h.agent
                .set_desired(assignments(1, std::slice::from_ref(&a)));
            h.agent.readopt().await;
            assert_eq!(h.phase(id), Some(Phase::Running));
            h.pass_until("healthy again", HEALTHY_TIMEOUT, |h| {
                h.phase(id) == Some(Phase::Healthy)
            })
            .await;
            assert_eq!(qemu_pids(root.path()), pids);
            assert!(
                h.control
                    .states(id)
                    .iter()
                    .all(|s| *s != InstanceState::Booting)
            );

            // Unassigned: SIGTERM through kiln-init, the VM powers off, everything goes.
            h.agent.set_desired(assignments(2, &[]));
            h.pass_until("forgotten", HEALTHY_TIMEOUT, |h| {
                h.agent.tracked().is_empty()
            })
            .await;
            assert!(
                !kiln_vmm::process::is_alive(pids[0]),
                "QEMU {} still runs",
                pids[0]
            );
            assert_eq!(count_links(&namespace), 0);
            assert!(!root.path().join("instances").join(id.to_string()).exists());
            let ruleset = namespace
                .exec("/usr/sbin/nft", &["list", "ruleset"])
                .unwrap();
            assert!(!ruleset.contains("kiln"), "{ruleset}");
        })
        .unwrap();
}

#[test]
fn real_vm_unhealthy_names_loopback_listener() {
    let namespace = NetNs::create("vmlo").unwrap();
    let root = tempfile::tempdir().unwrap();
    let _guard = KillVmsOnDrop(root.path().to_path_buf());
    let rootfs = root.path().join("rootfs.ext4");
    kiln_testkit::guest::RootfsBuilder::new()
        .build(&rootfs)
        .unwrap();
    let images = BusyboxImages {
        rootfs,
        uid: kiln_testkit::guest::APP_UID,
    };

    namespace
        .block_on(|| async {
            let mut a = vm_assignment(3, "echo READY; exec httpd -f -p 127.0.0.1:8080 -h /www");
            a.ports[0].health_check.as_mut().unwrap().grace_period_secs = 0;
            let id = a.instance_id;
            let mut h = vm_harness(root.path(), images);
            h.agent
                .set_desired(assignments(1, std::slice::from_ref(&a)));
            // Unhealthy is reported as soon as the VM runs; wait until the app listens, so
            // the explanation names its socket.
            h.pass_until("unhealthy with the loopback socket", HEALTHY_TIMEOUT, |h| {
                let reports = h.control.inner.lock().unwrap().reports.clone();
                reports.iter().any(|(_, r)| {
                    r.state == InstanceState::Unhealthy
                        && r.detail
                            .as_deref()
                            .is_some_and(|d| d.contains("127.0.0.1:8080"))
                })
            })
            .await;
            let reports = h.control.inner.lock().unwrap().reports.clone();
            let detail = reports
                .iter()
                .rev()
                .find_map(|(_, r)| r.detail.clone())
                .unwrap();
            assert!(detail.contains("(loopback)"), "{detail}");
            assert!(detail.contains("listen on [::]:8080"), "{detail}");

            h.agent.set_desired(assignments(2, &[]));
            h.pass_until("forgotten", HEALTHY_TIMEOUT, |h| {
                h.agent.tracked().is_empty()
            })
            .await;
            assert_eq!(h.phase(id), None);
        })
        .unwrap();
}

/// The run directory entries left for `id`, by name.
fn run_dir_entries(root: &std::path::Path, id: InstanceId) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root.join("instances").join(id.to_string())) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A release command: a run-once assignment without ports that runs `script`.
fn release_command_assignment(host_part: u16, script: &str) -> Assignment {
    let mut a = vm_assignment(host_part, script);
    a.process = "release-command".parse().unwrap();
    a.ports.clear();
    a.run_once = true;
    a
}

/// The final report of `id`, once there is one.
fn final_report(h: &VmHarness, id: InstanceId) -> Option<ReportInstanceState> {
    let reports = h.control.inner.lock().unwrap().reports.clone();
    reports
        .into_iter()
        .rev()
        .find(|(reported, report)| *reported == id && report.state.is_terminal())
        .map(|(_, report)| report)
}

#[test]
fn real_vm_release_command_runs_once() {
    let namespace = NetNs::create("vmrc").unwrap();
    let root = tempfile::tempdir().unwrap();
    let _guard = KillVmsOnDrop(root.path().to_path_buf());
    let rootfs = root.path().join("rootfs.ext4");
    kiln_testkit::guest::RootfsBuilder::new()
        .build(&rootfs)
        .unwrap();
    let images = BusyboxImages { rootfs, uid: 0 };

    let success = release_command_assignment(
        5,
        "echo migrating; echo marker-$KILN_PROCESS > /tmp/marker; cat /tmp/marker; exit 0",
    );
    let failure = release_command_assignment(6, "echo checking schema; echo broken >&2; exit 3");
    let both = [success.clone(), failure.clone()];

    namespace
        .block_on(|| async {
            let mut h = vm_harness(root.path(), images.clone());
            h.agent.set_desired(assignments(1, &both));
            h.pass_until("both commands exited", HEALTHY_TIMEOUT, |h| {
                final_report(h, success.instance_id).is_some()
                    && final_report(h, failure.instance_id).is_some()
            })
            .await;

            let exited = final_report(&h, success.instance_id).unwrap();
            assert_eq!(exited.state, InstanceState::Exited);
            assert_eq!(exited.exit_code, Some(0));
            assert!(
                exited
                    .output
                    .iter()
                    .any(|line| line == "marker-release-command"),
                "{exited:?}"
            );
            assert_eq!(
                exited.detail.as_deref(),
                Some("release command exited with code 0")
            );
            let failed = final_report(&h, failure.instance_id).unwrap();
            assert_eq!(failed.state, InstanceState::Exited);
            assert_eq!(failed.exit_code, Some(3));
            // stdout and stderr reach the agent on separate streams, so the two lines may
            // arrive in either order.
            let mut lines = failed.output.clone();
            lines.sort();
            assert_eq!(lines, ["broken", "checking schema"], "{failed:?}");

            // Cleaned up while still assigned: no VM, TAP, rule or disk is left, only the
            // record with the result.
            h.pass_until("cleaned up", HEALTHY_TIMEOUT, |h| {
                h.agent
                    .tracked()
                    .values()
                    .all(|tracked| !tracked.has_resources)
            })
            .await;
            for _ in 0..5 {
                h.pass().await;
            }
            assert!(qemu_pids(root.path()).is_empty());
            assert_eq!(count_links(&namespace), 0);
            let ruleset = namespace
                .exec("/usr/sbin/nft", &["list", "ruleset"])
                .unwrap();
            assert!(!ruleset.contains("kiln"), "{ruleset}");
            for a in &both {
                let id = a.instance_id;
                assert_eq!(run_dir_entries(root.path(), id), ["record.json"]);
                let states = h.control.states(id);
                assert!(!states.contains(&InstanceState::Healthy), "{states:?}");
                let boots = states
                    .iter()
                    .filter(|s| **s == InstanceState::Booting)
                    .count();
                assert_eq!(boots, 1, "{states:?}");
            }
        })
        .unwrap();

    namespace
        .block_on(|| async {
            // A restarted agent still assigned the commands neither runs them again nor loses
            // their results.
            let mut h = vm_harness(root.path(), images.clone());
            h.agent.readopt().await;
            h.agent.set_desired(assignments(1, &both));
            for _ in 0..5 {
                h.pass().await;
            }
            for a in &both {
                let states = h.control.states(a.instance_id);
                assert_eq!(states, [InstanceState::Exited], "{states:?}");
            }
            assert_eq!(
                final_report(&h, failure.instance_id).unwrap().exit_code,
                Some(3)
            );
            assert!(qemu_pids(root.path()).is_empty());

            h.agent.set_desired(assignments(2, &[]));
            h.pass_until("forgotten", HEALTHY_TIMEOUT, |h| {
                h.agent.tracked().is_empty()
            })
            .await;
            for a in &both {
                assert!(run_dir_entries(root.path(), a.instance_id).is_empty());
            }
        })
        .unwrap();
}

// A real control plane: kiln-control's API on a private PostgreSQL database, served on an
// ephemeral loopback port and restarted on the same port mid-run.

/// How long a test waits for the agent's tasks to reach the control plane.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

struct ControlServer {
    address: SocketAddr,
    state: kiln_control::api::AppState,
    task: tokio::task::JoinHandle<()>,
    operator_token: String,
    _database: kiln_testkit::postgres::TestDatabase,
    _key_dir: tempfile::TempDir,
}

impl ControlServer {
    async fn start() -> Self {
        let database = tokio::task::spawn_blocking(kiln_testkit::postgres::database)
            .await
            .unwrap()
            .unwrap();
        let store = kiln_control::store::Store::connect(&database.url, 10)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let org = kiln_core::OrgName::new("acme").unwrap();
        let output = kiln_control::bootstrap::bootstrap(
            &store,
            &org,
            "apps.kiln.test",
            Some("fd12:3456:789a::/48"),
        )
        .await
        .unwrap();
        let key_dir = tempfile::tempdir().unwrap();
        let key_file = key_dir.path().join("master.key");
        kiln_control::secrets::Keyring::generate_key(&key_file).unwrap();
        let settings = kiln_control::bootstrap::load_settings(&store)
            .await
            .unwrap()
            .unwrap();
        let state = kiln_control::api::AppState {
            store: store.clone(),
            keyring: Arc::new(kiln_control::secrets::Keyring::load(&key_file).unwrap()),
            notifier: kiln_control::store::watch::Notifier::start(&store)
                .await
                .unwrap(),
            settings: Arc::new(settings),
            limits: Arc::new(kiln_control::api::ApiLimits {
                host_lease: Duration::from_secs(30),
                log_window_lines: 100,
            }),
            release_specs: std::sync::Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = serve(listener, state.clone());
        Self {
            address,
            state,
            task,
            operator_token: output.operator_token.secret,
            _database: database,
            _key_dir: key_dir,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Stops serving (connections are refused) until `resume`.
    fn stop(&self) {
        self.task.abort();
    }

    async fn resume(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.address).await.unwrap();
        self.task = serve(listener, self.state.clone());
    }
}

fn serve(
    listener: tokio::net::TcpListener,
    state: kiln_control::api::AppState,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        axum::serve(listener, kiln_control::api::router(state))
            .await
            .unwrap();
    })
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + CONTROL_TIMEOUT;
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "{what} not reached within {CONTROL_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn watcher_applies_changes_to_the_complete_set() {
    let control = FakeControl::default();
    let (a, b, c, d) = (
        assignment(8080),
        assignment(8081),
        assignment(8082),
        assignment(8083),
    );
    let mut newer_b = b.clone();
    newer_b.release_version = 2;
    let mut changes = assignments(20, &[newer_b.clone(), c.clone()]);
    changes.complete = false;
    changes.removed = vec![a.instance_id];
    {
        let mut inner = control.inner.lock().unwrap();
        let complete = assignments(10, &[a.clone(), b.clone(), d.clone()]);
        inner.watch_pages.push_back(complete);
        inner.watch_pages.push_back(changes);
    }

    let (sender, mut receiver) = tokio::sync::watch::channel(None);
    let watcher = tokio::spawn(kiln_agent::tasks::run_watcher(
        control.clone(),
        7,
        Arc::new(Shared::default()),
        sender,
    ));
    // A watch channel keeps only the newest set, so the first may be skipped.
    let second = tokio::time::timeout(CONTROL_TIMEOUT, async {
        loop {
            receiver.changed().await.unwrap();
            let set = receiver.borrow_and_update().clone().unwrap();
            if set.cursor == 20 {
                return set;
            }
            assert_eq!(set.assignments, vec![a.clone(), b.clone(), d.clone()]);
        }
    })
    .await
    .expect("the changes were never applied");
    watcher.abort();

    assert!(second.complete);
    assert_eq!(second.cursor, 20);
    // d, which the changes do not name, stays.
    assert_eq!(second.assignments, vec![newer_b, d, c]);
    // The first call requests the whole set from the saved cursor, later ones the changes.
    let calls = control.inner.lock().unwrap().watch_calls.clone();
    assert_eq!(calls[..2], [(7, false), (10, true)]);
    assert!(
        calls[2..].iter().all(|call| *call == (20, true)),
        "{calls:?}"
    );
}

#[tokio::test]
async fn watcher_falls_back_without_changes_flag() {
    let control = FakeControl::default();
    let a = assignment(8080);
    {
        let mut inner = control.inner.lock().unwrap();
        inner.rejects_changes = true;
        inner.watch_pages.push_back(assignments(10, &[]));
        inner
            .watch_pages
            .push_back(assignments(20, std::slice::from_ref(&a)));
    }

    let (sender, mut receiver) = tokio::sync::watch::channel(None);
    let watcher = tokio::spawn(kiln_agent::tasks::run_watcher(
        control.clone(),
        0,
        Arc::new(Shared::default()),
        sender,
    ));
    let set = tokio::time::timeout(CONTROL_TIMEOUT, async {
        loop {
            receiver.changed().await.unwrap();
            let set = receiver.borrow_and_update().clone().unwrap();
            if set.cursor == 20 {
                return set;
            }
        }
    })
    .await
    .expect("the complete set after the rejected flag never arrived");
    watcher.abort();

    assert_eq!(set.assignments, vec![a]);
    // One request for changes was rejected, and every later one requests complete sets.
    let calls = control.inner.lock().unwrap().watch_calls.clone();
    assert_eq!(calls[..3], [(0, false), (10, true), (10, false)]);
    assert!(calls[3..].iter().all(|(_, changes)| !changes), "{calls:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_control_plane_register_watch_outage() {
    let mut server = ControlServer::start().await;
    let operator = kiln_api::Client::new(&server.url(), server.operator_token.clone()).unwrap();
    let created = operator
        .create_host(&kiln_api::types::CreateHost {
            name: "host-1".to_owned(),
        })
        .await
        .unwrap();
    let client = kiln_api::Client::new(&server.url(), created.token.secret.clone()).unwrap();

    let shared = Arc::new(Shared::default());
    let key_dir = tempfile::tempdir().unwrap();
    let registration = kiln_api::types::RegisterHost {
        capacity: kiln_api::types::HostCapacity {
            vcpus: 2,
            memory_mib: 4096,
        },
        driver: kiln_api::types::VmmDriver::Qemu,
        overlay_public_key: kiln_agent::overlay_key::load_or_generate(
            &key_dir.path().join("overlay.key"),
        )
        .unwrap(),
        overlay_endpoint: "[::1]:51820".parse().unwrap(),
    };
    let session = tokio::spawn(kiln_agent::tasks::run_session(
        client.clone(),
        registration.clone(),
        Duration::from_millis(200),
        Arc::clone(&shared),
    ));
    let (sender, mut receiver) = tokio::sync::watch::channel(None);
    let watcher = tokio::spawn(kiln_agent::tasks::run_watcher(
        client.clone(),
        0,
        Arc::clone(&shared),
        sender,
    ));

    wait_for("registration", async || {
        shared.host_id.lock().unwrap().is_some()
    })
    .await;
    let host = operator.get_host("host-1").await.unwrap();
    assert_eq!(host.state, kiln_api::types::HostState::Ready);
    assert_eq!(host.capacity, Some(registration.capacity));
    assert_eq!(
        host.overlay_public_key,
        Some(registration.overlay_public_key.clone())
    );
    assert!(host.ipv6_prefix.is_some());
    let first_lease = host.lease_expires_at.unwrap();

    receiver.changed().await.unwrap();
    let set = receiver.borrow_and_update().clone().unwrap();
    assert_eq!(set.host_id, created.host.id);
    assert!(set.assignments.is_empty());

    // The control plane goes away: the agent notices and keeps retrying.
    server.stop();
    wait_for("outage noticed", async || {
        !shared.reachable.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;

    // It comes back on the same address: heartbeats renew the lease again.
    server.resume().await;
    wait_for("lease renewed after the outage", async || {
        let host = operator.get_host("host-1").await.unwrap();
        host.lease_expires_at.is_some_and(|at| at > first_lease)
            && shared.reachable.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;

    // A host token reaches nothing but its own host's endpoints.
    let error = client.list_hosts().await.unwrap_err();
    assert_eq!(
        error.code(),
        Some(kiln_api::ErrorCode::Forbidden),
        "{error}"
    );

    session.abort();
    watcher.abort();
}
