//! The image store's configuration: platform, registries and their credentials, download
//! parallelism and the disk budget. It is meant to be embedded in the agent's config file.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

/// Configuration of an [`ImageStore`](crate::ImageStore).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Operating system to select from image indexes. Default: `linux`.
    #[serde(default = "default_os")]
    pub os: String,
    /// CPU architecture to select from image indexes, in Go's naming. Default: the host's
    /// (`amd64` on x86-64, `arm64` on AArch64).
    #[serde(default = "default_architecture")]
    pub architecture: String,
    /// Registries that need settings; any other registry is reached anonymously over HTTPS,
    /// except loopback hosts, which use plain HTTP as Docker does.
    #[serde(default)]
    pub registries: Vec<RegistrySettings>,
    /// Layers downloaded at the same time per pull. Default: 4.
    #[serde(default = "default_parallel_downloads")]
    pub parallel_downloads: usize,
    /// Disk space that `gc` shrinks the store to, in bytes. Default: 20 GiB.
    #[serde(default = "default_disk_budget")]
    pub disk_budget_bytes: u64,
    /// Bytes of file content one image may unpack to; a larger image fails its build.
    /// Default: 16 GiB.
    #[serde(default = "default_max_unpacked_bytes")]
    pub max_unpacked_bytes: u64,
    /// Files, directories and links one image may unpack to. Default: 1,000,000.
    #[serde(default = "default_max_unpacked_entries")]
    pub max_unpacked_entries: u64,
    /// Timeout of one registry request without progress, in seconds. Default: 60.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
}

/// Settings for one registry host.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    /// The registry as written in image references: `host` or `host:port`.
    pub host: String,
    /// Use plain HTTP instead of HTTPS. Default: true for loopback hosts, false otherwise.
    #[serde(default)]
    pub plain_http: Option<bool>,
    /// User name for basic auth and for token requests.
    #[serde(default)]
    pub username: Option<String>,
    /// Password or access token that goes with `username`.
    #[serde(default)]
    pub password: Option<String>,
    /// File holding the password (trailing newline ignored); used when `password` is unset.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

impl fmt::Debug for RegistrySettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistrySettings")
            .field("host", &self.host)
            .field("plain_http", &self.plain_http)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .finish()
    }
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `parallel_downloads` is 0.
    #[error("parallel_downloads must be at least 1")]
    NoParallelism,
    /// An unpack limit is 0, so no image could be unpacked.
    #[error("{setting} is 0, so no image could be unpacked; remove it to use the default")]
    ZeroLimit {
        /// The config key.
        setting: &'static str,
    },
    /// A registry host is empty or has a scheme or path.
    #[error("registry host {host:?} is invalid: write host or host:port without a scheme or path")]
    InvalidHost {
        /// The rejected host.
        host: String,
    },
    /// A password is set without a user name.
    #[error("registry {host}: password is set without username")]
    PasswordWithoutUser {
        /// The registry host.
        host: String,
    },
    /// The password file cannot be read.
    #[error("registry {host}: failed to read password_file {path}")]
    PasswordFile {
        /// The registry host.
        host: String,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn default_os() -> String {
    "linux".to_owned()
}

fn default_architecture() -> String {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
    .to_owned()
}

fn default_parallel_downloads() -> usize {
    4
}

fn default_max_unpacked_bytes() -> u64 {
    crate::unpack::UnpackLimits::default().max_bytes
}

fn default_max_unpacked_entries() -> u64 {
    crate::unpack::UnpackLimits::default().max_entries
}

fn default_disk_budget() -> u64 {
    20 * 1024 * 1024 * 1024
}

fn default_request_timeout() -> u64 {
    60
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            os: default_os(),
            architecture: default_architecture(),
            registries: Vec::new(),
            parallel_downloads: default_parallel_downloads(),
            disk_budget_bytes: default_disk_budget(),
            max_unpacked_bytes: default_max_unpacked_bytes(),
            max_unpacked_entries: default_max_unpacked_entries(),
            request_timeout_secs: default_request_timeout(),
        }
    }
}

/// Credentials for one registry, resolved from its settings.
#[derive(Clone)]
pub(crate) struct Credentials {
    pub(crate) username: String,
    pub(crate) password: String,
}

impl StoreConfig {
    /// Checks values that parse but cannot work, and reads password files.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if self.parallel_downloads == 0 {
            return Err(ConfigError::NoParallelism);
        }
        for (setting, value) in [
            ("max_unpacked_bytes", self.max_unpacked_bytes),
            ("max_unpacked_entries", self.max_unpacked_entries),
        ] {
            if value == 0 {
                return Err(ConfigError::ZeroLimit { setting });
            }
        }
        for registry in &mut self.registries {
            if registry.host.is_empty() || registry.host.contains(['/', ' ']) {
                return Err(ConfigError::InvalidHost {
                    host: registry.host.clone(),
                });
            }
            if registry.password.is_none()
                && let Some(path) = &registry.password_file
            {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::PasswordFile {
                        host: registry.host.clone(),
                        path: path.clone(),
                        source,
                    })?;
                registry.password = Some(text.trim_end_matches(['\n', '\r']).to_owned());
            }
            if registry.password.is_some() && registry.username.is_none() {
                return Err(ConfigError::PasswordWithoutUser {
                    host: registry.host.clone(),
                });
            }
        }
        Ok(())
    }

    fn settings(&self, host: &str) -> Option<&RegistrySettings> {
        self.registries
            .iter()
            .find(|registry| registry.host == host)
    }

    /// Whether to use plain HTTP for `host` (`host` or `host:port`).
    pub fn plain_http(&self, host: &str) -> bool {
        if let Some(plain_http) = self.settings(host).and_then(|settings| settings.plain_http) {
            return plain_http;
        }
        let name = match host.rsplit_once(':') {
            Some((name, port)) if port.parse::<u16>().is_ok() => name,
            _ => host,
        };
        name == "localhost" || name == "[::1]" || name.starts_with("127.")
    }

    pub(crate) fn credentials(&self, host: &str) -> Option<Credentials> {
        let settings = self.settings(host)?;
        Some(Credentials {
            username: settings.username.clone()?,
            password: settings.password.clone().unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_defaults_to_plain_http() {
        let config = StoreConfig::default();
        assert!(config.plain_http("127.0.0.1:5000"));
        assert!(config.plain_http("localhost:5000"));
        assert!(!config.plain_http("ghcr.io"));
    }

    #[test]
    fn unknown_fields_rejected() {
        let error = toml_like(r#"{"registries":[{"host":"x","pasword":"typo"}]}"#).unwrap_err();
        assert!(error.to_string().contains("pasword"), "{error}");
    }

    #[test]
    fn password_needs_username() {
        let mut config =
            toml_like(r#"{"registries":[{"host":"r.example","password":"p"}]}"#).unwrap();
        assert!(matches!(
            config.validate(),
            Err(ConfigError::PasswordWithoutUser { .. })
        ));
    }

    #[test]
    fn zero_unpack_limit_rejected() {
        let mut config = toml_like(r#"{"max_unpacked_entries":0}"#).unwrap();
        let error = config.validate().unwrap_err();
        assert!(
            error.to_string().contains("max_unpacked_entries is 0"),
            "{error}"
        );
    }

    #[test]
    fn debug_redacts_password() {
        let config =
            toml_like(r#"{"registries":[{"host":"r","username":"u","password":"hunter2"}]}"#)
                .unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    fn toml_like(json: &str) -> Result<StoreConfig, serde_json::Error> {
        serde_json::from_str(json)
    }
}
