//! The agent's configuration file (TOML), parsed into [`AgentConfig`] and then checked by
//! [`AgentConfig::validate`].
//!
//! Precedence, in one place: built-in defaults, then the file. There are no environment or
//! flag overrides besides `--config FILE` itself, so a host's behavior is all in one file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_api::types::VmmDriver;
use serde::Deserialize;

use crate::logs::MAX_LINE_BYTES;

/// The agent's configuration. Unknown fields are rejected, so a typo is an error, not a
/// silently ignored setting.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Base URL of the control plane, such as `https://control.example:7070`. Required.
    pub control_url: String,
    /// File holding this host's token (one line). Required. Keep it mode 0600.
    pub host_token_file: PathBuf,
    /// Directory for instance records, disks and logs. Default `/var/lib/kiln`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// VMM driver: `firecracker` or `qemu`. Default `qemu`.
    #[serde(default = "default_driver")]
    pub driver: VmmDriver,
    /// Whether the QEMU driver may fall back to software virtualization (TCG) when the host
    /// has no usable KVM. Default `false`; dev stacks and tests turn it on.
    #[serde(default)]
    pub allow_software_virtualization: bool,
    /// Directory with the guest kernel and initramfs (`bzImage`, `vmlinux`,
    /// `initramfs.cpio`) that `scripts/guest-kernel` builds. Default `/var/lib/kiln/guest`.
    #[serde(default = "default_guest_assets_dir")]
    pub guest_assets_dir: PathBuf,
    /// The `firecracker` binary, required with `driver = "firecracker"`.
    #[serde(default)]
    pub firecracker_binary: Option<PathBuf>,
    /// Seconds a boot may take until kiln-init sends its hello. Default 60 (TCG boots are slow).
    #[serde(default = "default_boot_timeout_secs")]
    pub boot_timeout_secs: u64,
    /// Memory kept for the host itself, in MiB, subtracted from the memory offered to
    /// microVMs. Default 1024.
    #[serde(default = "default_memory_reserve_mib")]
    pub memory_reserve_mib: u64,
    /// vCPUs offered to microVMs. Default: the number of CPUs the agent may run on.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// The WireGuard endpoint other hosts dial, `ADDRESS:PORT`. Default `[::1]:51820`
    /// (single-host setups; multi-host setups must set it).
    #[serde(default = "default_overlay_endpoint")]
    pub overlay_endpoint: std::net::SocketAddr,
    /// Per-instance log limits.
    #[serde(default)]
    pub logs: LogConfig,
    /// The image store: registries and their credentials, download parallelism, disk budget
    /// (see kiln-image's `StoreConfig`). The store lives in `STATE_DIR/images`.
    #[serde(default)]
    pub images: kiln_image::StoreConfig,
    /// Host networking.
    #[serde(default)]
    pub network: NetworkConfig,
    /// Seconds between heartbeats. Default 10; must be well below the lease the control
    /// plane grants.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
}

/// Per-instance log limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Size of one log file in bytes before it is rotated. Default 4 MiB.
    #[serde(default = "default_log_file_bytes")]
    pub max_file_bytes: u64,
    /// Rotated files kept per instance besides the current one. Default 3.
    #[serde(default = "default_log_files")]
    pub max_files: u32,
    /// Bytes of log lines waiting to be shipped to the control plane, per instance, before
    /// the oldest are dropped (and counted). Default 1 MiB.
    #[serde(default = "default_pending_bytes")]
    pub max_pending_bytes: usize,
}

/// Host networking settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Prefix of the TAP devices the agent owns (1 to 3 lowercase letters). Default `kt`.
    #[serde(default = "default_tap_prefix")]
    pub tap_prefix: String,
    /// Interface guest egress leaves through and is masqueraded on. Default: any interface
    /// that is not a guest TAP.
    #[serde(default)]
    pub egress_interface: Option<String>,
}

/// An invalid configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this struct.
    #[error("invalid config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        #[source]
        source: toml::de::Error,
    },
    /// A field has an invalid value.
    #[error("invalid {field} {value:?} in the agent config: {hint}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// The rejected value.
        value: String,
        /// What to write instead.
        hint: &'static str,
    },
}

impl AgentConfig {
    /// Reads, parses and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.control_url.starts_with("http://") || self.control_url.starts_with("https://")) {
            return Err(ConfigError::Invalid {
                field: "control_url",
                value: self.control_url.clone(),
                hint: "use http://HOST:PORT or https://HOST",
            });
        }
        if !self.state_dir.is_absolute() {
            return Err(ConfigError::Invalid {
                field: "state_dir",
                value: self.state_dir.display().to_string(),
                hint: "use an absolute path such as /var/lib/kiln",
            });
        }
        if kiln_net::TapPrefix::new(self.network.tap_prefix.clone()).is_err() {
            return Err(ConfigError::Invalid {
                field: "network.tap_prefix",
                value: self.network.tap_prefix.clone(),
                hint: "use 1 to 3 lowercase ASCII letters, such as \"kt\"",
            });
        }
        if self.logs.max_file_bytes < 4096 {
            return Err(ConfigError::Invalid {
                field: "logs.max_file_bytes",
                value: self.logs.max_file_bytes.to_string(),
                hint: "use at least 4096 bytes",
            });
        }
        if self.logs.max_pending_bytes < MAX_LINE_BYTES {
            return Err(ConfigError::Invalid {
                field: "logs.max_pending_bytes",
                value: self.logs.max_pending_bytes.to_string(),
                hint: "use at least 16384 bytes, the longest log line",
            });
        }
        if self.heartbeat_secs == 0 {
            return Err(ConfigError::Invalid {
                field: "heartbeat_secs",
                value: "0".to_owned(),
                hint: "use a positive number of seconds, such as 10",
            });
        }
        if self.driver == VmmDriver::Firecracker && self.firecracker_binary.is_none() {
            return Err(ConfigError::Invalid {
                field: "firecracker_binary",
                value: String::new(),
                hint: "set the path of the firecracker binary, or use driver = \"qemu\"",
            });
        }
        if self.boot_timeout_secs == 0 {
            return Err(ConfigError::Invalid {
                field: "boot_timeout_secs",
                value: "0".to_owned(),
                hint: "use a positive number of seconds, such as 60",
            });
        }
        if self.vcpus == Some(0) {
            return Err(ConfigError::Invalid {
                field: "vcpus",
                value: "0".to_owned(),
                hint: "omit it to offer every CPU, or give a positive count",
            });
        }
        Ok(())
    }

    /// Returns the interval between heartbeats.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            max_file_bytes: default_log_file_bytes(),
            max_files: default_log_files(),
            max_pending_bytes: default_pending_bytes(),
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            tap_prefix: default_tap_prefix(),
            egress_interface: None,
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/kiln")
}

fn default_driver() -> VmmDriver {
    VmmDriver::Qemu
}

fn default_guest_assets_dir() -> PathBuf {
    PathBuf::from("/var/lib/kiln/guest")
}

fn default_boot_timeout_secs() -> u64 {
    60
}

fn default_memory_reserve_mib() -> u64 {
    1024
}

fn default_overlay_endpoint() -> std::net::SocketAddr {
    std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 51820))
}

fn default_log_file_bytes() -> u64 {
    4 * 1024 * 1024
}

fn default_log_files() -> u32 {
    3
}

fn default_pending_bytes() -> usize {
    1024 * 1024
}

fn default_tap_prefix() -> String {
    "kt".to_owned()
}

fn default_heartbeat_secs() -> u64 {
    10
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, String> {
        let config: AgentConfig = toml::from_str(text).map_err(|error| error.to_string())?;
        config.validate().map_err(|error| error.to_string())?;
        Ok(config)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse(
            "control_url = \"http://127.0.0.1:7070\"\nhost_token_file = \"/etc/kiln/token\"\n",
        )
        .unwrap();
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/kiln"));
        assert_eq!(config.driver, VmmDriver::Qemu);
        assert!(!config.allow_software_virtualization);
        assert_eq!(config.logs.max_files, 3);
        assert_eq!(config.network.tap_prefix, "kt");
    }

    #[test]
    fn unknown_field_rejected() {
        let error = parse(
            "control_url = \"http://x\"\nhost_token_file = \"/t\"\nstate_directory = \"/x\"\n",
        )
        .unwrap_err();
        assert!(error.contains("state_directory"), "{error}");
    }

    #[test]
    fn relative_state_dir_rejected() {
        let error =
            parse("control_url = \"http://x\"\nhost_token_file = \"/t\"\nstate_dir = \"kiln\"\n")
                .unwrap_err();
        assert!(error.contains("state_dir"), "{error}");
        assert!(error.contains("absolute"), "{error}");
    }

    #[test]
    fn bad_control_url_rejected() {
        let error =
            parse("control_url = \"control:7070\"\nhost_token_file = \"/t\"\n").unwrap_err();
        assert!(error.contains("control:7070"), "{error}");
    }

    #[test]
    fn long_tap_prefix_rejected() {
        let error = parse(
            "control_url = \"http://x\"\nhost_token_file = \"/t\"\n[network]\ntap_prefix = \"kiln\"\n",
        )
        .unwrap_err();
        assert!(error.contains("tap_prefix"), "{error}");
    }
}
