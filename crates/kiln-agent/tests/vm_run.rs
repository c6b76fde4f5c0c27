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
fn vm_run_image_ref_and_rootfs_conflict() {
    let output = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args(["vm", "run", "oci-layout:/nonexistent:latest"])
        .args(["--rootfs", "/nonexistent.ext4", "--", "/bin/true"])
        .output()
        .unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("not both"), "stderr: {stderr}");
}

#[test]
fn vm_run_image_ref_uses_image_config() {
    use kiln_testkit::oci::{Artifact, Compression, ImageBuilder, LayerBuilder, Meta};

    let dir = tempfile::Builder::new()
        .prefix("kvm-agent-")
        .tempdir()
        .unwrap();
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let layer = LayerBuilder::new()
        .dir("bin", Meta::mode(0o755))
        .file("bin/busybox", &busybox, Meta::mode(0o755))
        .symlink("bin/sh", "busybox")
        .dir("etc", Meta::mode(0o755))
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\n",
            Meta::mode(0o644),
        )
        .file("etc/group", b"root:x:0:\n", Meta::mode(0o644))
        .dir("srv", Meta::mode(0o755));
    let image = ImageBuilder::new()
        .layer(layer, Compression::Gzip)
        .config(
            "Cmd",
            serde_json::json!(["/bin/sh", "-c", "echo from-image $GREETING $PWD; exit 7"]),
        )
        .config("Env", serde_json::json!(["GREETING=image-env"]))
        .config("WorkingDir", serde_json::json!("/srv"))
        .build();
    let layout = dir.path().join("layout");
    Artifact::Image(image)
        .write_oci_layout(&layout, "latest")
        .unwrap();

    let output = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args(["vm", "run", "--allow-software-virtualization"])
        .arg(format!("oci-layout:{}:latest", layout.display()))
        .arg("--store")
        .arg(dir.path().join("store"))
        .arg("--guest-dir")
        .arg(guest::guest_assets_dir().unwrap())
        .output()
        .unwrap();

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(7), "stderr: {stderr}");
    assert_eq!(stdout, "from-image image-env /srv\n");
}
