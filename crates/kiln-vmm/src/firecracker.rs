//! The Firecracker driver, the production driver: Firecracker's REST API on a Unix socket,
//! optionally under its jailer with a uid and gid of the VM's own.
//!
//! The host-guest channel is Firecracker's vsock: when kiln-init connects to the host (CID 2)
//! on port [`VSOCK_PORT`], Firecracker connects to the Unix socket `<uds_path>_<port>`, where
//! this driver listens. The serial console is Firecracker's stdout, captured with a size
//! bound. A watchdog task kills a VMM whose API stops answering.
//!
//! Firecracker needs KVM with hardware virtualization; on other hosts [`FirecrackerDriver::new`]
//! fails and says why.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kiln_guest_proto::{HostMessage, InstanceConfig, VSOCK_PORT};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};

use crate::accel::{self, Accelerator, HardwareVirt};
use crate::channel::{self, ChannelWriter, GuestEvents, HandshakeError};
use crate::process::{self, connect_unix};
use crate::record::VmRecord;
use crate::{Driver, DriverKind, VmSpec, VmState, VmmError, console};

/// How long Firecracker gets to create its API socket.
const API_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one API request may take.
const API_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long kill() waits for the VMM to exit after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Interval of the watchdog's API probe; three failed probes in a row kill the VMM.
const WATCHDOG_INTERVAL: Duration = Duration::from_secs(5);

/// Guest CID of every VM: each VM has its own vsock device, so they need not differ.
const GUEST_CID: u32 = 3;

/// The jailer: chroot, namespaces and a dedicated uid/gid per VM.
#[derive(Debug, Clone)]
pub struct JailerConfig {
    /// The `jailer` binary.
    pub binary: PathBuf,
    /// Base directory of the chroots (`--chroot-base-dir`).
    pub chroot_base: PathBuf,
    /// First uid/gid handed out; each VM gets `first_id + n` for a unique `n` the caller
    /// passes in [`FirecrackerDriver::create_jailed`].
    pub first_id: u32,
}

/// Configuration of the Firecracker driver.
#[derive(Debug, Clone)]
pub struct FirecrackerConfig {
    /// The `firecracker` binary. Required: no distribution ships it.
    pub binary: PathBuf,
    /// Run each VM under the jailer. Default: none.
    pub jailer: Option<JailerConfig>,
}

/// The Firecracker driver.
#[derive(Debug)]
pub struct FirecrackerDriver {
    config: FirecrackerConfig,
}

impl FirecrackerDriver {
    /// Checks the binary and hardware virtualization.
    pub fn new(config: FirecrackerConfig) -> Result<FirecrackerDriver, VmmError> {
        FirecrackerDriver::with_hardware(config, &accel::detect())
    }

    /// Like [`FirecrackerDriver::new`] with the hardware probe's result given.
    pub fn with_hardware(
        config: FirecrackerConfig,
        hardware: &HardwareVirt,
    ) -> Result<FirecrackerDriver, VmmError> {
        if !config.binary.is_file() {
            return Err(VmmError::MissingFile {
                what: "Firecracker binary",
                path: config.binary.clone(),
                hint: "install Firecracker and set its path in the agent config",
            });
        }
        if let HardwareVirt::Unusable(reason) = hardware {
            return Err(VmmError::NeedsHardwareVirtualization {
                driver: "firecracker",
                reason: reason.clone(),
            });
        }
        tracing::info!(binary = %config.binary.display(), jailer = config.jailer.is_some(), "firecracker driver ready");
        Ok(FirecrackerDriver { config })
    }

    /// Creates a VM that runs under the jailer as uid and gid `first_id + slot`.
    pub async fn create_jailed(&self, spec: VmSpec, slot: u32) -> Result<FirecrackerVm, VmmError> {
        let mut vm = self.create(spec).await?;
        vm.jail_slot = Some(slot);
        Ok(vm)
    }

    fn spawn(&self, vm: &mut FirecrackerVm) -> Result<Child, VmmError> {
        let id = vm.spec.instance.to_string();
        let mut command = match (&self.config.jailer, vm.jail_slot) {
            (Some(jailer), Some(slot)) => {
                let uid = jailer.first_id + slot;
                let mut command = Command::new(&jailer.binary);
                command
                    .arg("--id")
                    .arg(&id)
                    .arg("--exec-file")
                    .arg(&self.config.binary)
                    .arg("--uid")
                    .arg(uid.to_string())
                    .arg("--gid")
                    .arg(uid.to_string())
                    .arg("--chroot-base-dir")
                    .arg(&jailer.chroot_base)
                    .arg("--")
                    .arg("--api-sock")
                    .arg("/api.sock");
                command
            }
            _ => {
                let mut command = Command::new(&self.config.binary);
                command
                    .arg("--api-sock")
                    .arg(&vm.paths.api_socket)
                    .arg("--id")
                    .arg(&id);
                command
            }
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(false);
        command.spawn().map_err(|source| VmmError::Spawn {
            program: self.config.binary.clone(),
            source,
        })
    }

    /// Configures the VM through the API, then sends InstanceStart.
    async fn configure(&self, vm: &FirecrackerVm, paths: &GuestPaths) -> Result<(), VmmError> {
        let api = &vm.paths.api_socket;
        let spec = &vm.spec;
        let boot_args = "console=ttyS0 reboot=k panic=-1 pci=off quiet kiln.channel=vsock";

        api_request(
            api,
            "PUT",
            "/machine-config",
            json!({
                "vcpu_count": spec.vcpus,
                "mem_size_mib": spec.memory_mib,
                "smt": false,
            }),
        )
        .await?;
        api_request(
            api,
            "PUT",
            "/boot-source",
            json!({
                "kernel_image_path": paths.kernel,
                "initrd_path": paths.initramfs,
                "boot_args": boot_args,
            }),
        )
        .await?;
        api_request(
            api,
            "PUT",
            "/drives/image",
            json!({
                "drive_id": "image",
                "path_on_host": paths.image_disk,
                "is_root_device": false,
                "is_read_only": true,
            }),
        )
        .await?;
        if let Some(data_disk) = &paths.data_disk {
            api_request(
                api,
                "PUT",
                "/drives/data",
                json!({
                    "drive_id": "data",
                    "path_on_host": data_disk,
                    "is_root_device": false,
                    "is_read_only": false,
                }),
            )
            .await?;
        }
        if let Some(tap) = &spec.tap {
            api_request(
                api,
                "PUT",
                "/network-interfaces/eth0",
                json!({
                    "iface_id": "eth0",
                    "host_dev_name": tap,
                    "guest_mac": spec.mac_address(),
                }),
            )
            .await?;
        }
        api_request(
            api,
            "PUT",
            "/vsock",
            json!({
                "guest_cid": GUEST_CID,
                "uds_path": paths.vsock,
            }),
        )
        .await?;
        api_request(
            api,
            "PUT",
            "/actions",
            json!({ "action_type": "InstanceStart" }),
        )
        .await?;
        Ok(())
    }

    async fn boot_once(
        &self,
        vm: &mut FirecrackerVm,
        config: InstanceConfig,
    ) -> Result<(ChannelWriter, GuestEvents), HandshakeError> {
        let failed = HandshakeError::Failed;
        let paths = self.prepare_paths(vm).map_err(failed)?;

        // Listen before the guest can connect: Firecracker forwards the guest's connection
        // to `<uds_path>_<port>`.
        let _ = std::fs::remove_file(&vm.paths.vsock_listener);
        let listener = UnixListener::bind(&vm.paths.vsock_listener).map_err(|source| {
            failed(VmmError::File {
                operation: "listen on",
                path: vm.paths.vsock_listener.clone(),
                source,
            })
        })?;

        let _ = std::fs::remove_file(&vm.paths.api_socket);
        let mut child = self.spawn(vm).map_err(failed)?;
        let pid = child.id().unwrap_or_default();
        if let Some(stdout) = child.stdout.take() {
            let log = vm.paths.console_log.clone();
            let limit = vm.spec.console_limit_bytes;
            let instance = vm.spec.instance;
            tokio::spawn(async move {
                if let Err(error) = console::capture(stdout, log, limit).await {
                    tracing::warn!(%instance, %error, "console capture failed");
                }
            });
        }
        vm.child = Some(child);
        vm.pid = Some(pid);
        tracing::info!(instance = %vm.spec.instance, pid, "firecracker started");

        connect_unix(&vm.paths.api_socket, API_SOCKET_TIMEOUT, || Ok(()))
            .await
            .map_err(failed)?;
        self.configure(vm, &paths).await.map_err(failed)?;
        self.save_record(vm, pid).map_err(failed)?;
        spawn_watchdog(vm.spec.instance, pid, vm.paths.api_socket.clone());

        let accepted = tokio::time::timeout(vm.spec.boot_timeout, listener.accept()).await;
        let stream = match accepted {
            Err(_) => return Err(HandshakeError::Timeout),
            Ok(Err(source)) => {
                return Err(failed(VmmError::File {
                    operation: "accept on",
                    path: vm.paths.vsock_listener.clone(),
                    source,
                }));
            }
            Ok(Ok((stream, _))) => stream,
        };
        channel::handshake(vm.spec.instance, stream, config, vm.spec.boot_timeout).await
    }

    /// Paths as Firecracker sees them: the host paths, or paths inside the jail after the
    /// files are linked into it.
    fn prepare_paths(&self, vm: &mut FirecrackerVm) -> Result<GuestPaths, VmmError> {
        let spec = &vm.spec;
        let (Some(jailer), Some(_)) = (&self.config.jailer, vm.jail_slot) else {
            return Ok(GuestPaths {
                kernel: spec.assets.vmlinux.clone(),
                initramfs: spec.assets.initramfs.clone(),
                image_disk: spec.image_disk.clone(),
                data_disk: spec.data_disk.clone(),
                vsock: vm.paths.vsock.clone(),
            });
        };

        let exec_name = self
            .config
            .binary
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "firecracker".to_owned());
        let root = jailer
            .chroot_base
            .join(exec_name)
            .join(spec.instance.to_string())
            .join("root");
        std::fs::create_dir_all(&root).map_err(|source| VmmError::File {
            operation: "create jail root",
            path: root.clone(),
            source,
        })?;
        let link = |source: &Path, name: &str| -> Result<PathBuf, VmmError> {
            let target = root.join(name);
            let _ = std::fs::remove_file(&target);
            std::fs::hard_link(source, &target).map_err(|error| VmmError::File {
                operation: "hard-link into the jail",
                path: source.to_owned(),
                source: error,
            })?;
            Ok(PathBuf::from("/").join(name))
        };
        let paths = GuestPaths {
            kernel: link(&spec.assets.vmlinux, "vmlinux")?,
            initramfs: link(&spec.assets.initramfs, "initramfs.cpio")?,
            image_disk: link(&spec.image_disk, "image.ext4")?,
            data_disk: match &spec.data_disk {
                Some(disk) => Some(link(disk, "data.ext4")?),
                None => None,
            },
            vsock: PathBuf::from("/vsock.sock"),
        };
        // Inside the jail the sockets live in its root; the host reaches them there.
        vm.paths.api_socket = root.join("api.sock");
        vm.paths.vsock_listener = root.join(format!("vsock.sock_{VSOCK_PORT}"));
        Ok(paths)
    }

    fn save_record(&self, vm: &FirecrackerVm, pid: u32) -> Result<(), VmmError> {
        VmRecord {
            instance: vm.spec.instance,
            driver: DriverKind::Firecracker,
            accelerator: Accelerator::Kvm,
            pid,
            state_dir: vm.spec.state_dir.clone(),
            control_socket: vm.paths.api_socket.clone(),
            channel_socket: vm.paths.vsock_listener.clone(),
            console_socket: None,
            console_log: vm.paths.console_log.clone(),
            console_limit_bytes: vm.spec.console_limit_bytes,
            kill_signal: vm.kill_signal,
        }
        .save()
    }

    async fn wait_and_reap(vm: &mut FirecrackerVm, timeout: Duration) -> bool {
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

/// Kills the VMM when its API stops answering for three probes in a row.
fn spawn_watchdog(instance: kiln_core::InstanceId, pid: u32, api_socket: PathBuf) {
    tokio::spawn(async move {
        let mut failures = 0;
        while process::is_alive(pid) {
            tokio::time::sleep(WATCHDOG_INTERVAL).await;
            match api_request(&api_socket, "GET", "/", Value::Null).await {
                Ok(_) => failures = 0,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%instance, pid, failures, %error, "firecracker API probe failed");
                }
            }
            if failures >= 3 && process::is_alive(pid) {
                tracing::error!(%instance, pid, "firecracker hung; killing it");
                process::signal(pid, libc::SIGKILL);
                return;
            }
        }
    });
}

/// Sends one request to the API socket and returns the response body as JSON (`Null` when
/// empty). A status other than 2xx is an error carrying Firecracker's fault message.
async fn api_request(
    socket: &Path,
    method: &'static str,
    path: &str,
    body: Value,
) -> Result<Value, VmmError> {
    let error = |message: String| VmmError::FirecrackerApi {
        method,
        path: path.to_owned(),
        message,
    };
    let exchange = async {
        let mut stream = UnixStream::connect(socket)
            .await
            .map_err(|e| error(format!("connecting to {} failed: {e}", socket.display())))?;
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| error(format!("sending failed: {e}")))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| error(format!("reading the response failed: {e}")))?;
        Ok::<Vec<u8>, VmmError>(response)
    };
    let response = tokio::time::timeout(API_REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| error(format!("no response within {API_REQUEST_TIMEOUT:?}")))??;

    let (status, body) = parse_response(&response).map_err(error)?;
    if !(200..300).contains(&status) {
        return Err(error(format!(
            "status {status}: {}",
            String::from_utf8_lossy(body)
        )));
    }
    if body.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body).map_err(|e| error(format!("invalid JSON body: {e}")))
}

/// Splits an HTTP/1.1 response into its status code and body.
fn parse_response(response: &[u8]) -> Result<(u16, &[u8]), String> {
    let header_end = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| "response has no end of headers".to_owned())?;
    let head = std::str::from_utf8(&response[..header_end])
        .map_err(|_| "response headers are not UTF-8".to_owned())?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("invalid status line {:?}", head.lines().next()))?;
    Ok((status, &response[header_end + 4..]))
}

/// Files as Firecracker opens them (inside the jail when jailed).
#[derive(Debug)]
struct GuestPaths {
    kernel: PathBuf,
    initramfs: PathBuf,
    image_disk: PathBuf,
    data_disk: Option<PathBuf>,
    vsock: PathBuf,
}

/// Files in a VM's state directory (host paths).
#[derive(Debug, Clone)]
struct VmPaths {
    api_socket: PathBuf,
    vsock: PathBuf,
    vsock_listener: PathBuf,
    console_log: PathBuf,
}

impl VmPaths {
    fn new(dir: &Path) -> VmPaths {
        VmPaths {
            api_socket: dir.join("firecracker.sock"),
            vsock: dir.join("vsock.sock"),
            vsock_listener: dir.join(format!("vsock.sock_{VSOCK_PORT}")),
            console_log: dir.join("console.log"),
        }
    }
}

/// One Firecracker microVM.
#[derive(Debug)]
pub struct FirecrackerVm {
    spec: VmSpec,
    paths: VmPaths,
    pid: Option<u32>,
    child: Option<Child>,
    channel: Option<ChannelWriter>,
    kill_signal: i32,
    jail_slot: Option<u32>,
}

impl FirecrackerVm {
    /// Process id of Firecracker (or the jailer), once started.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Sender for messages to kiln-init, once started.
    pub fn channel(&self) -> Option<&ChannelWriter> {
        self.channel.as_ref()
    }
}

impl Driver for FirecrackerDriver {
    type Vm = FirecrackerVm;

    async fn create(&self, spec: VmSpec) -> Result<FirecrackerVm, VmmError> {
        spec.validate()?;
        std::fs::create_dir_all(&spec.state_dir).map_err(|source| VmmError::File {
            operation: "create state directory",
            path: spec.state_dir.clone(),
            source,
        })?;
        Ok(FirecrackerVm {
            paths: VmPaths::new(&spec.state_dir),
            spec,
            pid: None,
            child: None,
            channel: None,
            kill_signal: libc::SIGTERM,
            jail_slot: None,
        })
    }

    async fn start(
        &self,
        vm: &mut FirecrackerVm,
        config: InstanceConfig,
    ) -> Result<GuestEvents, VmmError> {
        vm.kill_signal = config.kill_signal;
        let instance = vm.spec.instance;

        let mut result = self.boot_once(vm, config.clone()).await;
        if matches!(result, Err(HandshakeError::Timeout)) {
            tracing::warn!(%instance, "boot timed out; retrying once");
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

    async fn stop(&self, vm: &mut FirecrackerVm, timeout: Duration) -> Result<VmState, VmmError> {
        if self.state(vm) != VmState::Running {
            return Ok(self.state(vm));
        }
        let instance = vm.spec.instance;
        let signal = HostMessage::Signal {
            signal: vm.kill_signal,
        };
        let sent = match &vm.channel {
            Some(channel) => channel.send(&signal).await.is_ok(),
            None => false,
        };
        if !sent {
            let action = json!({ "action_type": "SendCtrlAltDel" });
            if let Err(error) = api_request(&vm.paths.api_socket, "PUT", "/actions", action).await {
                tracing::warn!(%instance, %error, "SendCtrlAltDel failed");
            }
        }
        if Self::wait_and_reap(vm, timeout).await {
            return Ok(VmState::Stopped);
        }
        tracing::warn!(%instance, ?timeout, "vm did not stop in time; killing it");
        self.kill(vm).await?;
        Ok(VmState::Stopped)
    }

    async fn kill(&self, vm: &mut FirecrackerVm) -> Result<(), VmmError> {
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
                reason: format!("Firecracker process {pid} survived SIGKILL for {KILL_TIMEOUT:?}"),
            });
        }
        vm.channel = None;
        Ok(())
    }

    fn state(&self, vm: &mut FirecrackerVm) -> VmState {
        process::vm_state(vm.pid, vm.child.as_mut())
    }

    fn console_path<'a>(&self, vm: &'a FirecrackerVm) -> &'a Path {
        &vm.paths.console_log
    }

    async fn adopt(&self, record: VmRecord) -> Result<(FirecrackerVm, GuestEvents), VmmError> {
        let program = if self.config.jailer.is_some() {
            "jailer"
        } else {
            "firecracker"
        };
        record.check_alive(program)?;
        let instance = record.instance;

        // NOTE: the guest's vsock connection ended with the previous agent and kiln-init does
        // not reconnect, so an adopted VM has no channel: no output and no exit status, and
        // stop() falls back to SendCtrlAltDel.
        tracing::warn!(%instance, pid = record.pid, "firecracker vm adopted without its channel");
        let spec = VmSpec::new(
            instance,
            record.state_dir.clone(),
            crate::GuestAssets::in_dir(&record.state_dir),
            PathBuf::new(),
        );
        let mut paths = VmPaths::new(&record.state_dir);
        paths.api_socket = record.control_socket.clone();
        paths.console_log = record.console_log.clone();
        let vm = FirecrackerVm {
            spec,
            paths,
            pid: Some(record.pid),
            child: None,
            channel: None,
            kill_signal: record.kill_signal,
            jail_slot: None,
        };
        Ok((vm, GuestEvents::closed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_response_status_and_body() {
        let response = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\r\n{\"fault_message\":\"bad\"}";
        let (status, body) = parse_response(response).unwrap();
        assert_eq!(status, 400);
        assert_eq!(body, b"{\"fault_message\":\"bad\"}");
    }

    #[test]
    fn parse_response_no_content() {
        let (status, body) = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert_eq!(status, 204);
        assert!(body.is_empty());
    }

    #[test]
    fn parse_response_truncated_rejected() {
        let response = b"HTTP/1.1 204 No Content\r\n\r\n";
        for cut in 0..response.len() {
            assert!(
                parse_response(&response[..cut]).is_err(),
                "prefix {cut} accepted"
            );
        }
    }

    #[test]
    fn refuses_without_hardware_virtualization() {
        let config = FirecrackerConfig {
            binary: PathBuf::from("/bin/sh"),
            jailer: None,
        };
        let error =
            FirecrackerDriver::with_hardware(config, &HardwareVirt::Unusable("no vmx".into()))
                .unwrap_err();
        assert!(error.to_string().contains("no vmx"), "{error}");
    }
}
