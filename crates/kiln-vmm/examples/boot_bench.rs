//! Boot benchmark: time from `start()` to the workload's first output line, and QEMU's
//! resident memory at that moment, for the QEMU driver; beside it the same boot from a bare,
//! hand-written QEMU command line with the same kernel, initramfs, rootfs and devices, so the
//! ratio shows the driver's own overhead. Run through bench/boot/run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_core::InstanceId;
use kiln_testkit::guest::{self, RootfsBuilder};
use kiln_vmm::proto::{self, GuestMessage, HostMessage};
use kiln_vmm::qemu::{QemuConfig, QemuDriver, TcgMachine};
use kiln_vmm::{Driver, GuestAssets, VmSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on one boot, first output line included.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy)]
struct Sample {
    seconds: f64,
    rss_mib: f64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let boots: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("boot count"))
        .unwrap_or(20);
    let work = tempfile::Builder::new()
        .prefix("kvm-bench-")
        .tempdir()
        .unwrap();
    let image = work.path().join("image.ext4");
    RootfsBuilder::new().build(&image).unwrap();
    let assets_dir = guest::guest_assets_dir().unwrap();
    let kernel = std::fs::read_to_string(assets_dir.join("kernel-version"))
        .unwrap_or_else(|_| "unknown".to_owned());
    let assets = GuestAssets::in_dir(&assets_dir);
    let hardware = kiln_vmm::accel::detect();
    println!("hardware virtualization: {hardware:?}");
    println!("guest kernel: {}", kernel.trim());

    let mut rows = Vec::new();
    for machine in [TcgMachine::Q35, TcgMachine::Microvm] {
        let config = QemuConfig {
            allow_software_virtualization: true,
            tcg_machine: machine,
            ..QemuConfig::default()
        };
        let driver = QemuDriver::with_hardware(config, &hardware).unwrap();
        let label = format!("qemu {} {machine:?}", driver.accelerator());

        let mut kiln = Vec::new();
        let mut bare = Vec::new();
        let mut failures = (0, 0);
        for boot in 0..boots {
            // Alternate so both see the same host load.
            match boot_with_driver(&driver, &assets, &image, work.path(), boot).await {
                Ok(sample) => kiln.push(sample),
                Err(error) => {
                    eprintln!("{label}: kiln boot {boot} failed: {error}");
                    failures.0 += 1;
                }
            }
            let dir = work.path().join(format!("bare-{boot}"));
            let args = bare_arguments(&driver, machine, &assets, &image, &dir);
            match boot_bare(args).await {
                Ok(sample) => bare.push(sample),
                Err(error) => {
                    eprintln!("{label}: bare boot {boot} failed: {error}");
                    failures.1 += 1;
                }
            }
        }
        if kiln.is_empty() || bare.is_empty() {
            eprintln!("{label}: no successful boots");
            continue;
        }
        rows.push((label, summarize(&kiln), summarize(&bare), failures));
    }

    println!();
    println!(
        "| setup | kiln start() to first line (median s) | bare QEMU (median s) | ratio | kiln QEMU RSS (MiB) | bare QEMU RSS (MiB) | failed boots kiln/bare |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (label, kiln, bare, failures) in rows {
        println!(
            "| {label} | {:.2} | {:.2} | {:.2}x | {:.0} | {:.0} | {}/{} |",
            kiln.seconds,
            bare.seconds,
            kiln.seconds / bare.seconds,
            kiln.rss_mib,
            bare.rss_mib,
            failures.0,
            failures.1
        );
    }
    println!("\n{boots} boots each, median; workload: /bin/echo first");
    if let kiln_vmm::accel::HardwareVirt::Unusable(reason) = &hardware {
        println!(
            "KVM and Firecracker not measured ({reason}); their anchor on hardware hosts is \
             Firecracker's published 125 ms from InstanceStart to guest init and 5 MiB of VMM \
             memory"
        );
    }
}

fn summarize(samples: &[Sample]) -> Sample {
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    Sample {
        seconds: median(samples.iter().map(|s| s.seconds).collect()),
        rss_mib: median(samples.iter().map(|s| s.rss_mib).collect()),
    }
}

fn config() -> proto::InstanceConfig {
    let mut config = guest::instance_config(&["/bin/echo", "first"]);
    config.uid = 0;
    config.gid = 0;
    config
}

async fn boot_with_driver(
    driver: &QemuDriver,
    assets: &GuestAssets,
    image: &Path,
    work: &Path,
    boot: usize,
) -> Result<Sample, String> {
    let spec = VmSpec::new(
        InstanceId::new(),
        work.join(format!("kiln-{boot}")),
        assets.clone(),
        image.to_owned(),
    );
    let mut vm = driver.create(spec).await.map_err(|e| e.to_string())?;

    let started = Instant::now();
    let result = async {
        let mut events = driver
            .start(&mut vm, config())
            .await
            .map_err(|e| e.to_string())?;
        let first_line = tokio::time::timeout(BOOT_TIMEOUT, async {
            while let Some(message) = events.recv().await {
                if matches!(message, GuestMessage::Log { .. }) {
                    return Ok(());
                }
            }
            Err("guest ended without output".to_owned())
        });
        first_line
            .await
            .map_err(|_| "first output line timed out".to_owned())??;
        Ok::<f64, String>(started.elapsed().as_secs_f64())
    }
    .await;

    let rss_kib = vm
        .pid()
        .and_then(kiln_vmm::process::rss_kib)
        .unwrap_or_default();
    let _ = driver.kill(&mut vm).await;
    Ok(Sample {
        seconds: result?,
        rss_mib: rss_kib as f64 / 1024.0,
    })
}

/// The anchor's command line, written out by hand: the same machine, kernel, initramfs, disk
/// and channel device as the driver uses, with none of its sockets for QMP or the console.
fn bare_arguments(
    driver: &QemuDriver,
    machine: TcgMachine,
    assets: &GuestAssets,
    image: &Path,
    dir: &Path,
) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let machine = match machine {
        TcgMachine::Q35 => "q35".to_owned(),
        TcgMachine::Microvm => "microvm,x-option-roms=off,rtc=off,isa-serial=on".to_owned(),
    };
    let mut cmdline =
        "console=ttyS0 panic=-1 quiet no_timer_check kiln.channel=virtio-serial".to_owned();
    if let Some(khz) = driver.tsc_khz() {
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let (blk, serial) = if machine.starts_with("microvm") {
        ("virtio-blk-device", "virtio-serial-device")
    } else {
        ("virtio-blk-pci", "virtio-serial-pci")
    };
    let channel = dir.join("channel.sock");
    vec![
        "-M".into(),
        machine,
        "-accel".into(),
        driver.accelerator().to_string(),
        "-m".into(),
        "256".into(),
        "-smp".into(),
        "1".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        assets.bzimage.display().to_string(),
        "-initrd".into(),
        assets.initramfs.display().to_string(),
        "-append".into(),
        cmdline,
        "-serial".into(),
        "null".into(),
        "-drive".into(),
        format!(
            "file={},if=none,id=image,format=raw,readonly=on",
            image.display()
        ),
        "-device".into(),
        format!("{blk},drive=image"),
        "-device".into(),
        serial.into(),
        "-chardev".into(),
        format!(
            "socket,id=channel,path={},server=on,wait=off",
            channel.display()
        ),
        "-device".into(),
        "virtserialport,chardev=channel,name=kiln.channel".into(),
    ]
}

async fn boot_bare(args: Vec<String>) -> Result<Sample, String> {
    let channel = PathBuf::from(
        args.iter()
            .find_map(|arg| arg.strip_prefix("socket,id=channel,path="))
            .and_then(|rest| rest.split(',').next())
            .unwrap(),
    );
    let _ = std::fs::remove_file(&channel);

    let started = Instant::now();
    let mut child = tokio::process::Command::new(kiln_vmm::qemu::DEFAULT_BINARY)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();

    let exchange = async {
        let mut stream = loop {
            if let Ok(stream) = tokio::net::UnixStream::connect(&channel).await {
                break stream;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let mut seen_hello = false;
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
            let message: GuestMessage = proto::decode(&body).map_err(|e| e.to_string())?;
            match message {
                GuestMessage::Hello { .. } if !seen_hello => {
                    seen_hello = true;
                    let frame = proto::encode(&HostMessage::Config(Box::new(config()))).unwrap();
                    stream.write_all(&frame).await.unwrap();
                }
                GuestMessage::Log { .. } => return Ok(()),
                other => {
                    if !matches!(
                        other,
                        GuestMessage::Hello { .. } | GuestMessage::Started { .. }
                    ) {
                        return Err(format!("unexpected message {other:?}"));
                    }
                }
            }
        }
    };
    let result = tokio::time::timeout(BOOT_TIMEOUT, exchange).await;
    let seconds = started.elapsed().as_secs_f64();
    let rss_kib = kiln_vmm::process::rss_kib(pid).unwrap_or_default();
    let _ = child.kill().await;
    result.map_err(|_| "bare boot timed out".to_owned())??;
    Ok(Sample {
        seconds,
        rss_mib: rss_kib as f64 / 1024.0,
    })
}
