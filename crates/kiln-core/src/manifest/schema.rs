//! The manifest's types after validation, their defaults and their limits.
//!
//! A value of these types is always valid: the only ways to build one are parsing `kiln.toml`
//! (which validates) and reading back the canonical JSON that a valid manifest produced.
//! Maps are `BTreeMap`s so iteration and serialization order never depend on hashing.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::names::{AppName, EnvName, Hostname, NameError, ProcessName, validate_label};

/// Instances per process type when `count` is not set.
pub const DEFAULT_COUNT: u32 = 1;
/// Largest `count` a manifest may set for one process type. It catches typos such as
/// `count = 1000`; `kiln scale` is the tool for larger fleets.
pub const MAX_COUNT: u32 = 100;

/// vCPUs per instance when `vcpus` is not set.
pub const DEFAULT_VCPUS: u32 = 1;
/// Largest `vcpus`: Firecracker configures at most 32 vCPUs per microVM.
pub const MAX_VCPUS: u32 = 32;

/// Memory per instance, in MiB, when `memory` is not set.
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// Smallest `memory`, in MiB. The guest kernel, kiln-init and the page cache for the root
/// filesystem take a few tens of MiB before the workload starts, so below this a typical
/// workload is killed by the guest's OOM killer at start.
pub const MIN_MEMORY_MIB: u32 = 128;
/// Largest `memory`, in MiB (64 GiB), which catches unit mistakes such as MiB written as KiB.
pub const MAX_MEMORY_MIB: u32 = 65_536;

/// Smallest volume, in MiB: below this, ext4's journal and metadata take most of the space.
pub const MIN_VOLUME_MIB: u32 = 16;
/// Largest volume, in MiB (1 TiB).
pub const MAX_VOLUME_MIB: u32 = 1_048_576;

/// Time between the kill signal and SIGKILL when `kill_timeout` is not set.
pub const DEFAULT_KILL_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a startup script may run when its `timeout` is not set.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Time the release command may run when its `timeout` is not set.
pub const DEFAULT_RELEASE_TIMEOUT: Duration = Duration::from_secs(600);
/// Health-check interval when `interval` is not set.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(10);
/// Health-check timeout when `timeout` is not set.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Time after start during which failed health checks do not count, when not set.
pub const DEFAULT_HEALTH_GRACE: Duration = Duration::from_secs(5);
/// Expected HTTP status of an HTTP health check when `expected_status` is not set.
pub const DEFAULT_EXPECTED_STATUS: u16 = 200;
/// New instances a rolling deploy starts above the target count when `max_surge` is not set.
pub const DEFAULT_MAX_SURGE: u32 = 1;

/// A parsed and validated `kiln.toml`: the base configuration plus per-environment overrides.
///
/// [`Manifest::resolve`] turns it into the configuration of one environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The app this manifest deploys.
    pub app: AppName,
    /// Process types by name; each runs in its own microVMs.
    pub processes: BTreeMap<ProcessName, Process>,
    /// Services by name: the ports of process types that the ingress routes to.
    pub services: BTreeMap<ServiceName, Service>,
    /// Environment variables set for every process type, the release command and startup
    /// scripts.
    pub env: BTreeMap<String, String>,
    /// Volumes by name: a persistent disk per instance of one process type.
    pub volumes: BTreeMap<VolumeName, Volume>,
    /// Deploy strategy.
    pub deploy: Deploy,
    /// Commands run in order inside each microVM before its workload starts.
    pub startup: Vec<StartupScript>,
    /// A command run once per release, in its own microVM, before the rollout.
    pub release_command: Option<ReleaseCommand>,
    /// Per-environment overrides by environment name.
    pub environments: BTreeMap<EnvName, EnvOverrides>,
}

/// The configuration of one environment: the base manifest with that environment's overrides
/// applied. This is what a release stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedManifest {
    /// The app this manifest deploys.
    pub app: AppName,
    /// The environment these values are for.
    pub environment: EnvName,
    /// Process types by name.
    pub processes: BTreeMap<ProcessName, Process>,
    /// Services by name.
    pub services: BTreeMap<ServiceName, Service>,
    /// Environment variables, with the environment's values merged over the base.
    pub env: BTreeMap<String, String>,
    /// Volumes by name.
    pub volumes: BTreeMap<VolumeName, Volume>,
    /// Deploy strategy.
    pub deploy: Deploy,
    /// Startup scripts, in order.
    pub startup: Vec<StartupScript>,
    /// The release command, if any.
    pub release_command: Option<ReleaseCommand>,
}

/// One process type: a command of the image and the size and number of its microVMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// The argv to run; `None` runs the image's entrypoint and cmd.
    pub command: Option<Vec<String>>,
    /// Number of instances (0 to [`MAX_COUNT`]).
    pub count: u32,
    /// vCPUs per instance (1 to [`MAX_VCPUS`]).
    pub vcpus: u32,
    /// Memory per instance in MiB ([`MIN_MEMORY_MIB`] to [`MAX_MEMORY_MIB`]).
    pub memory_mib: u32,
    /// Signal sent to stop an instance.
    pub kill_signal: Signal,
    /// Time between the kill signal and SIGKILL.
    #[serde(rename = "kill_timeout_ms", with = "duration_ms")]
    pub kill_timeout: Duration,
}

/// A port of a process type that the ingress routes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// The process type that listens on the port.
    pub process: ProcessName,
    /// The port the process listens on inside its microVM.
    pub port: u16,
    /// Routing mode of the ingress.
    pub protocol: Protocol,
    /// Hostnames routed to this service by SNI (only for [`Protocol::Tls`]).
    pub hostnames: Vec<Hostname>,
    /// How the agent decides an instance is healthy.
    pub health: HealthCheck,
}

/// Routing mode of the ingress for a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TLS on a shared address, routed by the SNI of the ClientHello and never terminated.
    Tls,
    /// Raw TCP on a dedicated address of the environment.
    Tcp,
}

impl Protocol {
    /// Returns the name used in `kiln.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Tcp => "tcp",
        }
    }
}

/// A health check of a service's port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// The probe that one check runs.
    pub probe: Probe,
    /// Time between two checks.
    #[serde(rename = "interval_ms", with = "duration_ms")]
    pub interval: Duration,
    /// Time one check may take before it counts as failed.
    #[serde(rename = "timeout_ms", with = "duration_ms")]
    pub timeout: Duration,
    /// Time after the instance starts during which failed checks do not count.
    #[serde(rename = "grace_period_ms", with = "duration_ms")]
    pub grace_period: Duration,
}

/// The probe of a health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Probe {
    /// Opens a TCP connection to the port.
    Tcp,
    /// Sends `GET path` over HTTP/1.1 and expects a status.
    Http {
        /// Request path, starting with `/`.
        path: String,
        /// The status that counts as healthy.
        expected_status: u16,
        /// Whether the request goes over TLS (without certificate verification, since the
        /// certificate names the public hostname and not the instance address).
        tls: bool,
    },
}

/// A persistent disk attached to each instance of one process type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// The process type whose instances mount it.
    pub process: ProcessName,
    /// Absolute mount path inside the microVM.
    pub path: String,
    /// Size in MiB ([`MIN_VOLUME_MIB`] to [`MAX_VOLUME_MIB`]).
    pub size_mib: u32,
}

/// Deploy strategy: the order in which a deploy replaces old instances with new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "lowercase")]
pub enum Deploy {
    /// Start new instances, wait until healthy, move routes, then drain old ones.
    Rolling {
        /// New instances started above the target count at a time.
        max_surge: MaxSurge,
    },
    /// Stop all old instances, then start the new ones (for apps that cannot run two
    /// releases side by side).
    Immediate,
}

impl Default for Deploy {
    fn default() -> Self {
        Self::Rolling {
            max_surge: MaxSurge::Instances(DEFAULT_MAX_SURGE),
        }
    }
}

/// The surge of a rolling deploy: a number of instances or a percentage of the target count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaxSurge {
    /// This many instances (at least 1).
    Instances(u32),
    /// This percentage of the target count, rounded up (1 to 100).
    Percent(u32),
}

impl MaxSurge {
    /// Returns the number of extra instances for a process type with `count` instances.
    pub fn instances_for(self, count: u32) -> u32 {
        match self {
            Self::Instances(n) => n,
            Self::Percent(p) => (count.saturating_mul(p)).div_ceil(100).max(1),
        }
    }
}

/// A command run inside each microVM before its workload starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartupScript {
    /// The argv to run, from the image's filesystem.
    pub command: Vec<String>,
    /// Time the command may run; the instance fails to start when it takes longer.
    #[serde(rename = "timeout_ms", with = "duration_ms")]
    pub timeout: Duration,
    /// Process types it runs for; empty means every process type and the release command.
    pub processes: Vec<ProcessName>,
}

impl StartupScript {
    /// Returns true when the script runs before `process`.
    pub fn applies_to(&self, process: &ProcessName) -> bool {
        self.processes.is_empty() || self.processes.contains(process)
    }
}

/// A command run once per release, in its own microVM, before the rollout; the deploy fails
/// when it exits non-zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseCommand {
    /// The argv to run.
    pub command: Vec<String>,
    /// Time it may run before the deploy fails.
    #[serde(rename = "timeout_ms", with = "duration_ms")]
    pub timeout: Duration,
    /// vCPUs of its microVM.
    pub vcpus: u32,
    /// Memory of its microVM in MiB.
    pub memory_mib: u32,
}

/// Signals a process type may ask to be stopped with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Signal {
    /// SIGTERM, the default.
    #[default]
    Term,
    /// SIGINT.
    Int,
    /// SIGQUIT.
    Quit,
    /// SIGHUP.
    Hup,
    /// SIGUSR1.
    Usr1,
    /// SIGUSR2.
    Usr2,
}

impl Signal {
    /// Every accepted signal, in the order the docs list them.
    pub const ALL: [Signal; 6] = [
        Self::Term,
        Self::Int,
        Self::Quit,
        Self::Hup,
        Self::Usr1,
        Self::Usr2,
    ];

    /// Returns the signal's name with the `SIG` prefix.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Term => "SIGTERM",
            Self::Int => "SIGINT",
            Self::Quit => "SIGQUIT",
            Self::Hup => "SIGHUP",
            Self::Usr1 => "SIGUSR1",
            Self::Usr2 => "SIGUSR2",
        }
    }

    /// Returns the Linux signal number.
    pub fn number(self) -> i32 {
        match self {
            Self::Term => 15,
            Self::Int => 2,
            Self::Quit => 3,
            Self::Hup => 1,
            Self::Usr1 => 10,
            Self::Usr2 => 12,
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Signal {
    type Err = ();

    /// Parses `SIGTERM` or `TERM` (uppercase, as signals are written).
    fn from_str(text: &str) -> Result<Self, ()> {
        let name = text.strip_prefix("SIG").unwrap_or(text);
        Self::ALL
            .into_iter()
            .find(|signal| &signal.as_str()[3..] == name)
            .ok_or(())
    }
}

impl Serialize for Signal {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Signal {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse()
            .map_err(|()| serde::de::Error::custom(format!("unknown signal {text:?}")))
    }
}

/// The overrides of one environment, applied over the base by [`Manifest::resolve`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvOverrides {
    /// Per process type: count and size.
    pub processes: BTreeMap<ProcessName, ProcessOverride>,
    /// Per service: hostnames.
    pub services: BTreeMap<ServiceName, ServiceOverride>,
    /// Environment variables set or replaced in this environment.
    pub env: BTreeMap<String, String>,
    /// Per volume: size.
    pub volumes: BTreeMap<VolumeName, VolumeOverride>,
    /// Deploy strategy for this environment, replacing the base one.
    pub deploy: Option<Deploy>,
}

/// Overridable fields of a process type; `None` keeps the base value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessOverride {
    /// Number of instances.
    pub count: Option<u32>,
    /// vCPUs per instance.
    pub vcpus: Option<u32>,
    /// Memory per instance in MiB.
    pub memory_mib: Option<u32>,
}

/// Overridable fields of a service; `None` keeps the base value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceOverride {
    /// Hostnames, replacing the base list.
    pub hostnames: Option<Vec<Hostname>>,
}

/// Overridable fields of a volume; `None` keeps the base value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeOverride {
    /// Size in MiB.
    pub size_mib: Option<u32>,
}

macro_rules! manifest_label {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps a name (a DNS label, like every Kiln name).
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                validate_label($kind, &value)?;
                Ok(Self(value))
            }

            /// Returns the name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = NameError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = String::deserialize(deserializer)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

manifest_label!(
    /// Name of a service in a manifest (`https`, `db`), unique within it.
    ServiceName, "service"
);
manifest_label!(
    /// Name of a volume in a manifest (`data`), unique within it.
    VolumeName, "volume"
);

/// Serializes a `Duration` as whole milliseconds, the unit the canonical JSON uses.
mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        duration: &Duration,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        serializer.serialize_u64(ms)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_parses_with_and_without_prefix() {
        assert_eq!("SIGTERM".parse(), Ok(Signal::Term));
        assert_eq!("USR1".parse(), Ok(Signal::Usr1));
        assert_eq!("sigterm".parse::<Signal>(), Err(()));
        assert_eq!("SIGKILL".parse::<Signal>(), Err(()));
    }

    #[test]
    fn max_surge_percent_rounds_up() {
        assert_eq!(MaxSurge::Percent(25).instances_for(10), 3);
        assert_eq!(MaxSurge::Percent(25).instances_for(0), 1);
        assert_eq!(MaxSurge::Percent(100).instances_for(4), 4);
        assert_eq!(MaxSurge::Instances(2).instances_for(10), 2);
    }

    #[test]
    fn startup_script_scope() {
        let web = ProcessName::new("web").unwrap();
        let worker = ProcessName::new("worker").unwrap();
        let everywhere = StartupScript {
            command: vec!["/bin/true".to_owned()],
            timeout: DEFAULT_STARTUP_TIMEOUT,
            processes: Vec::new(),
        };
        let web_only = StartupScript {
            processes: vec![web.clone()],
            ..everywhere.clone()
        };
        assert!(everywhere.applies_to(&worker));
        assert!(web_only.applies_to(&web));
        assert!(!web_only.applies_to(&worker));
    }
}
