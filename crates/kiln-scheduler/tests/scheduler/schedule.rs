//! The scheduler's rules, each as a property over random clusters and requests.

use std::collections::BTreeMap;

use kiln_core::HostId;
use kiln_scheduler::{
    ClusterSnapshot, CpuShortfall, HostState, InstanceRequest, MemoryShortfall, Placement,
    ScheduleError, Scheduler, SchedulerConfig, schedule,
};
use proptest::prelude::*;

use crate::fixtures::{env_id, host, host_id, instance_id, placed, process, resources};

/// A random cluster (some hosts not ready, some instances already placed) and a request that
/// mixes two envs and two process types.
fn cluster_and_request() -> impl Strategy<Value = (ClusterSnapshot, Vec<InstanceRequest>)> {
    let hosts = proptest::collection::vec(
        (
            prop::sample::select(vec![2048_u64, 3072, 4096, 8192, 16384]),
            1_u32..8,
            prop::sample::select(vec![
                HostState::Ready,
                HostState::Ready,
                HostState::Ready,
                HostState::Cordoned,
                HostState::Draining,
                HostState::Dead,
            ]),
        ),
        1..12,
    );
    let existing = proptest::collection::vec(
        (
            any::<prop::sample::Index>(),
            0_u128..2,
            0_usize..2,
            1_u64..8,
            1_u32..4,
        ),
        0..20,
    );
    let requests = proptest::collection::vec((0_u128..2, 0_usize..2, 1_u64..12, 1_u32..6), 1..40);

    (hosts, existing, requests).prop_map(|(hosts, existing, requests)| {
        let names = ["web", "worker"];
        let hosts: Vec<_> = hosts
            .into_iter()
            .enumerate()
            .map(|(n, (memory, cpus, state))| {
                let mut host = host(n as u128, memory, cpus);
                host.state = state;
                host
            })
            .collect();
        let instances = existing
            .into_iter()
            .enumerate()
            .map(|(n, (host_index, env, name, memory, vcpus))| {
                let host = hosts[host_index.index(hosts.len())].id;
                placed(
                    n as u128,
                    env_id(env),
                    names[name],
                    host,
                    resources(memory * 128, vcpus),
                )
            })
            .collect();
        let requests = requests
            .into_iter()
            .enumerate()
            .map(|(n, (env, name, memory, vcpus))| InstanceRequest {
                id: instance_id(1000 + n as u128),
                env: env_id(env),
                process: process(names[name]),
                resources: resources(memory * 128, vcpus),
            })
            .collect();
        (ClusterSnapshot { hosts, instances }, requests)
    })
}

fn config() -> SchedulerConfig {
    SchedulerConfig {
        vm_overhead_mib: 64,
        host_reserve_mib: 512,
        cpu_oversubscription: 2,
    }
}

/// Memory and vCPUs used per host once `placements` are added to the snapshot.
fn usage(
    snapshot: &ClusterSnapshot,
    requests: &[InstanceRequest],
    placements: &[Placement],
) -> BTreeMap<HostId, (u64, u64)> {
    let overhead = config().vm_overhead_mib;
    let mut used: BTreeMap<HostId, (u64, u64)> = BTreeMap::new();
    for instance in &snapshot.instances {
        let entry = used.entry(instance.host).or_default();
        entry.0 += instance.resources.memory_mib + overhead;
        entry.1 += u64::from(instance.resources.vcpus);
    }
    for (request, placement) in requests.iter().zip(placements) {
        let entry = used.entry(placement.host).or_default();
        entry.0 += request.resources.memory_mib + overhead;
        entry.1 += u64::from(request.resources.vcpus);
    }
    used
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn placements_respect_memory_cap((snapshot, requests) in cluster_and_request()) {
        let Ok(placements) = schedule(&snapshot, config(), &requests) else {
            return Ok(());
        };
        let used = usage(&snapshot, &requests, &placements);
        for placement in &placements {
            let host = snapshot.hosts.iter().find(|h| h.id == placement.host).unwrap();
            let capacity = host.memory_mib.saturating_sub(config().host_reserve_mib);
            prop_assert!(used[&host.id].0 <= capacity, "host {} uses {} of {capacity} MiB", host.name, used[&host.id].0);
        }
    }

    #[test]
    fn placements_respect_cpu_ratio((snapshot, requests) in cluster_and_request()) {
        let Ok(placements) = schedule(&snapshot, config(), &requests) else {
            return Ok(());
        };
        let used = usage(&snapshot, &requests, &placements);
        for placement in &placements {
            let host = snapshot.hosts.iter().find(|h| h.id == placement.host).unwrap();
            let capacity = u64::from(host.cpus) * u64::from(config().cpu_oversubscription);
            prop_assert!(used[&host.id].1 <= capacity);
        }
    }

    #[test]
    fn only_ready_hosts_get_instances((snapshot, requests) in cluster_and_request()) {
        let Ok(placements) = schedule(&snapshot, config(), &requests) else {
            return Ok(());
        };
        prop_assert_eq!(placements.len(), requests.len());
        for (request, placement) in requests.iter().zip(&placements) {
            prop_assert_eq!(request.id, placement.instance);
            let host = snapshot.hosts.iter().find(|h| h.id == placement.host).unwrap();
            prop_assert_eq!(host.state, HostState::Ready);
        }
    }

    /// If host `a` got a new replica and holds at least two more replicas of that env and
    /// process type than ready host `b`, then `b` has no room for one more.
    #[test]
    fn replicas_spread_as_capacity_allows((snapshot, requests) in cluster_and_request()) {
        let Ok(placements) = schedule(&snapshot, config(), &requests) else {
            return Ok(());
        };
        let mut scheduler = Scheduler::new(&snapshot, config()).unwrap();
        for (request, placement) in requests.iter().zip(&placements) {
            scheduler.place_on(request, placement.host).unwrap();
        }

        // Only the last replica placed on a host is compared: earlier ones may be smaller than
        // one that later went there because it fitted nowhere else.
        let mut last_on_host = BTreeMap::new();
        for (request, placement) in requests.iter().zip(&placements) {
            last_on_host.insert((request.env, request.process.clone(), placement.host), request);
        }

        for ((env, process, a), request) in last_on_host {
            let on_a = scheduler.replicas_on(env, &process, a);
            for b in snapshot.hosts.iter().filter(|h| h.state == HostState::Ready) {
                let on_b = scheduler.replicas_on(env, &process, b.id);
                if on_a < on_b + 2 {
                    continue;
                }
                let fits_memory = scheduler.free_memory_mib(b.id).unwrap()
                    >= request.resources.memory_mib + config().vm_overhead_mib;
                let fits_cpu = scheduler.free_vcpus(b.id).unwrap() >= u64::from(request.resources.vcpus);
                prop_assert!(
                    !(fits_memory && fits_cpu),
                    "{a} has {on_a} replicas while {} has {on_b} and room for more",
                    b.name
                );
            }
        }
    }

    #[test]
    fn same_input_same_placements((snapshot, requests) in cluster_and_request(), seed in any::<u64>()) {
        let first = schedule(&snapshot, config(), &requests);

        // The order of hosts and instances in the snapshot must not matter.
        let mut shuffled = snapshot.clone();
        let rotate = seed as usize;
        let hosts = shuffled.hosts.len();
        shuffled.hosts.rotate_left(rotate % hosts);
        shuffled.hosts.reverse();
        if !shuffled.instances.is_empty() {
            let instances = shuffled.instances.len();
            shuffled.instances.rotate_left(rotate % instances);
        }
        let second = schedule(&shuffled, config(), &requests);
        prop_assert_eq!(first, second);
    }

    /// A failure names the real largest free memory, after the instances of the request that did
    /// fit, and places nothing.
    #[test]
    fn failure_explanation_is_true((snapshot, requests) in cluster_and_request()) {
        let mut scheduler = Scheduler::new(&snapshot, config()).unwrap();
        let Err(error) = scheduler.place(&requests) else {
            return Ok(());
        };
        for request in &requests {
            prop_assert_eq!(scheduler.host_of(request.id), None, "partial placement kept");
        }

        let ready: Vec<_> = snapshot.hosts.iter().filter(|h| h.state == HostState::Ready).collect();
        match error {
            ScheduleError::NoReadyHost { .. } => prop_assert!(ready.is_empty()),
            ScheduleError::InsufficientMemory(shortfall) => {
                let MemoryShortfall { placed, required_mib, largest_free_mib, host, .. } = *shortfall;
                scheduler.place(&requests[..placed]).unwrap();
                let max = ready.iter().map(|h| scheduler.free_memory_mib(h.id).unwrap()).max().unwrap();
                prop_assert!(max < required_mib);
                prop_assert_eq!(max, largest_free_mib);
                let named = ready.iter().find(|h| h.name == host).unwrap();
                prop_assert_eq!(scheduler.free_memory_mib(named.id).unwrap(), max);
            }
            ScheduleError::InsufficientCpu(shortfall) => {
                let CpuShortfall { placed, required_mib, vcpus, most_free_vcpus, .. } = *shortfall;
                scheduler.place(&requests[..placed]).unwrap();
                let roomy: Vec<_> = ready
                    .iter()
                    .filter(|h| scheduler.free_memory_mib(h.id).unwrap() >= required_mib)
                    .collect();
                prop_assert!(!roomy.is_empty());
                let max = roomy.iter().map(|h| scheduler.free_vcpus(h.id).unwrap()).max().unwrap();
                prop_assert!(max < u64::from(vcpus));
                prop_assert_eq!(max, most_free_vcpus);
            }
            other => prop_assert!(false, "unexpected error {other}"),
        }
    }
}

#[test]
fn memory_failure_message_names_largest_host() {
    let env = env_id(1);
    let snapshot = ClusterSnapshot {
        hosts: vec![
            host(1, 2048, 4),
            host(2, 1024 + 1024, 4),
            host(3, 1024 + 1536, 4),
        ],
        instances: vec![placed(1, env, "web", host_id(1), resources(896, 1))],
    };
    let config = SchedulerConfig {
        vm_overhead_mib: 128,
        ..SchedulerConfig::default()
    };
    let request = InstanceRequest {
        id: instance_id(9),
        env,
        process: process("web"),
        resources: resources(1920, 1),
    };

    let error = schedule(&snapshot, config, &[request]).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("no host has 2048 MiB free"),
        "message: {message}"
    );
    assert!(
        message.contains("the largest free is 1536 MiB on host h3"),
        "message: {message}"
    );
}

#[test]
fn cpu_failure_message_names_ratio() {
    let snapshot = ClusterSnapshot {
        hosts: vec![host(1, 8192, 1), host(2, 8192, 2)],
        instances: Vec::new(),
    };
    let request = InstanceRequest {
        id: instance_id(1),
        env: env_id(1),
        process: process("web"),
        resources: resources(256, 9),
    };
    let message = schedule(&snapshot, SchedulerConfig::default(), &[request])
        .unwrap_err()
        .to_string();
    assert!(message.contains("9 vCPUs free"), "message: {message}");
    assert!(message.contains("oversubscribed 4x"), "message: {message}");
    assert!(
        message.contains("the most free is 8 vCPUs on host h2"),
        "message: {message}"
    );
}

#[test]
fn no_ready_host_counts_states() {
    let mut cordoned = host(1, 8192, 4);
    cordoned.state = HostState::Cordoned;
    let mut dead = host(2, 8192, 4);
    dead.state = HostState::Dead;
    let snapshot = ClusterSnapshot {
        hosts: vec![cordoned, dead],
        instances: Vec::new(),
    };
    let request = InstanceRequest {
        id: instance_id(1),
        env: env_id(1),
        process: process("web"),
        resources: resources(256, 1),
    };
    let message = schedule(&snapshot, SchedulerConfig::default(), &[request])
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("no host is ready (1 cordoned, 0 draining, 1 dead)"),
        "message: {message}"
    );
}

#[test]
fn replicas_spread_before_packing() {
    let snapshot = ClusterSnapshot {
        hosts: (1..=3).map(|n| host(n, 16384, 8)).collect(),
        instances: Vec::new(),
    };
    let requests: Vec<_> = (0..6)
        .map(|n| InstanceRequest {
            id: instance_id(n),
            env: env_id(1),
            process: process("web"),
            resources: resources(512, 1),
        })
        .collect();
    let placements = schedule(&snapshot, SchedulerConfig::default(), &requests).unwrap();
    let mut per_host: BTreeMap<HostId, usize> = BTreeMap::new();
    for placement in placements {
        *per_host.entry(placement.host).or_default() += 1;
    }
    assert_eq!(
        per_host.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2]
    );
}

#[test]
fn duplicate_instance_rejected() {
    let snapshot = ClusterSnapshot {
        hosts: vec![host(1, 8192, 4)],
        instances: vec![placed(1, env_id(1), "web", host_id(1), resources(256, 1))],
    };
    let request = InstanceRequest {
        id: instance_id(1),
        env: env_id(1),
        process: process("web"),
        resources: resources(256, 1),
    };
    assert_eq!(
        schedule(&snapshot, SchedulerConfig::default(), &[request]),
        Err(ScheduleError::DuplicateInstance {
            instance: instance_id(1)
        })
    );
}

#[test]
fn zero_oversubscription_rejected() {
    let config = SchedulerConfig {
        cpu_oversubscription: 0,
        ..SchedulerConfig::default()
    };
    assert_eq!(
        schedule(&ClusterSnapshot::default(), config, &[]),
        Err(ScheduleError::InvalidOversubscription)
    );
}
