//! Benchmark harnesses for `bench/agent/run`, ignored by default and asserting nothing about
//! time or memory. One measures cached-image start to healthy through the agent against a
//! bare kiln-vmm boot in the same run. The other measures the host memory that idle instances
//! take beyond their guest memory.

use std::collections::BTreeMap;

use kiln_agent::steps::parse_summary;
use time::OffsetDateTime;

use super::*;

/// How long the density harness waits for all its instances to run.
const DENSITY_TIMEOUT: Duration = Duration::from_secs(3600);

/// Guest memory of every instance in the density harness, in MiB.
const DENSITY_MEMORY_MIB: u32 = 128;

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn seconds_between(from: OffsetDateTime, to: OffsetDateTime) -> f64 {
    (to - from).as_seconds_f64()
}

/// One start's figures in seconds, by name.
type StartFigures = BTreeMap<String, f64>;

/// Reads the start's step durations and the times of its state lines from the instance's
/// queued log lines.
fn start_figures(h: &VmHarness, id: InstanceId) -> StartFigures {
    let shared = h.agent.shared();
    let logs = shared.logs.lock().unwrap();
    let lines = logs.get(&id).unwrap().peek_pending(10_000);
    let mut figures = StartFigures::new();
    let time_of = |text: &str| {
        lines
            .iter()
            .find(|line| line.line.starts_with(text))
            .map(|line| line.time)
    };
    for line in &lines {
        if let Some(steps) = parse_summary(&line.line) {
            for (name, millis) in steps {
                figures.insert(format!("agent: {name}"), millis as f64 / 1000.0);
            }
        }
    }
    let running = time_of("state Running").unwrap();
    let started = time_of("workload started").unwrap();
    let healthy = time_of("state Healthy").unwrap();
    figures.insert(
        "guest: hello to workload started".to_owned(),
        seconds_between(running, started),
    );
    figures.insert(
        "agent: workload started to healthy".to_owned(),
        seconds_between(started, healthy),
    );
    figures
}

#[test]
#[ignore = "benchmark: run through bench/agent/run"]
fn bench_start_to_healthy() {
    let starts = env_count("KILN_BENCH_STARTS", 10);
    let namespace = NetNs::create("bench").unwrap();
    let root = tempfile::tempdir().unwrap();
    let _guard = KillVmsOnDrop(root.path().to_path_buf());
    let rootfs = root.path().join("rootfs.ext4");
    kiln_testkit::guest::RootfsBuilder::new()
        .build(&rootfs)
        .unwrap();
    let images = BusyboxImages {
        rootfs: rootfs.clone(),
        uid: kiln_testkit::guest::APP_UID,
    };

    let (totals, bare_times, figures) = namespace
        .block_on(|| async {
            let mut h = vm_harness(root.path(), images);
            let driver = kiln_vmm::qemu::QemuDriver::new(kiln_vmm::qemu::QemuConfig {
                allow_software_virtualization: true,
                ..kiln_vmm::qemu::QemuConfig::default()
            })
            .unwrap();
            let assets =
                kiln_vmm::GuestAssets::in_dir(&kiln_testkit::guest::guest_assets_dir().unwrap());
            let mut totals = Vec::new();
            let mut bare_times = Vec::new();
            let mut figures = Vec::new();

            // Agent starts and bare boots alternate, so both see the same host load.
            for start in 0..starts {
                let mut a = vm_assignment(
                    2 + u16::try_from(start % 200).unwrap(),
                    "exec httpd -f -p [::]:8080 -h /www",
                );
                // The default check of a port without one in the manifest.
                a.ports[0].health_check = Some(kiln_agent::health::DEFAULT_CHECK);
                let id = a.instance_id;
                let began = Instant::now();
                h.agent
                    .set_desired(assignments(start as u64 * 2 + 1, std::slice::from_ref(&a)));
                loop {
                    h.pass().await;
                    if h.phase(id) == Some(Phase::Healthy) {
                        break;
                    }
                    assert!(
                        began.elapsed() < HEALTHY_TIMEOUT,
                        "start {start} never healthy"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                totals.push(began.elapsed().as_secs_f64());
                figures.push(start_figures(&h, id));
                h.agent.set_desired(assignments(start as u64 * 2 + 2, &[]));
                h.pass_until("forgotten", HEALTHY_TIMEOUT, |h| {
                    h.agent.tracked().is_empty()
                })
                .await;

                let dir = tempfile::tempdir().unwrap();
                let spec = kiln_vmm::VmSpec::new(
                    InstanceId::new(),
                    dir.path().join("vm"),
                    assets.clone(),
                    rootfs.clone(),
                );
                let config = kiln_testkit::guest::instance_config(&["/bin/sleep", "600"]);
                let began = Instant::now();
                let mut vm = kiln_vmm::Driver::create(&driver, spec).await.unwrap();
                let _events = kiln_vmm::Driver::start(&driver, &mut vm, config)
                    .await
                    .unwrap();
                bare_times.push(began.elapsed().as_secs_f64());
                kiln_vmm::Driver::kill(&driver, &mut vm).await.unwrap();
                eprintln!(
                    "start {start}: agent {:.2} s, bare boot {:.2} s",
                    totals[start], bare_times[start]
                );
            }
            (totals, bare_times, figures)
        })
        .unwrap();

    let total_p50 = percentile(&totals, 0.5);
    let bare_p50 = percentile(&bare_times, 0.5);
    println!("starts: {starts}");
    println!("| measure | p50 (s) | p99 (s) |");
    println!("| --- | --- | --- |");
    println!(
        "| agent: assignment to healthy | {total_p50:.3} | {:.3} |",
        percentile(&totals, 0.99)
    );
    println!(
        "| anchor: bare kiln-vmm QEMU boot to kiln-init hello | {bare_p50:.3} | {:.3} |",
        percentile(&bare_times, 0.99)
    );
    let names: Vec<String> = figures[0].keys().cloned().collect();
    for name in names {
        let values: Vec<f64> = figures
            .iter()
            .filter_map(|figure| figure.get(&name).copied())
            .collect();
        println!(
            "| {name} | {:.3} | {:.3} |",
            percentile(&values, 0.5),
            percentile(&values, 0.99)
        );
    }
    println!("ratio agent / anchor at p50: {:.2}", total_p50 / bare_p50);
}

/// Returns a `/proc/PID/status` or `smaps_rollup` field in KiB.
fn proc_kib(path: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {path}"))
}

/// Returns the resident KiB of QEMU's guest RAM: the largest-resident anonymous mapping whose
/// size is the guest memory (plus at most 4 MiB of alignment).
fn guest_ram_rss_kib(pid: u32, memory_mib: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let guest_kib = u64::from(memory_mib) * 1024;
    let mut best = 0;
    let mut size = 0;
    for line in smaps.lines() {
        let number = |rest: &str| -> u64 {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0)
        };
        if let Some(rest) = line.strip_prefix("Size:") {
            size = number(rest);
        } else if let Some(rest) = line.strip_prefix("Rss:")
            && (guest_kib..=guest_kib + 4096).contains(&size)
        {
            best = best.max(number(rest));
        }
    }
    best
}

#[test]
#[ignore = "benchmark: run through bench/agent/run"]
fn bench_density() {
    let count = env_count("KILN_BENCH_INSTANCES", 50);
    let namespace = NetNs::create("dens").unwrap();
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
            let mut h = vm_harness(root.path(), images);
            let agent_before = proc_kib("/proc/self/status", "VmRSS:");
            let idle: Vec<Assignment> = (0..count)
                .map(|index| {
                    let mut a = vm_assignment(2 + u16::try_from(index).unwrap(), "exec sleep 1000000");
                    a.ports.clear();
                    a.memory_mib = DENSITY_MEMORY_MIB;
                    a
                })
                .collect();
            let began = Instant::now();
            h.agent.set_desired(assignments(1, &idle));
            h.pass_until("all instances running", DENSITY_TIMEOUT, |h| {
                idle.iter()
                    .all(|a| h.phase(a.instance_id) == Some(Phase::Healthy))
            })
            .await;
            let started_in = began.elapsed();
            let agent_after = proc_kib("/proc/self/status", "VmRSS:");

            let pids = qemu_pids(root.path());
            assert_eq!(pids.len(), count);
            let mut rss = Vec::new();
            let mut pss = Vec::new();
            let mut guest = Vec::new();
            for pid in &pids {
                let rollup = format!("/proc/{pid}/smaps_rollup");
                rss.push(proc_kib(&rollup, "Rss:") as f64 / 1024.0);
                pss.push(proc_kib(&rollup, "Pss:") as f64 / 1024.0);
                guest.push(guest_ram_rss_kib(*pid, DENSITY_MEMORY_MIB) as f64 / 1024.0);
            }
            let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len() as f64;
            let overhead_rss: Vec<f64> = rss.iter().zip(&guest).map(|(r, g)| r - g).collect();
            let overhead_pss: Vec<f64> = pss.iter().zip(&guest).map(|(p, g)| p - g).collect();
            let agent_growth = (agent_after as f64 - agent_before as f64) / 1024.0 / count as f64;

            println!("instances: {count} idle, {DENSITY_MEMORY_MIB} MiB guest memory each, all running after {:.0} s", started_in.as_secs_f64());
            println!("| measure (MiB per instance) | mean | p50 | max |");
            println!("| --- | --- | --- | --- |");
            for (name, values) in [
                ("QEMU RSS", &rss),
                ("QEMU PSS", &pss),
                ("guest RAM resident", &guest),
                ("QEMU RSS beyond guest RAM", &overhead_rss),
                ("QEMU PSS beyond guest RAM", &overhead_pss),
            ] {
                let max = values.iter().copied().fold(f64::MIN, f64::max);
                println!(
                    "| {name} | {:.1} | {:.1} | {max:.1} |",
                    mean(values),
                    percentile(values, 0.5)
                );
            }
            println!("| agent RSS growth | {agent_growth:.2} | | |");
            println!("anchor: Firecracker's published VMM overhead, at most 5 MiB per microVM");
            println!(
                "ratio QEMU PSS beyond guest RAM / 5 MiB: {:.1}",
                mean(&overhead_pss) / 5.0
            );

            h.agent.set_desired(assignments(2, &[]));
            h.pass_until("all forgotten", DENSITY_TIMEOUT, |h| {
                h.agent.tracked().is_empty()
            })
            .await;
        })
        .unwrap();
}
