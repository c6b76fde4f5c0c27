//! Placements per second of the pure scheduler core: 10,000 instances on 1,000 hosts.
//!
//! The anchor is Nomad's published C1M result: one million containers on 5,000 hosts in under
//! five minutes, about 3,750 placements per second. Nomad cannot run here, so the anchor is
//! that published figure; the ratio printed is this run's rate over it.

use std::hint::black_box;
use std::time::{Duration, Instant};

use kiln_core::{EnvId, HostId, InstanceId, ProcessName};
use kiln_scheduler::{
    ClusterSnapshot, Host, HostState, InstanceRequest, PlacedInstance, Resources, Scheduler,
    SchedulerConfig,
};
use uuid::Uuid;

const HOSTS: u128 = 1_000;
const INSTANCES: u128 = 10_000;
const ENVS: u128 = 100;
const ROUNDS: usize = 15;
const NOMAD_PLACEMENTS_PER_SEC: f64 = 3_750.0;
const TARGET_PLACEMENTS_PER_SEC: f64 = 50_000.0;

fn main() {
    let processes = [
        ProcessName::new("web").expect("valid name"),
        ProcessName::new("worker").expect("valid name"),
    ];
    let hosts: Vec<Host> = (0..HOSTS)
        .map(|n| Host {
            id: HostId::from_uuid(Uuid::from_u128(n)),
            name: format!("h{n}"),
            memory_mib: 64 * 1024,
            cpus: 16,
            state: if n % 50 == 0 {
                HostState::Cordoned
            } else {
                HostState::Ready
            },
        })
        .collect();
    let requests = |offset: u128| -> Vec<InstanceRequest> {
        (0..INSTANCES)
            .map(|n| InstanceRequest {
                id: InstanceId::from_uuid(Uuid::from_u128(offset + n)),
                env: EnvId::from_uuid(Uuid::from_u128(n % ENVS)),
                process: processes[(n % 2) as usize].clone(),
                resources: Resources {
                    memory_mib: 256 << (n % 3),
                    vcpus: 1 + (n % 2) as u32,
                },
            })
            .collect()
    };

    let empty = ClusterSnapshot {
        hosts: hosts.clone(),
        instances: Vec::new(),
    };
    let first = requests(0);
    let mut busy = empty.clone();
    let placements = Scheduler::new(&empty, SchedulerConfig::default())
        .and_then(|mut scheduler| scheduler.place(&first))
        .expect("the first 10,000 instances fit");
    busy.instances = first
        .iter()
        .zip(&placements)
        .map(|(request, placement)| PlacedInstance {
            id: request.id,
            env: request.env,
            process: request.process.clone(),
            host: placement.host,
            resources: request.resources,
        })
        .collect();

    println!(
        "scheduler core: {INSTANCES} placements on {HOSTS} hosts, best and median of {ROUNDS} rounds"
    );
    println!("anchor: Nomad C1M, published {NOMAD_PLACEMENTS_PER_SEC} placements/s");
    measure("empty cluster", &empty, &first);
    measure("cluster with 10,000 instances", &busy, &requests(INSTANCES));
}

fn measure(label: &str, snapshot: &ClusterSnapshot, requests: &[InstanceRequest]) {
    let mut times: Vec<Duration> = (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            let mut scheduler =
                Scheduler::new(black_box(snapshot), SchedulerConfig::default()).expect("valid");
            let placements = scheduler.place(black_box(requests)).expect("fits");
            black_box(placements);
            started.elapsed()
        })
        .collect();
    times.sort();

    let rate = |time: Duration| requests.len() as f64 / time.as_secs_f64();
    let best = rate(times[0]);
    let median = rate(times[ROUNDS / 2]);
    println!(
        "{label}: median {median:.0} placements/s (best {best:.0}), {:.1}x Nomad, {:.1}x the {TARGET_PLACEMENTS_PER_SEC} target",
        median / NOMAD_PLACEMENTS_PER_SEC,
        median / TARGET_PLACEMENTS_PER_SEC,
    );
}
