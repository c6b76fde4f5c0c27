//! [`Vms`] over kiln-vmm's drivers (QEMU, Firecracker).
//!
//! The driver API is per VM handle and blocking where the agent's is not: `stop` waits for the
//! guest, and guest messages arrive as a stream. This adapter keeps the handles, runs one task
//! per VM that forwards the workload's output to the instance's [`LogSink`] and records its
//! exit code, follows the VM's serial console into the same sink, and runs each graceful stop
//! in a task of its own so the reconcile loop never waits on a guest.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_api::types::LogStream;
use kiln_core::InstanceId;
use kiln_vmm::channel::{ChannelWriter, GuestEvents};
use kiln_vmm::firecracker::FirecrackerVm;
use kiln_vmm::proto::{GuestMessage, HostMessage, InstanceConfig, NetworkConfig, Secret, Stream};
use kiln_vmm::qemu::QemuVm;
use kiln_vmm::record::{RECORD_FILE, VmRecord};
use kiln_vmm::{Driver, GuestAssets, VmState};
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::console::ConsoleFollower;
use crate::logs::LogSink;
use crate::runtime::{ListeningSocket, RuntimeError, VmHandle, VmSpec, VmStatus, Vms};

/// Time a listening-socket request waits for kiln-init's reply.
const SOCKETS_TIMEOUT: Duration = Duration::from_secs(2);

/// Guest MTU on the TAP.
const GUEST_MTU: u32 = 1500;

/// What the adapter needs from a driver's VM handle beyond the driver trait.
pub trait VmAccess {
    /// The VMM's process id, once started.
    fn pid(&self) -> Option<u32>;
    /// The channel to kiln-init, once started.
    fn channel(&self) -> Option<&ChannelWriter>;
}

impl VmAccess for QemuVm {
    fn pid(&self) -> Option<u32> {
        QemuVm::pid(self)
    }

    fn channel(&self) -> Option<&ChannelWriter> {
        QemuVm::channel(self)
    }
}

impl VmAccess for FirecrackerVm {
    fn pid(&self) -> Option<u32> {
        FirecrackerVm::pid(self)
    }

    fn channel(&self) -> Option<&ChannelWriter> {
        FirecrackerVm::channel(self)
    }
}

/// Settings of the adapter.
#[derive(Debug, Clone)]
pub struct VmmSettings {
    /// Guest kernel and initramfs.
    pub assets: GuestAssets,
    /// Time a boot may take until kiln-init sends its hello.
    pub boot_timeout: Duration,
    /// Size bound of the serial console log the driver keeps in the VM's directory.
    pub console_limit_bytes: u64,
}

struct Entry<Vm> {
    instance: InstanceId,
    vm: tokio::sync::Mutex<Vm>,
    /// The workload's exit code once kiln-init reported it.
    exit_code: Mutex<Option<i32>>,
    /// A pending listening-socket request.
    sockets: Mutex<Option<oneshot::Sender<Vec<ListeningSocket>>>>,
    /// Copies the serial console into the instance's log while the VM runs.
    console: ConsoleFollower,
}

/// VMs through a kiln-vmm driver.
pub struct VmmVms<D: Driver> {
    driver: Arc<D>,
    settings: VmmSettings,
    vms: Mutex<BTreeMap<u32, Arc<Entry<D::Vm>>>>,
}

/// A failed VM operation of the adapter.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The handle names no VM this agent controls.
    #[error("no VM with process id {pid} is known to this agent")]
    UnknownVm {
        /// The VMM's process id.
        pid: u32,
    },
    /// The driver started the VM but reported no process id.
    #[error("the driver reported no process id for instance {instance}")]
    NoPid {
        /// The instance.
        instance: InstanceId,
    },
    /// The assignment's kill signal is not a signal name.
    #[error("invalid kill signal {value:?}: use a name such as SIGTERM or SIGINT")]
    KillSignal {
        /// The rejected value.
        value: String,
    },
    /// The guest did not answer a request in time.
    #[error("kiln-init did not list its sockets within {timeout:?}")]
    SocketsTimeout {
        /// The timeout.
        timeout: Duration,
    },
    /// The VM has no channel to kiln-init.
    #[error("the VM of instance {instance} has no channel to kiln-init")]
    NoChannel {
        /// The instance.
        instance: InstanceId,
    },
}

impl<D> VmmVms<D>
where
    D: Driver + 'static,
    D::Vm: VmAccess + Send + 'static,
{
    /// Uses `driver` with `settings`.
    pub fn new(driver: D, settings: VmmSettings) -> Self {
        Self {
            driver: Arc::new(driver),
            settings,
            vms: Mutex::new(BTreeMap::new()),
        }
    }

    fn entry(&self, handle: &VmHandle) -> Result<Arc<Entry<D::Vm>>, RuntimeError> {
        self.lock()
            .get(&handle.pid)
            .cloned()
            .ok_or_else(|| Box::new(AdapterError::UnknownVm { pid: handle.pid }) as RuntimeError)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Arc<Entry<D::Vm>>>> {
        self.vms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn track(
        &self,
        instance: InstanceId,
        vm: D::Vm,
        events: GuestEvents,
        logs: LogSink,
        console: ConsoleFollower,
    ) -> Result<VmHandle, RuntimeError> {
        let pid = vm.pid().ok_or(AdapterError::NoPid { instance })?;
        let entry = Arc::new(Entry {
            instance,
            vm: tokio::sync::Mutex::new(vm),
            exit_code: Mutex::new(None),
            sockets: Mutex::new(None),
            console,
        });
        tokio::spawn(forward_events(Arc::clone(&entry), events, logs));
        self.lock().insert(pid, entry);
        Ok(VmHandle {
            pid,
            data: serde_json::Value::Null,
        })
    }
}

impl<D> Vms for VmmVms<D>
where
    D: Driver + 'static,
    D::Vm: VmAccess + Send + 'static,
{
    async fn boot(&self, spec: VmSpec) -> Result<VmHandle, RuntimeError> {
        let instance = spec.instance;
        let kill_signal = parse_signal(&spec.kill_signal)?;
        let mut vm_spec = kiln_vmm::VmSpec::new(
            instance,
            spec.run_dir.join("vm"),
            self.settings.assets.clone(),
            spec.image.rootfs.clone(),
        );
        vm_spec.data_disk = Some(spec.disk.clone());
        vm_spec.tap = Some(spec.network.tap.clone());
        vm_spec.mac = Some(spec.network.mac.clone());
        vm_spec.vcpus = u8::try_from(spec.vcpus).unwrap_or(u8::MAX);
        vm_spec.memory_mib = spec.memory_mib;
        vm_spec.boot_timeout = self.settings.boot_timeout;
        vm_spec.console_limit_bytes = self.settings.console_limit_bytes;

        let secrets = spec
            .secrets
            .as_ref()
            .map(|secrets| {
                secrets
                    .values
                    .iter()
                    .map(|(name, value)| Secret {
                        name: name.clone(),
                        value: value.as_bytes().to_vec(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let config = InstanceConfig {
            argv: spec.command.clone(),
            workdir: spec
                .image
                .working_dir
                .clone()
                .unwrap_or_else(|| "/".to_owned()),
            uid: spec.image.uid,
            gid: spec.image.gid,
            env: spec.env.clone().into_iter().collect(),
            secrets,
            secrets_as_env: false,
            hostname: instance.to_string(),
            network: Some(NetworkConfig {
                ipv6: spec.network.ipv6,
                ipv6_gateway: spec.network.ipv6_gateway,
                ipv4: Some(spec.network.ipv4),
                ipv4_gateway: Some(spec.network.ipv4_gateway),
                mtu: GUEST_MTU,
                dns_servers: Vec::new(),
            }),
            startup_scripts: spec.startup_scripts.clone(),
            kill_signal,
            entropy_seed: rand::random::<[u8; 32]>().to_vec(),
        };

        let mut vm = self.driver.create(vm_spec).await?;
        // Following starts before the boot, so a boot that fails still ships its console
        // (a kernel panic, kiln-init's error) when the follower drops.
        let console = ConsoleFollower::start(
            self.driver.console_path(&vm).to_path_buf(),
            spec.logs.clone(),
        );
        let events = self.driver.start(&mut vm, config).await?;
        info!(%instance, pid = ?vm.pid(), "microVM started");
        self.track(instance, vm, events, spec.logs, console)
    }

    async fn adopt(
        &self,
        instance: InstanceId,
        run_dir: &Path,
        logs: LogSink,
    ) -> Result<Option<VmHandle>, RuntimeError> {
        let vm_dir = run_dir.join("vm");
        if !vm_dir.join(RECORD_FILE).exists() {
            return Ok(None);
        }
        let record = VmRecord::load(&vm_dir)?;
        let console = ConsoleFollower::start(record.console_log.clone(), logs.clone());
        match self.driver.adopt(record).await {
            Ok((vm, events)) => self.track(instance, vm, events, logs, console).map(Some),
            Err(kiln_vmm::VmmError::Adopt { reason, .. }) => {
                info!(%instance, %reason, "no running VM to adopt");
                Ok(None)
            }
            Err(error) => Err(Box::new(error)),
        }
    }

    async fn status(&self, handle: &VmHandle) -> Result<VmStatus, RuntimeError> {
        let entry = self.entry(handle)?;
        // A stop in progress has the VM locked, and the VM counts as running until it ends.
        let Ok(mut vm) = entry.vm.try_lock() else {
            return Ok(VmStatus::Running);
        };
        match self.driver.state(&mut vm) {
            VmState::Created | VmState::Running => Ok(VmStatus::Running),
            VmState::Stopped => {
                drop(vm);
                entry.console.stop();
                self.lock().remove(&handle.pid);
                let code = *entry
                    .exit_code
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                Ok(VmStatus::Exited { code })
            }
        }
    }

    async fn stop(&self, handle: &VmHandle, timeout: Duration) -> Result<(), RuntimeError> {
        let entry = self.entry(handle)?;
        let driver = Arc::clone(&self.driver);
        tokio::spawn(async move {
            let mut vm = entry.vm.lock().await;
            if let Err(error) = driver.stop(&mut vm, timeout).await {
                warn!(instance = %entry.instance, %error, "stopping the VM failed");
            }
        });
        Ok(())
    }

    async fn kill(&self, handle: &VmHandle) -> Result<(), RuntimeError> {
        let entry = self.entry(handle)?;
        // A running graceful stop kills the VM itself when its timeout passes.
        let Ok(mut vm) = entry.vm.try_lock() else {
            return Ok(());
        };
        self.driver.kill(&mut vm).await?;
        Ok(())
    }

    async fn listening_sockets(
        &self,
        handle: &VmHandle,
    ) -> Result<Vec<ListeningSocket>, RuntimeError> {
        let entry = self.entry(handle)?;
        let (sender, receiver) = oneshot::channel();
        *entry
            .sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sender);
        let channel = {
            let vm = entry.vm.try_lock().map_err(|_| AdapterError::NoChannel {
                instance: entry.instance,
            })?;
            vm.channel().cloned().ok_or(AdapterError::NoChannel {
                instance: entry.instance,
            })?
        };
        channel.send(&HostMessage::ListSockets).await?;
        match tokio::time::timeout(SOCKETS_TIMEOUT, receiver).await {
            Ok(Ok(sockets)) => Ok(sockets),
            _ => Err(Box::new(AdapterError::SocketsTimeout {
                timeout: SOCKETS_TIMEOUT,
            })),
        }
    }
}

/// Forwards the guest's messages until its channel closes.
async fn forward_events<Vm>(entry: Arc<Entry<Vm>>, mut events: GuestEvents, logs: LogSink) {
    while let Some(message) = events.recv().await {
        match message {
            GuestMessage::Log { stream, line } => {
                let stream = match stream {
                    Stream::Stdout => LogStream::Stdout,
                    Stream::Stderr => LogStream::Stderr,
                };
                logs.write(stream, line.as_bytes());
                logs.write(stream, b"\n");
            }
            GuestMessage::Exited(status) => {
                *entry
                    .exit_code
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(status.shell_code());
            }
            GuestMessage::BootFailed { message } => {
                logs.agent_line(&format!(
                    "the guest could not start the workload: {message}"
                ));
            }
            GuestMessage::StartupScriptFailed {
                index,
                code,
                timed_out,
                output,
            } => {
                let how = if timed_out {
                    "timed out".to_owned()
                } else {
                    format!("failed with {code:?}")
                };
                logs.agent_line(&format!("startup script {index} {how}: {output}"));
            }
            GuestMessage::ListeningSockets { sockets } => {
                let parsed = sockets
                    .iter()
                    .filter(|socket| socket.protocol == "tcp")
                    .filter_map(|socket| {
                        let ip: IpAddr = socket.address.parse().ok()?;
                        Some(SocketAddr::new(ip, socket.port))
                    })
                    .collect();
                let pending = entry
                    .sockets
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                if let Some(sender) = pending {
                    let _ = sender.send(parsed);
                }
            }
            GuestMessage::Started { pid } => {
                // Its timestamp splits the time from the boot to the first passing health
                // check into the guest's setup and the app's own start.
                logs.agent_line(&format!("workload started (guest pid {pid})"));
            }
            GuestMessage::Hello { .. } => {}
        }
    }
}

/// Parses a signal name (`SIGTERM`, `TERM`) or number.
fn parse_signal(value: &str) -> Result<i32, AdapterError> {
    if let Ok(number) = value.parse::<i32>()
        && (1..=64).contains(&number)
    {
        return Ok(number);
    }
    let name = value.strip_prefix("SIG").unwrap_or(value);
    let number = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "WINCH" => libc::SIGWINCH,
        _ => {
            return Err(AdapterError::KillSignal {
                value: value.to_owned(),
            });
        }
    };
    Ok(number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_and_numbers_parse() {
        assert_eq!(parse_signal("SIGTERM").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("INT").unwrap(), libc::SIGINT);
        assert_eq!(parse_signal("15").unwrap(), 15);
        assert!(parse_signal("SIGFOO").is_err());
        assert!(parse_signal("0").is_err());
    }
}
