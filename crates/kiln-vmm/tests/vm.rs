//! Boots real microVMs (QEMU with TCG on hosts without usable hardware virtualization, KVM
//! where it is usable) and checks what kiln-init does inside them.
//!
//! Each test boots one VM and makes every related assertion on it, because a TCG boot takes
//! seconds. Every wait is bounded by a named timeout.

// The helpers below are test code too; clippy.toml allows unwrap only inside #[test] bodies.
#![allow(clippy::unwrap_used)]

use std::net::Ipv6Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_core::InstanceId;
use kiln_testkit::guest::{self, PrivateNet, RootfsBuilder};
use kiln_vmm::channel::GuestEvents;
use kiln_vmm::proto::{GuestMessage, HostMessage, Stream};
use kiln_vmm::qemu::{QemuConfig, QemuDriver, QemuVm};
use kiln_vmm::{Driver, GuestAssets, VmSpec, VmState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a workload may take to print what a test waits for, after boot.
const OUTPUT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a graceful stop may take before the driver kills the VM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

struct TestVm {
    _dir: tempfile::TempDir,
    driver: QemuDriver,
    vm: Option<QemuVm>,
    events: Option<GuestEvents>,
    lines: Vec<(Stream, String)>,
    /// QEMU's pid, killed on drop so a failed test leaks no VM.
    pid: u32,
}

fn driver() -> QemuDriver {
    let config = QemuConfig {
        allow_software_virtualization: true,
        ..QemuConfig::default()
    };
    QemuDriver::new(config).expect("QEMU driver")
}

async fn boot(
    rootfs: RootfsBuilder,
    config: kiln_vmm::proto::InstanceConfig,
    tap: Option<String>,
    console_limit_bytes: Option<u64>,
) -> TestVm {
    let dir = tempfile::Builder::new()
        .prefix("kvm-test-")
        .tempdir()
        .unwrap();
    let image = dir.path().join("image.ext4");
    rootfs.build(&image).unwrap();
    let data = dir.path().join("data.ext4");
    guest::data_disk(&data, 64).unwrap();

    let assets = GuestAssets::in_dir(&guest::guest_assets_dir().unwrap());
    let mut spec = VmSpec::new(InstanceId::new(), dir.path().join("vm"), assets, image);
    spec.data_disk = Some(data);
    spec.tap = tap;
    if let Some(limit) = console_limit_bytes {
        spec.console_limit_bytes = limit;
    }

    let driver = driver();
    let mut vm = driver.create(spec).await.unwrap();
    let events = driver.start(&mut vm, config).await.unwrap();
    let pid = vm.pid().unwrap();
    TestVm {
        _dir: dir,
        driver,
        vm: Some(vm),
        events: Some(events),
        lines: Vec::new(),
        pid,
    }
}

impl Drop for TestVm {
    // QEMU outlives its parent by design (agent restarts); a failed test must not leak it.
    fn drop(&mut self) {
        if kiln_vmm::process::is_alive(self.pid) {
            kiln_vmm::process::signal(self.pid, libc::SIGKILL);
        }
    }
}

impl TestVm {
    /// Collects output until a stdout line equals `marker`; panics after the timeout.
    async fn wait_line(&mut self, marker: &str) {
        let deadline = Instant::now() + OUTPUT_TIMEOUT;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(remaining, self.events.as_mut().unwrap().recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no line {marker:?} within {OUTPUT_TIMEOUT:?}; got {:?}",
                        self.lines
                    )
                });
            match message {
                Some(GuestMessage::Log { stream, line }) => {
                    let found = stream == Stream::Stdout && line == marker;
                    self.lines.push((stream, line));
                    if found {
                        return;
                    }
                }
                Some(GuestMessage::Started { .. }) => {}
                other => panic!(
                    "waiting for {marker:?}, got {other:?}; output {:?}",
                    self.lines
                ),
            }
        }
    }

    /// Collects messages until the guest reports the workload's exit.
    async fn wait_exit(&mut self) -> kiln_vmm::proto::ExitStatus {
        let deadline = Instant::now() + OUTPUT_TIMEOUT;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(remaining, self.events.as_mut().unwrap().recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("no exit within {OUTPUT_TIMEOUT:?}; output {:?}", self.lines)
                });
            match message {
                Some(GuestMessage::Exited(status)) => return status,
                Some(GuestMessage::Log { stream, line }) => self.lines.push((stream, line)),
                Some(GuestMessage::Started { .. }) => {}
                other => panic!("waiting for exit, got {other:?}; output {:?}", self.lines),
            }
        }
    }

    fn value_of(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}=");
        self.lines
            .iter()
            .find_map(|(_, line)| line.strip_prefix(prefix.as_str()))
    }

    fn lines_after(&self, marker: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|(stream, _)| *stream == Stream::Stdout)
            .map(|(_, line)| line.as_str())
            .skip_while(|line| *line != marker)
            .skip(1)
            .take_while(|line| !line.starts_with("end-"))
            .collect()
    }
}

/// The workload of the main test: prints what the assertions need, then runs httpd in the
/// foreground so the host can reach it and SIGTERM can stop it.
const IDENTITY_SCRIPT: &str = r#"
echo "argv=$0 $1"
echo "pwd=$(pwd)"
echo "uid=$(id -u)"
echo "gid=$(id -g)"
echo "env=$GREETING"
echo "secret_env=$db_password"
echo "secret=$(cat /run/kiln/secrets/db_password)"
echo "secret_mode=$(stat -c '%a %u' /run/kiln/secrets/db_password)"
echo "hostname=$(hostname)"
echo "startup=$(cat /tmp/startup-ran)"
echo "resolv=$(cat /etc/resolv.conf)"
echo "stderr line" >&2
echo global-ipv6:
ip -6 -o addr show scope global | awk '{print $4}'
echo end-global-ipv6
echo ipv4:
ip -4 -o addr show dev eth0 | awk '{print $4}'
echo end-ipv4
echo READY
exec httpd -f -p [::]:8080 -h /www
"#;

#[tokio::test]
async fn workload_identity_secrets_network_and_sigterm() {
    let guest_ipv6: Ipv6Addr = "fd00:6b76:6d::2".parse().unwrap();
    let net = PrivateNet::enter(guest_ipv6).unwrap();

    let mut config =
        guest::instance_config(&["/bin/sh", "-c", IDENTITY_SCRIPT, "kiln-zero", "first-arg"]);
    config
        .env
        .push(("GREETING".to_owned(), "hello world".to_owned()));
    config = guest::with_secret(config, "db_password", b"hunter2-secret");
    config.secrets_as_env = true;
    config.hostname = "web-1".to_owned();
    config.network = Some(net.network_config());
    config.startup_scripts = vec![script("echo yes > /tmp/startup-ran", None)];

    let mut test = boot(RootfsBuilder::new(), config, Some(net.tap.clone()), None).await;
    test.wait_line("READY").await;

    assert_eq!(test.value_of("argv"), Some("kiln-zero first-arg"));
    assert_eq!(test.value_of("pwd"), Some("/srv"));
    assert_eq!(test.value_of("uid"), Some("1000"));
    assert_eq!(test.value_of("gid"), Some("1000"));
    assert_eq!(test.value_of("env"), Some("hello world"));
    assert_eq!(test.value_of("secret_env"), Some("hunter2-secret"));
    assert_eq!(test.value_of("secret"), Some("hunter2-secret"));
    assert_eq!(test.value_of("secret_mode"), Some("400 1000"));
    assert_eq!(test.value_of("hostname"), Some("web-1"));
    assert_eq!(test.value_of("startup"), Some("yes"));
    assert_eq!(test.value_of("resolv"), Some("nameserver fd00::53"));
    assert!(
        test.lines
            .contains(&(Stream::Stderr, "stderr line".to_owned())),
        "stderr not tagged: {:?}",
        test.lines
    );
    assert_eq!(
        test.lines_after("global-ipv6:"),
        vec!["fd00:6b76:6d::2/128"]
    );
    assert_eq!(test.lines_after("ipv4:"), vec!["100.64.0.2/32"]);

    // The host reaches the workload's TCP port at the guest's IPv6 address.
    let body = http_get(guest_ipv6, 8080).await;
    assert!(
        body.contains("hello from kiln"),
        "unexpected response {body:?}"
    );

    // The guest reports its listening sockets on request.
    let channel = test.vm.as_ref().unwrap().channel().unwrap().clone();
    channel.send(&HostMessage::ListSockets).await.unwrap();
    let sockets = loop {
        match tokio::time::timeout(OUTPUT_TIMEOUT, test.events.as_mut().unwrap().recv())
            .await
            .unwrap()
        {
            Some(GuestMessage::ListeningSockets { sockets }) => break sockets,
            Some(_) => continue,
            None => panic!("channel closed before the socket list"),
        }
    };
    assert!(
        sockets
            .iter()
            .any(|s| s.protocol == "tcp" && s.port == 8080 && s.address == "::"),
        "8080 not listed: {sockets:?}"
    );

    // The state file holds no secret.
    let record =
        std::fs::read_to_string(test.vm.as_ref().unwrap().spec().state_dir.join("vm.json"))
            .unwrap();
    assert!(!record.contains("hunter2"));

    // SIGTERM reaches httpd, which exits; the VM powers off well within the stop timeout.
    let state = test
        .driver
        .stop(test.vm.as_mut().unwrap(), STOP_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(state, VmState::Stopped);
    let status = test.wait_exit().await;
    assert_eq!(status.signal, Some(libc::SIGTERM), "status {status:?}");
}

/// Fetches `/index.html`, retrying refused connections until the timeout: httpd starts
/// listening a moment after the workload prints READY.
async fn http_get(address: Ipv6Addr, port: u16) -> String {
    let deadline = Instant::now() + OUTPUT_TIMEOUT;
    let mut stream = loop {
        let connect = tokio::net::TcpStream::connect((address, port));
        match tokio::time::timeout(OUTPUT_TIMEOUT, connect).await {
            Ok(Ok(stream)) => break stream,
            Ok(Err(error)) if Instant::now() < deadline => {
                assert_eq!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionRefused,
                    "{error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(error)) => panic!("connect failed until the timeout: {error}"),
            Err(_) => panic!("connect timed out after {OUTPUT_TIMEOUT:?}"),
        }
    };
    stream
        .write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(OUTPUT_TIMEOUT, stream.read_to_string(&mut response))
        .await
        .expect("response timed out")
        .unwrap();
    response
}

/// A VM of another env has no secrets. A guest given no entropy seed still reads the
/// blocking `/dev/random`, because the kernel seeds itself. The exit code propagates.
#[tokio::test]
async fn other_env_unseeded_guest_exit_code() {
    let script = "ls -A /run/kiln/secrets | wc -l | sed 's/^/secrets=/'; \
                  head -c 32 /dev/random | wc -c | sed 's/^ */random=/'; exit 3";
    let mut config = guest::instance_config(&["/bin/sh", "-c", script]);
    config.entropy_seed = Vec::new();

    let mut test = boot(RootfsBuilder::new(), config, None, None).await;
    let status = test.wait_exit().await;

    assert_eq!(test.value_of("secrets"), Some("0"));
    assert_eq!(test.value_of("random"), Some("32"));
    assert_eq!(status.code, Some(3));
    let stopped =
        kiln_vmm::process::wait_exit(test.vm.as_ref().unwrap().pid().unwrap(), STOP_TIMEOUT).await;
    assert!(stopped, "VM did not power off after the workload exited");
}

#[tokio::test]
async fn failing_startup_script_stops_boot() {
    let mut config = guest::instance_config(&["/bin/echo", "workload ran"]);
    config.startup_scripts = vec![script("true", None), script("echo broken; exit 4", None)];

    let mut test = boot(RootfsBuilder::new(), config, None, None).await;
    let message = tokio::time::timeout(OUTPUT_TIMEOUT, test.events.as_mut().unwrap().recv())
        .await
        .unwrap();

    match message {
        Some(GuestMessage::StartupScriptFailed {
            index,
            code,
            timed_out,
            output,
        }) => {
            assert_eq!(index, 1);
            assert_eq!(code, Some(4));
            assert!(!timed_out);
            assert_eq!(output, "broken\n");
        }
        other => panic!("expected StartupScriptFailed, got {other:?}"),
    }
    let next = tokio::time::timeout(OUTPUT_TIMEOUT, test.events.as_mut().unwrap().recv())
        .await
        .unwrap();
    assert!(
        matches!(next, Some(GuestMessage::BootFailed { .. })),
        "got {next:?}"
    );
}

#[tokio::test]
async fn startup_script_past_timeout_is_killed() {
    let mut config = guest::instance_config(&["/bin/echo", "workload ran"]);
    // The background sleep keeps the output pipe open, so only killing the script's whole
    // process group ends the wait.
    config.startup_scripts = vec![script("echo started; sleep 600 & sleep 600", Some(1))];

    let mut test = boot(RootfsBuilder::new(), config, None, None).await;
    let message = tokio::time::timeout(OUTPUT_TIMEOUT, test.events.as_mut().unwrap().recv())
        .await
        .unwrap();

    match message {
        Some(GuestMessage::StartupScriptFailed {
            index,
            timed_out,
            output,
            ..
        }) => {
            assert_eq!(index, 0);
            assert!(timed_out);
            assert!(output.starts_with("started\n"), "{output}");
            assert!(output.contains("killed after 1 s"), "{output}");
        }
        other => panic!("expected StartupScriptFailed, got {other:?}"),
    }
}

fn script(command: &str, timeout_secs: Option<u32>) -> kiln_vmm::proto::StartupScript {
    kiln_vmm::proto::StartupScript {
        command: command.to_owned(),
        timeout_secs,
    }
}

/// A root workload that ignores SIGTERM and floods both the serial console and its stdout.
const FLOOD_SCRIPT: &str = r#"
trap '' TERM
echo READY
while :; do echo "flood flood flood flood flood flood flood flood flood flood"; done > /dev/console &
while :; do echo "stdout flood stdout flood stdout flood stdout flood stdout flood"; done
"#;

/// Console log limit in the flood test: small, because QEMU's emulated UART paces output at
/// its baud rate, a few hundred bytes per second under TCG on a loaded host.
const FLOOD_CONSOLE_LIMIT: u64 = 2 * 1024;

#[tokio::test]
async fn console_flood_bounded_adopt_and_kill() {
    let mut config = guest::instance_config(&["/bin/sh", "-c", FLOOD_SCRIPT]);
    config.uid = 0;
    config.gid = 0;

    let mut test = boot(
        RootfsBuilder::new(),
        config,
        None,
        Some(FLOOD_CONSOLE_LIMIT),
    )
    .await;
    test.wait_line("READY").await;
    let pid = test.pid;

    // Nobody reads the stdout flood now, so the channel's bounded queue fills and the guest
    // blocks. Let the console fill its log past the limit twice, then compare memory.
    let console = test
        .driver
        .console_path(test.vm.as_ref().unwrap())
        .to_owned();
    wait_for_rotation(&console).await;
    let qemu_before = kiln_vmm::process::rss_kib(pid).unwrap();
    let test_before = kiln_vmm::process::rss_kib(std::process::id()).unwrap();
    std::fs::remove_file(kiln_vmm::console::rotated_path(&console)).unwrap();
    wait_for_rotation(&console).await;
    let qemu_after = kiln_vmm::process::rss_kib(pid).unwrap();
    let test_after = kiln_vmm::process::rss_kib(std::process::id()).unwrap();

    assert!(
        qemu_after < qemu_before + 16 * 1024,
        "QEMU RSS grew from {qemu_before} KiB to {qemu_after} KiB"
    );
    assert!(
        test_after < test_before + 16 * 1024,
        "host process RSS grew from {test_before} KiB to {test_after} KiB"
    );
    let size = std::fs::metadata(&console).unwrap().len();
    assert!(
        size <= FLOOD_CONSOLE_LIMIT,
        "console log is {size} bytes, limit {FLOOD_CONSOLE_LIMIT}"
    );

    // Release the VM as an exiting agent would, then adopt it with a new driver.
    let state_dir = test.vm.as_ref().unwrap().spec().state_dir.clone();
    drop(test.events.take());
    drop(test.vm.take());
    let record = kiln_vmm::record::VmRecord::load(&state_dir).unwrap();
    let adopter = driver();
    let (mut adopted, mut adopted_events) = adopter.adopt(record).await.unwrap();
    assert_eq!(adopter.state(&mut adopted), VmState::Running);

    // The adopted channel carries the guest's output again.
    let message = tokio::time::timeout(OUTPUT_TIMEOUT, adopted_events.recv())
        .await
        .unwrap();
    assert!(
        matches!(message, Some(GuestMessage::Log { .. })),
        "got {message:?}"
    );

    // The workload ignores SIGTERM, so the stop ends in a kill after the timeout.
    let state = adopter
        .stop(&mut adopted, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(state, VmState::Stopped);
    assert!(!kiln_vmm::process::is_alive(pid));
}

/// Waits until the console log has been rotated (its `.1` file exists).
async fn wait_for_rotation(console: &Path) {
    const ROTATION_TIMEOUT: Duration = Duration::from_secs(120);
    let rotated = kiln_vmm::console::rotated_path(console);
    let deadline = Instant::now() + ROTATION_TIMEOUT;
    while !rotated.exists() {
        assert!(
            Instant::now() < deadline,
            "console log {} not rotated within {ROTATION_TIMEOUT:?}",
            console.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
