//! Hang comparison under TCG: boots of `-M microvm` with `tsc_early_khz=` and of `-M q35`,
//! alternating, while CPU burners keep every host core busy. A boot that prints nothing
//! within the boot timeout counts as a hang. Run through bench/boot/hangs.
//!
//! Each boot runs QEMU with the driver's own command line (`QemuDriver::arguments`) but
//! without the driver's retry, because a retry would hide a hang. The example sends the
//! config after kiln-init's hello itself and times QEMU's spawn to the first output line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln_core::InstanceId;
use kiln_testkit::guest::{self, RootfsBuilder};
use kiln_vmm::proto::{self, GuestMessage, HostMessage};
use kiln_vmm::qemu::{QemuConfig, QemuDriver, TcgMachine};
use kiln_vmm::{GuestAssets, VmSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long QEMU gets to create its channel socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between attempts to connect to QEMU's channel socket.
const CONNECT_INTERVAL: Duration = Duration::from_millis(5);

#[derive(Debug)]
enum Outcome {
    FirstLine(f64),
    Hang,
    Failed(String),
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let boots: usize = args
        .next()
        .map(|n| n.parse().expect("BOOTS must be a whole number"))
        .unwrap_or(100);
    let timeout = Duration::from_secs(
        args.next()
            .map(|n| {
                n.parse()
                    .expect("TIMEOUT_S must be a whole number of seconds")
            })
            .unwrap_or(60),
    );
    let burners: usize = args
        .next()
        .map(|n| n.parse().expect("BURNERS must be a whole number"))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, usize::from));

    let work = tempfile::Builder::new()
        .prefix("kvm-hangs-")
        .tempdir()
        .unwrap();
    let image = work.path().join("image.ext4");
    RootfsBuilder::new().build(&image).unwrap();
    let assets_dir = guest::guest_assets_dir().unwrap();
    let kernel = std::fs::read_to_string(assets_dir.join("kernel-version"))
        .unwrap_or_else(|_| "unknown".to_owned());
    let assets = GuestAssets::in_dir(&assets_dir);
    let hardware = kiln_vmm::accel::detect();
    let drivers: Vec<(&str, QemuDriver)> = [
        ("microvm + tsc_early_khz", TcgMachine::Microvm),
        ("q35", TcgMachine::Q35),
    ]
    .into_iter()
    .map(|(label, machine)| {
        let config = QemuConfig {
            allow_software_virtualization: true,
            tcg_machine: machine,
            ..QemuConfig::default()
        };
        (label, QemuDriver::with_hardware(config, &hardware).unwrap())
    })
    .collect();
    println!(
        "kernel {}; {boots} boots per machine; boot timeout {timeout:?}; {burners} CPU burners",
        kernel.trim()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let burner_threads: Vec<_> = (0..burners)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x: u64 = 1;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();

    let mut outcomes: Vec<Vec<Outcome>> = drivers.iter().map(|_| Vec::new()).collect();
    for boot in 0..boots {
        for (index, (label, driver)) in drivers.iter().enumerate() {
            let dir = work.path().join(format!("{index}-{boot}"));
            let outcome = boot_once(driver, &assets, &image, &dir, timeout).await;
            match &outcome {
                Outcome::FirstLine(seconds) => eprintln!("{label} boot {boot}: {seconds:.2} s"),
                Outcome::Hang => eprintln!("{label} boot {boot}: no output in {timeout:?}"),
                Outcome::Failed(error) => eprintln!("{label} boot {boot}: failed: {error}"),
            }
            outcomes[index].push(outcome);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for thread in burner_threads {
        thread.join().unwrap();
    }

    println!();
    println!(
        "| machine (TCG) | boots | hangs | other failures | first line median (s) | p90 (s) | max (s) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for ((label, _), outcomes) in drivers.iter().zip(&outcomes) {
        let mut times: Vec<f64> = outcomes
            .iter()
            .filter_map(|outcome| match outcome {
                Outcome::FirstLine(seconds) => Some(*seconds),
                _ => None,
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let hangs = outcomes
            .iter()
            .filter(|outcome| matches!(outcome, Outcome::Hang))
            .count();
        let failed = outcomes
            .iter()
            .filter(|outcome| matches!(outcome, Outcome::Failed(_)))
            .count();
        let at = |fraction: f64| {
            times
                .get(((times.len() as f64 * fraction) as usize).min(times.len().saturating_sub(1)))
                .map_or("-".to_owned(), |value| format!("{value:.2}"))
        };
        println!(
            "| {label} | {} | {hangs} | {failed} | {} | {} | {} |",
            outcomes.len(),
            at(0.5),
            at(0.9),
            times
                .last()
                .map_or("-".to_owned(), |value| format!("{value:.2}")),
        );
    }
}

async fn boot_once(
    driver: &QemuDriver,
    assets: &GuestAssets,
    image: &Path,
    dir: &Path,
    timeout: Duration,
) -> Outcome {
    let spec = VmSpec::new(
        InstanceId::new(),
        dir.to_owned(),
        assets.clone(),
        image.to_owned(),
    );
    std::fs::create_dir_all(dir).unwrap();
    let channel = dir.join("channel.sock");

    let started = Instant::now();
    let mut child = match tokio::process::Command::new(kiln_vmm::qemu::DEFAULT_BINARY)
        .args(driver.arguments(&spec))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(error) => return Outcome::Failed(format!("spawning QEMU failed: {error}")),
    };

    let exchange = async {
        let connect_deadline = Instant::now() + SOCKET_TIMEOUT;
        let mut stream = loop {
            match tokio::net::UnixStream::connect(&channel).await {
                Ok(stream) => break stream,
                Err(error) if Instant::now() > connect_deadline => {
                    return Err(format!(
                        "connecting to {} failed: {error}",
                        channel.display()
                    ));
                }
                Err(_) => tokio::time::sleep(CONNECT_INTERVAL).await,
            }
        };
        loop {
            let mut prefix = [0u8; 4];
            stream
                .read_exact(&mut prefix)
                .await
                .map_err(|e| format!("QEMU closed the channel: {e}"))?;
            let mut body = vec![0u8; proto::frame_len(prefix).map_err(|e| e.to_string())?];
            stream
                .read_exact(&mut body)
                .await
                .map_err(|e| e.to_string())?;
            match proto::decode::<GuestMessage>(&body).map_err(|e| e.to_string())? {
                GuestMessage::Hello { .. } => {
                    let mut config = guest::instance_config(&["/bin/echo", "first"]);
                    config.uid = 0;
                    config.gid = 0;
                    let frame = proto::encode(&HostMessage::Config(Box::new(config))).unwrap();
                    stream.write_all(&frame).await.map_err(|e| e.to_string())?;
                }
                GuestMessage::Log { .. } => return Ok(()),
                GuestMessage::Started { .. } => {}
                other => return Err(format!("unexpected message {other:?}")),
            }
        }
    };
    let result = tokio::time::timeout(timeout, exchange).await;
    let seconds = started.elapsed().as_secs_f64();
    let _ = child.kill().await;
    match result {
        Ok(Ok(())) => Outcome::FirstLine(seconds),
        Ok(Err(error)) => {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr).await;
            }
            Outcome::Failed(format!("{error}; QEMU stderr: {}", stderr.trim()))
        }
        Err(_) => Outcome::Hang,
    }
}
