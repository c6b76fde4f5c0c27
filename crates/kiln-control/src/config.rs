//! Configuration of `kiln-control serve`.
//!
//! Precedence, lowest to highest: built-in defaults, the TOML file given with `--config`,
//! environment variables (`KILN_DATABASE_URL`, `KILN_LISTEN`, `KILN_MASTER_KEY_FILE`), then
//! command-line flags. [`Config::resolve`] applies them in that order, then
//! [`Config::validate`] checks the result. Unknown keys in the file are rejected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

/// Configuration of the control plane server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP API listens on. Default `127.0.0.1:7070`.
    pub listen: SocketAddr,
    /// PostgreSQL URL, such as `postgres://kiln@db/kiln` or
    /// `postgres://postgres@localhost/kiln?host=/run/postgresql`. Required.
    pub database_url: Option<String>,
    /// Most connections to PostgreSQL. Default 20.
    pub database_max_connections: u32,
    /// Path of the master key file of the secrets (see `kiln-control secrets generate-key`).
    /// Required.
    pub master_key_file: Option<PathBuf>,
    /// Seconds a host's lease lasts without a heartbeat. Default 30.
    pub host_lease_secs: u64,
    /// Log lines kept per environment for `kiln logs`. Default 10000.
    pub log_window_lines: u32,
    /// Seconds between attempts to become leader, and between runs of the leader's
    /// periodic work. Default 2.
    pub leader_interval_secs: u64,
    /// Public IPv4 prefixes (CIDR, such as `["203.0.113.0/28"]`) from which environments
    /// are allocated dedicated IPv4 addresses, in order. The network and broadcast
    /// addresses of prefixes shorter than /31 are never allocated. Written to the database
    /// when the server starts, so every replica must list the same prefixes. Default empty,
    /// which disables dedicated IPv4 addresses.
    pub dedicated_ipv4_pool: Vec<ipnet::Ipv4Net>,
    /// Maximum seconds a deploy waits for every ingress to apply a route change before it
    /// stops the instances taken out of the routes. Default 10.
    pub route_drain_deadline_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7070))),
            database_url: None,
            database_max_connections: 20,
            master_key_file: None,
            host_lease_secs: 30,
            log_window_lines: 10_000,
            leader_interval_secs: 2,
            dedicated_ipv4_pool: Vec::new(),
            route_drain_deadline_secs: crate::ingress_acks::DEFAULT_DRAIN_DEADLINE.as_secs(),
        }
    }
}

/// Values given on the command line, which override everything else.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--database-url`.
    pub database_url: Option<String>,
    /// `--master-key-file`.
    pub master_key_file: Option<PathBuf>,
}

/// Errors of loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for [`Config`].
    #[error("invalid config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Cause (names the key, line and column).
        #[source]
        source: toml::de::Error,
    },
    /// An environment variable has an invalid value.
    #[error("invalid value {value:?} in environment variable {name}: {reason}")]
    Env {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A required setting is missing.
    #[error("missing {setting}: set `{key}` in the config file, {env}, or {flag}")]
    Missing {
        /// What is missing.
        setting: &'static str,
        /// Key in the file.
        key: &'static str,
        /// Environment variable.
        env: &'static str,
        /// Command-line flag.
        flag: &'static str,
    },
    /// A prefix of `dedicated_ipv4_pool` has host bits set or overlaps another.
    #[error("invalid dedicated_ipv4_pool entry {prefix}: {reason}")]
    Ipv4Pool {
        /// The prefix as written.
        prefix: ipnet::Ipv4Net,
        /// Reason it is invalid, with the fix.
        reason: String,
    },
    /// A setting is out of range.
    #[error("invalid {key} {value}: {reason}")]
    OutOfRange {
        /// Key in the file.
        key: &'static str,
        /// The value.
        value: u64,
        /// The allowed range.
        reason: &'static str,
    },
}

impl Config {
    /// Builds the configuration from defaults, an optional file, the environment and flags.
    pub fn resolve(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config = match file {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };

        if let Some(url) = env_var("KILN_DATABASE_URL") {
            config.database_url = Some(url);
        }
        if let Some(listen) = env_var("KILN_LISTEN") {
            config.listen =
                listen
                    .parse()
                    .map_err(|error: std::net::AddrParseError| ConfigError::Env {
                        name: "KILN_LISTEN",
                        value: listen.clone(),
                        reason: format!("{error}; expected ADDRESS:PORT such as 127.0.0.1:7070"),
                    })?;
        }
        if let Some(path) = env_var("KILN_MASTER_KEY_FILE") {
            config.master_key_file = Some(PathBuf::from(path));
        }

        if let Some(listen) = overrides.listen {
            config.listen = listen;
        }
        if let Some(url) = &overrides.database_url {
            config.database_url = Some(url.clone());
        }
        if let Some(path) = &overrides.master_key_file {
            config.master_key_file = Some(path.clone());
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Checks required settings and ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.database_url.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::Missing {
                setting: "database URL",
                key: "database_url",
                env: "KILN_DATABASE_URL",
                flag: "--database-url",
            });
        }
        if self.master_key_file.is_none() {
            return Err(ConfigError::Missing {
                setting: "master key file",
                key: "master_key_file",
                env: "KILN_MASTER_KEY_FILE",
                flag: "--master-key-file",
            });
        }
        if !(2..=1000).contains(&self.database_max_connections) {
            return Err(ConfigError::OutOfRange {
                key: "database_max_connections",
                value: u64::from(self.database_max_connections),
                reason: "use 2 to 1000",
            });
        }
        if !(5..=3600).contains(&self.host_lease_secs) {
            return Err(ConfigError::OutOfRange {
                key: "host_lease_secs",
                value: self.host_lease_secs,
                reason: "use 5 to 3600 seconds",
            });
        }
        if !(100..=1_000_000).contains(&self.log_window_lines) {
            return Err(ConfigError::OutOfRange {
                key: "log_window_lines",
                value: u64::from(self.log_window_lines),
                reason: "use 100 to 1000000 lines",
            });
        }
        if !(1..=60).contains(&self.leader_interval_secs) {
            return Err(ConfigError::OutOfRange {
                key: "leader_interval_secs",
                value: self.leader_interval_secs,
                reason: "use 1 to 60 seconds",
            });
        }
        if self.route_drain_deadline_secs > 3600 {
            return Err(ConfigError::OutOfRange {
                key: "route_drain_deadline_secs",
                value: self.route_drain_deadline_secs,
                reason: "use 0 to 3600 seconds",
            });
        }
        validate_ipv4_pool(&self.dedicated_ipv4_pool)?;
        Ok(())
    }

    /// Returns the host lease duration.
    pub fn host_lease(&self) -> Duration {
        Duration::from_secs(self.host_lease_secs)
    }
}

/// Rejects prefixes with host bits set (a likely typo) and overlapping prefixes (which would
/// list one address twice).
fn validate_ipv4_pool(pool: &[ipnet::Ipv4Net]) -> Result<(), ConfigError> {
    for (index, prefix) in pool.iter().enumerate() {
        if prefix.addr() != prefix.network() {
            return Err(ConfigError::Ipv4Pool {
                prefix: *prefix,
                reason: format!("host bits are set; write {}", prefix.trunc()),
            });
        }
        if let Some(other) = pool[..index]
            .iter()
            .find(|other| other.contains(prefix) || prefix.contains(*other))
        {
            return Err(ConfigError::Ipv4Pool {
                prefix: *prefix,
                reason: format!("it overlaps {other}; list each address once"),
            });
        }
    }
    Ok(())
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected() {
        let error = toml::from_str::<Config>("listen = \"127.0.0.1:1\"\nlisten_adress = \"x\"\n")
            .unwrap_err();
        assert!(error.to_string().contains("listen_adress"), "{error}");
    }

    #[test]
    fn ipv4_pool_parses_and_validates() {
        let base = "database_url = \"postgres://x/y\"\nmaster_key_file = \"/k\"\n";
        let config: Config = toml::from_str(&format!(
            "{base}dedicated_ipv4_pool = [\"203.0.113.0/28\"]\n"
        ))
        .unwrap();
        assert_eq!(config.dedicated_ipv4_pool.len(), 1);
        config.validate().unwrap();

        let config: Config = toml::from_str(&format!(
            "{base}dedicated_ipv4_pool = [\"203.0.113.5/28\"]\n"
        ))
        .unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("203.0.113.5/28"), "{error}");
        assert!(error.contains("203.0.113.0/28"), "{error}");

        let config: Config = toml::from_str(&format!(
            "{base}dedicated_ipv4_pool = [\"203.0.113.0/24\", \"203.0.113.16/28\"]\n"
        ))
        .unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("overlaps 203.0.113.0/24"), "{error}");

        let error = toml::from_str::<Config>(&format!(
            "{base}dedicated_ipv4_pool = [\"2001:db8::/64\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(error.contains("dedicated_ipv4_pool"), "{error}");
    }

    #[test]
    fn missing_database_url_names_every_source() {
        let config = Config::default();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("KILN_DATABASE_URL"), "{error}");
        assert!(error.contains("--database-url"), "{error}");
    }

    #[test]
    fn out_of_range_lease_is_rejected() {
        let config = Config {
            database_url: Some("postgres://x/y".into()),
            master_key_file: Some("/k".into()),
            host_lease_secs: 1,
            ..Config::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("host_lease_secs")
        );
    }
}
