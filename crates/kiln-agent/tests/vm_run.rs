//! `kiln-agent vm run` end to end: boots a real microVM (QEMU, TCG where hardware
//! virtualization is not usable) from a test rootfs and checks output and exit code.

use std::process::Command;

use kiln_testkit::guest::{self, RootfsBuilder};

#[test]
fn vm_run_streams_output_and_exit_code() {
    let dir = tempfile::Builder::new()
        .prefix("kvm-agent-")
        .tempdir()
        .unwrap();
    let rootfs = dir.path().join("image.ext4");
    RootfsBuilder::new().build(&rootfs).unwrap();
    let guest_dir = guest::guest_assets_dir().unwrap();

    let script =
        "echo \"greeting=$GREETING\"; cat /run/kiln/secrets/token; echo; echo oops >&2; exit 42";
    let output = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args(["vm", "run", "--allow-software-virtualization"])
        .arg("--rootfs")
        .arg(&rootfs)
        .arg("--guest-dir")
        .arg(&guest_dir)
        .args(["--env", "GREETING=hi", "--secret-env", "token"])
        .env("token", "s3cret-value")
        .args(["--", "/bin/sh", "-c", script])
        .output()
        .unwrap();

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(42), "stderr: {stderr}");
    assert_eq!(stdout, "greeting=hi\ns3cret-value\n");
    assert!(stderr.contains("oops"), "stderr: {stderr}");
}

#[test]
fn vm_run_rejects_invalid_env() {
    let output = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args([
            "vm",
            "run",
            "--rootfs",
            "/nonexistent.ext4",
            "--env",
            "NOEQUALS",
        ])
        .args(["--", "/bin/true"])
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr.contains("--env \"NOEQUALS\" is invalid"),
        "stderr: {stderr}"
    );
}

#[test]
fn vm_run_image_ref_without_rootfs_explains() {
    let output = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args([
            "vm",
            "run",
            "docker.io/library/busybox:1.36",
            "--",
            "/bin/true",
        ])
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("--rootfs"), "stderr: {stderr}");
}
