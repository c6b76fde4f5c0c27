//! Guest fixtures for microVM tests: the guest kernel and initramfs, a small busybox root
//! filesystem as an ext4 image, an instance config, and a private network namespace with a
//! TAP device for the guest.
//!
//! The rootfs is built from Debian's busybox-static with `mkfs.ext4 -d`, the same tool the
//! image pipeline uses, so the guest boots the same kind of disk as in production.

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};
use kiln_guest_proto::{InstanceConfig, NetworkConfig, Secret};

/// Busybox from the busybox-static package.
const BUSYBOX: &str = "/bin/busybox";

/// User id and group id of the unprivileged `app` user in the test rootfs.
pub const APP_UID: u32 = 1000;

/// Runs a command and fails with its command line, exit status and stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("starting {program} failed"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Returns the directory with `bzImage`, `vmlinux` and `initramfs.cpio`.
///
/// Uses `KILN_GUEST_ASSETS` when set; otherwise runs scripts/guest-kernel once per test
/// process (it caches its output, so later runs are quick).
pub fn guest_assets_dir() -> anyhow::Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("KILN_GUEST_ASSETS") {
            return Ok(PathBuf::from(dir));
        }
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let script = repo.join("scripts/guest-kernel");
        let script = script.to_string_lossy().into_owned();
        run(&script, &[])
            .map(|stdout| PathBuf::from(stdout.lines().last().unwrap_or_default().trim()))
            .map_err(|error| format!("{error:#}"))
    });
    result.clone().map_err(|error| anyhow::anyhow!(error))
}

/// Builder of a busybox root filesystem image.
#[derive(Debug, Default)]
pub struct RootfsBuilder {
    files: Vec<(String, Vec<u8>, u32)>,
}

impl RootfsBuilder {
    /// A rootfs with busybox, `/etc/passwd` (root and `app`), `/srv` owned by `app` and
    /// `/www/index.html` containing `hello from kiln`.
    pub fn new() -> RootfsBuilder {
        RootfsBuilder::default()
    }

    /// Adds a file (path relative to the root) with the given contents and mode.
    pub fn file(mut self, path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> RootfsBuilder {
        self.files.push((path.to_owned(), contents.into(), mode));
        self
    }

    /// Writes the ext4 image to `output`.
    pub fn build(&self, output: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::{PermissionsExt, symlink};

        let tree = tempfile::Builder::new().prefix("kvm-rootfs-").tempdir()?;
        let root = tree.path();
        for dir in [
            "bin", "etc", "srv", "tmp", "www", "proc", "sys", "dev", "run",
        ] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
        std::os::unix::fs::chown(root.join("srv"), Some(APP_UID), Some(APP_UID))?;

        std::fs::copy(BUSYBOX, root.join("bin/busybox"))
            .with_context(|| format!("copying {BUSYBOX} failed; install busybox-static"))?;
        for applet in run(BUSYBOX, &["--list"])?.lines() {
            if applet != "busybox" {
                symlink("busybox", root.join("bin").join(applet))?;
            }
        }
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/srv:/bin/sh\n",
        )?;
        std::fs::write(root.join("etc/group"), "root:x:0:\napp:x:1000:\n")?;
        std::fs::write(root.join("www/index.html"), "hello from kiln\n")?;

        for (path, contents, mode) in &self.files {
            let target = root.join(path.trim_start_matches('/'));
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&target, contents)?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode))?;
        }

        let output_text = output.to_string_lossy();
        let root_text = root.to_string_lossy();
        run(
            "/sbin/mkfs.ext4",
            &[
                "-q",
                "-F",
                "-E",
                "root_owner=0:0",
                "-d",
                &root_text,
                &output_text,
                "32M",
            ],
        )?;
        Ok(())
    }
}

/// Creates an empty ext4 image of `size_mib` MiB, the instance's writable disk.
pub fn data_disk(output: &Path, size_mib: u32) -> anyhow::Result<()> {
    let size = format!("{size_mib}M");
    run(
        "/sbin/mkfs.ext4",
        &["-q", "-F", &output.to_string_lossy(), &size],
    )?;
    Ok(())
}

/// An instance config for a test workload: `argv` as user `app` in `/srv`, SIGTERM as the
/// stop signal, a fixed entropy seed and no network.
pub fn instance_config(argv: &[&str]) -> InstanceConfig {
    InstanceConfig {
        argv: argv.iter().map(|arg| (*arg).to_owned()).collect(),
        workdir: "/srv".to_owned(),
        uid: APP_UID,
        gid: APP_UID,
        env: vec![("KILN_TEST".to_owned(), "1".to_owned())],
        secrets: Vec::new(),
        secrets_as_env: false,
        hostname: "kiln-test".to_owned(),
        network: None,
        startup_scripts: Vec::new(),
        kill_signal: libc::SIGTERM,
        entropy_seed: (0..64u8).collect(),
    }
}

/// Adds a secret to a config.
pub fn with_secret(mut config: InstanceConfig, name: &str, value: &[u8]) -> InstanceConfig {
    config.secrets.push(Secret {
        name: name.to_owned(),
        value: value.to_vec(),
    });
    config
}

/// A TAP device in a private network namespace that the calling thread has entered.
///
/// Network namespaces are per thread: after [`PrivateNet::enter`] this thread, and every
/// process it starts (QEMU, `ip`), sees only the new namespace, so TAP names and routes never
/// collide with other tests or touch the host's network. Run the test on a current-thread
/// runtime so all its network work stays on this thread.
#[derive(Debug)]
pub struct PrivateNet {
    /// TAP device name for the guest.
    pub tap: String,
    /// The guest's IPv6 address (a /128 routed to the TAP).
    pub guest_ipv6: Ipv6Addr,
    /// The host end's link-local address, the guest's gateway.
    pub gateway: Ipv6Addr,
}

impl PrivateNet {
    /// Moves this thread into a new network namespace and creates TAP `kvmt0` in it, with
    /// `fe80::1` on the host end and a route to `guest_ipv6`.
    pub fn enter(guest_ipv6: Ipv6Addr) -> anyhow::Result<PrivateNet> {
        // SAFETY: unshare has no memory-safety preconditions.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            bail!(
                "unshare(CLONE_NEWNET) failed: {}; VM network tests need root",
                std::io::Error::last_os_error()
            );
        }

        let tap = "kvmt0";
        let gateway: Ipv6Addr = "fe80::1".parse()?;
        let guest = format!("{guest_ipv6}/128");
        run("/sbin/ip", &["link", "set", "lo", "up"])?;
        run("/sbin/ip", &["tuntap", "add", "dev", tap, "mode", "tap"])?;
        run("/sbin/ip", &["link", "set", tap, "up"])?;
        run(
            "/sbin/ip",
            &["-6", "addr", "add", "fe80::1/64", "dev", tap, "nodad"],
        )?;
        run("/sbin/ip", &["-6", "route", "add", &guest, "dev", tap])?;

        Ok(PrivateNet {
            tap: tap.to_owned(),
            guest_ipv6,
            gateway,
        })
    }

    /// The guest's network config for this TAP.
    pub fn network_config(&self) -> NetworkConfig {
        NetworkConfig {
            ipv6: self.guest_ipv6,
            ipv6_gateway: self.gateway,
            ipv4: Some("100.64.0.2".parse().expect("valid literal")),
            ipv4_gateway: Some("100.64.0.1".parse().expect("valid literal")),
            mtu: 1420,
            dns_servers: vec!["fd00::53".parse().expect("valid literal")],
        }
    }
}
