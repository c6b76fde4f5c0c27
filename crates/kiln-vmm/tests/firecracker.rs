//! Firecracker driver against a real Firecracker binary. Runs only when `KILN_FIRECRACKER_BIN`
//! names one and the host has usable hardware virtualization; otherwise each test prints why
//! it skipped and passes.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use kiln_core::InstanceId;
use kiln_testkit::guest::{self, RootfsBuilder};
use kiln_vmm::accel::{self, HardwareVirt};
use kiln_vmm::firecracker::{FirecrackerConfig, FirecrackerDriver};
use kiln_vmm::proto::GuestMessage;
use kiln_vmm::{Driver, GuestAssets, VmSpec, VmState};

/// How long the workload may take to report its exit after boot.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Returns the driver, or the reason the Firecracker tests cannot run here.
fn firecracker_driver() -> Result<FirecrackerDriver, String> {
    let Some(binary) = std::env::var_os("KILN_FIRECRACKER_BIN") else {
        return Err("KILN_FIRECRACKER_BIN is not set (no Firecracker binary configured)".into());
    };
    if let HardwareVirt::Unusable(reason) = accel::detect() {
        return Err(format!("no usable hardware virtualization: {reason}"));
    }
    let config = FirecrackerConfig {
        binary: PathBuf::from(binary),
        jailer: None,
    };
    FirecrackerDriver::new(config).map_err(|error| error.to_string())
}

#[tokio::test]
async fn firecracker_exit_code_propagates() {
    let driver = match firecracker_driver() {
        Ok(driver) => driver,
        Err(reason) => {
            eprintln!("skipped: {reason}");
            return;
        }
    };

    let dir = tempfile::Builder::new()
        .prefix("kvm-fc-")
        .tempdir()
        .unwrap();
    let image = dir.path().join("image.ext4");
    RootfsBuilder::new().build(&image).unwrap();
    let assets = GuestAssets::in_dir(&guest::guest_assets_dir().unwrap());
    let spec = VmSpec::new(InstanceId::new(), dir.path().join("vm"), assets, image);
    let config = guest::instance_config(&["/bin/sh", "-c", "echo hello; exit 5"]);

    let mut vm = driver.create(spec).await.unwrap();
    let mut events = driver.start(&mut vm, config).await.unwrap();
    let status = tokio::time::timeout(EXIT_TIMEOUT, async {
        while let Some(message) = events.recv().await {
            if let GuestMessage::Exited(status) = message {
                return Some(status);
            }
        }
        None
    })
    .await
    .unwrap();

    assert_eq!(status.and_then(|s| s.code), Some(5));
    let state = driver.stop(&mut vm, Duration::from_secs(10)).await.unwrap();
    assert_eq!(state, VmState::Stopped);
}
