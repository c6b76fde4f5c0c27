//! The QEMU driver: QEMU from the distribution, controlled over QMP.
//!
//! With usable hardware virtualization it runs `-M microvm` on KVM with virtio-mmio devices.
//! Without it, and only when the agent's config permits software virtualization, it runs TCG:
//! `-M q35` by default (it has a PM timer and HPET, so the guest calibrates its clock
//! reliably), or `-M microvm` with the host's TSC rate passed as `tsc_early_khz=`, since
//! microvm's only clock source under TCG is otherwise a PIT calibration that hangs when the
//! vCPU thread is descheduled.
//!
//! QEMU runs in its own session with its output in a file, so it outlives an agent restart;
//! the console, channel and QMP sockets are servers that accept a new client after one leaves.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kiln_guest_proto::{HostMessage, InstanceConfig, VIRTIO_PORT_NAME};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::accel::{self, Accelerator, HardwareVirt};
use crate::channel::{self, ChannelWriter, GuestEvents, HandshakeError};
use crate::process::{self, connect_unix};
use crate::qmp::Qmp;
use crate::record::VmRecord;
use crate::{Driver, DriverKind, VmSpec, VmState, VmmError, console};

/// Default QEMU binary (Debian's qemu-system-x86 package).
pub const DEFAULT_BINARY: &str = "/usr/bin/qemu-system-x86_64";

/// How long QEMU gets to create its sockets after it starts.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// How long kill() waits for QEMU to exit after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Machine type under TCG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TcgMachine {
    /// `-M q35`: slower to boot, reliable clock calibration.
    Q35,
    /// `-M microvm` with `tsc_early_khz=` measured on the host at driver creation.
    Microvm,
}

/// Configuration of the QEMU driver.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// QEMU binary. Default: [`DEFAULT_BINARY`].
    pub binary: PathBuf,
    /// Permit TCG when hardware virtualization is not usable. Default: false (production).
    pub allow_software_virtualization: bool,
    /// Machine type under TCG. Default: q35.
    pub tcg_machine: TcgMachine,
}

impl Default for QemuConfig {
    fn default() -> QemuConfig {
        QemuConfig {
            binary: PathBuf::from(DEFAULT_BINARY),
            allow_software_virtualization: false,
            tcg_machine: TcgMachine::Q35,
        }
    }
}

/// The QEMU driver.
#[derive(Debug)]
pub struct QemuDriver {
    config: QemuConfig,
    accelerator: Accelerator,
    tsc_khz: Option<u64>,
}

impl QemuDriver {
    /// Detects hardware virtualization, picks the accelerator and logs the choice.
    pub fn new(config: QemuConfig) -> Result<QemuDriver, VmmError> {
        let hardware = accel::detect();
        QemuDriver::with_hardware(config, &hardware)
    }

    /// Like [`QemuDriver::new`] with the hardware probe's result given.
    pub fn with_hardware(
        config: QemuConfig,
        hardware: &HardwareVirt,
    ) -> Result<QemuDriver, VmmError> {
        if !config.binary.is_file() {
            return Err(VmmError::MissingFile {
                what: "QEMU binary",
                path: config.binary.clone(),
                hint: "install the qemu-system-x86 package or set the QEMU binary path",
            });
        }
        let accelerator = accel::choose(hardware, config.allow_software_virtualization)?;

        let tsc_khz = (accelerator == Accelerator::Tcg
            && config.tcg_machine == TcgMachine::Microvm)
            .then(|| accel::measure_tsc_khz(Duration::from_millis(50)));
        let machine = match (accelerator, config.tcg_machine) {
            (Accelerator::Kvm, _) | (Accelerator::Tcg, TcgMachine::Microvm) => "microvm",
            (Accelerator::Tcg, TcgMachine::Q35) => "q35",
        };
        let reason = match hardware {
            HardwareVirt::Usable => "hardware virtualization is usable".to_owned(),
            HardwareVirt::Unusable(reason) => reason.clone(),
        };
        tracing::info!(%accelerator, machine, reason, tsc_khz, "qemu driver ready");

        Ok(QemuDriver {
            config,
            accelerator,
            tsc_khz,
        })
    }

    /// The accelerator VMs of this driver run with.
    pub fn accelerator(&self) -> Accelerator {
        self.accelerator
    }

    /// The TSC rate in kHz passed to microvm guests under TCG, measured at driver creation.
    pub fn tsc_khz(&self) -> Option<u64> {
        self.tsc_khz
    }

    fn uses_microvm(&self) -> bool {
        self.accelerator == Accelerator::Kvm || self.config.tcg_machine == TcgMachine::Microvm
    }

    /// Builds QEMU's arguments for a VM. Public so the benchmark can print the command line.
    pub fn arguments(&self, spec: &VmSpec) -> Vec<OsString> {
        let paths = VmPaths::new(&spec.state_dir);
        let microvm = self.uses_microvm();
        let device = |pci: &str, mmio: &str| {
            if microvm {
                mmio.to_owned()
            } else {
                pci.to_owned()
            }
        };

        // no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can
        // miss its window and panic ("IO-APIC + timer doesn't work"), as seen on q35 here.
        let mut kernel_cmdline =
            String::from("console=ttyS0 panic=-1 quiet no_timer_check kiln.channel=virtio-serial");
        if let Some(khz) = self.tsc_khz {
            kernel_cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }

        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("kiln-{}", spec.instance),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
        ];
        match self.accelerator {
            Accelerator::Kvm => args.extend([
                "-M".into(),
                "microvm,x-option-roms=off,rtc=off,pit=off,pic=off,isa-serial=on".into(),
                "-accel".into(),
                "kvm".into(),
                "-cpu".into(),
                "host".into(),
            ]),
            Accelerator::Tcg if microvm => args.extend([
                "-M".into(),
                "microvm,x-option-roms=off,rtc=off,isa-serial=on".into(),
                "-accel".into(),
                "tcg".into(),
            ]),
            Accelerator::Tcg => {
                args.extend(["-M".into(), "q35".into(), "-accel".into(), "tcg".into()])
            }
        }
        args.extend([
            "-m".into(),
            spec.memory_mib.to_string(),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-kernel".into(),
            path_arg(&spec.assets.bzimage),
            "-initrd".into(),
            path_arg(&spec.assets.initramfs),
            "-append".into(),
            kernel_cmdline,
            "-chardev".into(),
            format!(
                "socket,id=console,path={},server=on,wait=off",
                path_arg(&paths.console_socket)
            ),
            "-serial".into(),
            "chardev:console".into(),
            "-drive".into(),
            format!(
                "file={},if=none,id=image,format=raw,readonly=on",
                drive_path(&spec.image_disk)
            ),
            "-device".into(),
            format!(
                "{},drive=image",
                device("virtio-blk-pci", "virtio-blk-device")
            ),
        ]);
        if let Some(data_disk) = &spec.data_disk {
            args.extend([
                "-drive".into(),
                format!("file={},if=none,id=data,format=raw", drive_path(data_disk)),
                "-device".into(),
                format!(
                    "{},drive=data",
                    device("virtio-blk-pci", "virtio-blk-device")
                ),
            ]);
        }
        if let Some(tap) = &spec.tap {
            args.extend([
                "-netdev".into(),
                format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
                "-device".into(),
                format!(
                    "{},netdev=net0,mac={}",
                    device("virtio-net-pci", "virtio-net-device"),
                    spec.mac_address()
                ),
            ]);
        }
        args.extend([
            "-device".into(),
            device("virtio-serial-pci", "virtio-serial-device"),
            "-chardev".into(),
            format!(
                "socket,id=channel,path={},server=on,wait=off",
                path_arg(&paths.channel_socket)
            ),
            "-device".into(),
            format!("virtserialport,chardev=channel,name={VIRTIO_PORT_NAME}"),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", path_arg(&paths.qmp_socket)),
        ]);
        args.into_iter().map(OsString::from).collect()
    }

    /// Starts QEMU once and runs the handshake.
    async fn boot_once(
        &self,
        vm: &mut QemuVm,
        config: InstanceConfig,
    ) -> Result<(ChannelWriter, GuestEvents), HandshakeError> {
        self.launch(vm).await.map_err(HandshakeError::Failed)?;

        let program = self.config.binary.clone();
        let instance = vm.spec.instance;
        let stream = {
            let child = vm.child.as_mut();
            let stderr_path = vm.paths.stderr.clone();
            let mut child = child;
            connect_unix(&vm.paths.channel_socket, SOCKET_TIMEOUT, || {
                check_running(child.as_deref_mut(), instance, &program, &stderr_path)
            })
            .await
            .map_err(HandshakeError::Failed)?
        };
        channel::handshake(instance, stream, config, vm.spec.boot_timeout).await
    }

    /// Spawns QEMU and connects its console and QMP sockets.
    async fn launch(&self, vm: &mut QemuVm) -> Result<(), VmmError> {
        for socket in [
            &vm.paths.qmp_socket,
            &vm.paths.channel_socket,
            &vm.paths.console_socket,
        ] {
            let _ = std::fs::remove_file(socket);
        }
        let stderr = std::fs::File::create(&vm.paths.stderr).map_err(|source| VmmError::File {
            operation: "create",
            path: vm.paths.stderr.clone(),
            source,
        })?;

        let mut command = Command::new(&self.config.binary);
        command
            .args(self.arguments(&vm.spec))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Its own process group: the agent's Ctrl-C or exit must not stop the VM.
            .process_group(0)
            .kill_on_drop(false);
        let child = command.spawn().map_err(|source| VmmError::Spawn {
            program: self.config.binary.clone(),
            source,
        })?;
        let pid = child.id().unwrap_or_default();
        vm.child = Some(child);
        tracing::info!(instance = %vm.spec.instance, pid, accelerator = %self.accelerator, "qemu started");

        let program = self.config.binary.clone();
        let instance = vm.spec.instance;
        let stderr_path = vm.paths.stderr.clone();
        let mut child = vm.child.as_mut();
        let console = connect_unix(&vm.paths.console_socket, SOCKET_TIMEOUT, || {
            check_running(child.as_deref_mut(), instance, &program, &stderr_path)
        })
        .await?;
        vm.console_task = Some(spawn_console_capture(
            console,
            &vm.paths.console_log,
            vm.spec.console_limit_bytes,
            instance,
        ));

        let qmp_stream = connect_unix(&vm.paths.qmp_socket, SOCKET_TIMEOUT, || Ok(())).await?;
        vm.qmp = Some(Qmp::negotiate(&vm.paths.qmp_socket, qmp_stream).await?);

        let record = VmRecord {
            instance,
            driver: DriverKind::Qemu,
            accelerator: self.accelerator,
            pid,
            state_dir: vm.spec.state_dir.clone(),
            control_socket: vm.paths.qmp_socket.clone(),
            channel_socket: vm.paths.channel_socket.clone(),
            console_socket: Some(vm.paths.console_socket.clone()),
            console_log: vm.paths.console_log.clone(),
            console_limit_bytes: vm.spec.console_limit_bytes,
            kill_signal: vm.kill_signal,
        };
        record.save()?;
        vm.pid = Some(pid);
        Ok(())
    }

    async fn wait_and_reap(vm: &mut QemuVm, timeout: Duration) -> bool {
        let Some(pid) = vm.pid else {
            return true;
        };
        if let Some(child) = vm.child.as_mut() {
            return match tokio::time::timeout(timeout, child.wait()).await {
                Ok(_) => {
                    vm.child = None;
                    true
                }
                Err(_) => false,
            };
        }
        process::wait_exit(pid, timeout).await
    }
}

/// Fails when the QEMU child has exited, with its stderr in the error.
fn check_running(
    child: Option<&mut Child>,
    instance: kiln_core::InstanceId,
    program: &Path,
    stderr_path: &Path,
) -> Result<(), VmmError> {
    let Some(child) = child else {
        return Ok(());
    };
    match child.try_wait() {
        Ok(Some(status)) => {
            let stderr = std::fs::read_to_string(stderr_path).unwrap_or_default();
            let tail: String = stderr
                .chars()
                .rev()
                .take(2000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(VmmError::VmmExited {
                instance,
                program: program.display().to_string(),
                status: status.to_string(),
                stderr: tail.trim().to_owned(),
            })
        }
        _ => Ok(()),
    }
}

fn spawn_console_capture(
    stream: tokio::net::UnixStream,
    log: &Path,
    limit_bytes: u64,
    instance: kiln_core::InstanceId,
) -> tokio::task::JoinHandle<()> {
    let log = log.to_owned();
    tokio::spawn(async move {
        if let Err(error) = console::capture(stream, log.clone(), limit_bytes).await {
            tracing::warn!(%instance, path = %log.display(), %error, "console capture failed");
        }
    })
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

/// QEMU's `-drive file=` value: commas in the path are doubled, QEMU's option escaping.
fn drive_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// Files in a VM's state directory.
#[derive(Debug, Clone)]
struct VmPaths {
    qmp_socket: PathBuf,
    channel_socket: PathBuf,
    console_socket: PathBuf,
    console_log: PathBuf,
    stderr: PathBuf,
}

impl VmPaths {
    fn new(dir: &Path) -> VmPaths {
        VmPaths {
            qmp_socket: dir.join("qmp.sock"),
            channel_socket: dir.join("channel.sock"),
            console_socket: dir.join("console.sock"),
            console_log: dir.join("console.log"),
            stderr: dir.join("qemu.stderr"),
        }
    }
}

/// One QEMU microVM.
#[derive(Debug)]
pub struct QemuVm {
    spec: VmSpec,
    paths: VmPaths,
    pid: Option<u32>,
    child: Option<Child>,
    qmp: Option<Qmp>,
    channel: Option<ChannelWriter>,
    kill_signal: i32,
    console_task: Option<tokio::task::JoinHandle<()>>,
}

/// Dropping the handle releases the VM without stopping it: the QMP and console connections
/// close so that another agent process can adopt it.
impl Drop for QemuVm {
    fn drop(&mut self) {
        if let Some(task) = self.console_task.take() {
            task.abort();
        }
    }
}

impl QemuVm {
    /// Process id of QEMU, once started.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The spec the VM was created from.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// Sender for messages to kiln-init (signals, socket listing requests), once started.
    pub fn channel(&self) -> Option<&ChannelWriter> {
        self.channel.as_ref()
    }
}

impl Driver for QemuDriver {
    type Vm = QemuVm;

    async fn create(&self, spec: VmSpec) -> Result<QemuVm, VmmError> {
        spec.validate()?;
        std::fs::create_dir_all(&spec.state_dir).map_err(|source| VmmError::File {
            operation: "create state directory",
            path: spec.state_dir.clone(),
            source,
        })?;
        Ok(QemuVm {
            paths: VmPaths::new(&spec.state_dir),
            spec,
            pid: None,
            child: None,
            qmp: None,
            channel: None,
            kill_signal: libc::SIGTERM,
            console_task: None,
        })
    }

    async fn start(
        &self,
        vm: &mut QemuVm,
        config: InstanceConfig,
    ) -> Result<GuestEvents, VmmError> {
        vm.kill_signal = config.kill_signal;
        let instance = vm.spec.instance;

        // One retry at most: a TCG boot can stall when the host is overloaded.
        let mut result = self.boot_once(vm, config.clone()).await;
        if matches!(result, Err(HandshakeError::Timeout)) {
            tracing::warn!(%instance, timeout = ?vm.spec.boot_timeout, "boot timed out; retrying once");
            self.kill(vm).await?;
            result = self.boot_once(vm, config).await;
        }

        match result {
            Ok((writer, events)) => {
                vm.channel = Some(writer);
                Ok(events)
            }
            Err(error) => {
                let _ = self.kill(vm).await;
                Err(match error {
                    HandshakeError::Timeout => VmmError::BootTimeout {
                        instance,
                        timeout: vm.spec.boot_timeout,
                        console: vm.paths.console_log.clone(),
                    },
                    HandshakeError::Failed(error) => error,
                })
            }
        }
    }

    async fn stop(&self, vm: &mut QemuVm, timeout: Duration) -> Result<VmState, VmmError> {
        if self.state(vm) != VmState::Running {
            return Ok(self.state(vm));
        }
        let instance = vm.spec.instance;

        // The channel delivers the configured stop signal; without it, Ctrl-Alt-Del makes
        // the guest kernel send SIGINT to kiln-init, which forwards it.
        let signal = HostMessage::Signal {
            signal: vm.kill_signal,
        };
        let sent = match &vm.channel {
            Some(channel) => channel.send(&signal).await.is_ok(),
            None => false,
        };
        if !sent && let Some(qmp) = vm.qmp.as_mut() {
            let keys = json!({ "keys": [
                { "type": "qcode", "data": "ctrl" },
                { "type": "qcode", "data": "alt" },
                { "type": "qcode", "data": "delete" },
            ]});
            if let Err(error) = qmp.execute("send-key", Some(keys)).await {
                tracing::warn!(%instance, %error, "sending ctrl-alt-del failed");
            }
        }

        if Self::wait_and_reap(vm, timeout).await {
            tracing::info!(%instance, "vm stopped");
            return Ok(VmState::Stopped);
        }
        tracing::warn!(%instance, ?timeout, "vm did not stop in time; killing it");
        self.kill(vm).await?;
        Ok(VmState::Stopped)
    }

    async fn kill(&self, vm: &mut QemuVm) -> Result<(), VmmError> {
        let Some(pid) = vm.pid else {
            return Ok(());
        };
        if let Some(child) = vm.child.as_mut() {
            let _ = child.start_kill();
        } else if process::is_alive(pid) {
            process::signal(pid, libc::SIGKILL);
        }
        if !Self::wait_and_reap(vm, KILL_TIMEOUT).await {
            return Err(VmmError::Adopt {
                path: vm.spec.state_dir.clone(),
                reason: format!("QEMU process {pid} survived SIGKILL for {KILL_TIMEOUT:?}"),
            });
        }
        vm.qmp = None;
        vm.channel = None;
        Ok(())
    }

    fn state(&self, vm: &mut QemuVm) -> VmState {
        process::vm_state(vm.pid, vm.child.as_mut())
    }

    fn console_path<'a>(&self, vm: &'a QemuVm) -> &'a Path {
        &vm.paths.console_log
    }

    async fn adopt(&self, record: VmRecord) -> Result<(QemuVm, GuestEvents), VmmError> {
        record.check_alive("qemu-system")?;
        let instance = record.instance;

        let qmp_stream = connect_unix(&record.control_socket, SOCKET_TIMEOUT, || Ok(())).await?;
        let qmp = Qmp::negotiate(&record.control_socket, qmp_stream).await?;
        let mut console_task = None;
        if let Some(console_socket) = &record.console_socket {
            let console = connect_unix(console_socket, SOCKET_TIMEOUT, || Ok(())).await?;
            console_task = Some(spawn_console_capture(
                console,
                &record.console_log,
                record.console_limit_bytes,
                instance,
            ));
        }
        let channel_stream =
            connect_unix(&record.channel_socket, SOCKET_TIMEOUT, || Ok(())).await?;
        // NOTE: while no agent is connected the guest kernel blocks kiln-init's writes to the
        // port, so the workload blocks once its output pipe fills; a frame written across
        // two writes around a disconnect could still be cut, desynchronising the framing.
        let (writer, events) = channel::attach(instance, channel_stream);

        // The kernel and disk paths are not needed to control a running VM.
        let spec = VmSpec::new(
            instance,
            record.state_dir.clone(),
            crate::GuestAssets::in_dir(&record.state_dir),
            PathBuf::new(),
        );
        tracing::info!(%instance, pid = record.pid, "qemu vm adopted");
        let vm = QemuVm {
            paths: VmPaths::new(&record.state_dir),
            spec: VmSpec {
                console_limit_bytes: record.console_limit_bytes,
                ..spec
            },
            pid: Some(record.pid),
            child: None,
            qmp: Some(qmp),
            channel: Some(writer),
            kill_signal: record.kill_signal,
            console_task,
        };
        Ok((vm, events))
    }
}
