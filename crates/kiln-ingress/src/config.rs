//! The ingress configuration: one struct, read from an optional TOML file and then
//! overridden by command-line flags (defaults, then file, then flags; `main.rs` applies the
//! flags). Unknown fields are rejected so a typo never silently keeps a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// Configuration of one `kiln-ingress` process.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngressConfig {
    /// Addresses to accept TLS connections on, routed by SNI. Default: none (the
    /// `--listen` flag adds to them). IPv6 listeners accept IPv6 only, so `[::]:443` and
    /// `0.0.0.0:443` can both be listed.
    pub listen: Vec<SocketAddr>,
    /// Static route file (see `routes::RouteFile`), reloaded on SIGHUP. Default: none.
    pub routes_file: Option<PathBuf>,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`). Default: none, which
    /// disables it. Bind it to loopback or a management network only.
    pub metrics_listen: Option<SocketAddr>,
    /// Time a client has to send its complete ClientHello, in milliseconds. Default: 5000.
    pub client_hello_timeout_ms: u64,
    /// Maximum bytes buffered while waiting for a complete ClientHello. Default: 16384,
    /// which holds a post-quantum hello (about 1.5 KiB) ten times over.
    pub client_hello_max_bytes: usize,
    /// Time to wait for a backend's TCP connect, in milliseconds. Default: 3000.
    pub connect_timeout_ms: u64,
    /// Backends tried per connection before giving up (a retry happens only when a connect
    /// fails, before any byte was forwarded). Default: 3.
    pub connect_attempts: u32,
    /// Seconds without a byte in either direction after which a connection is closed.
    /// Default: 600.
    pub idle_timeout_secs: u64,
    /// Maximum open connections from one client IP address. Default: 512.
    pub max_connections_per_client: u32,
    /// Seconds that a shutdown (SIGTERM) waits for open connections before closing them.
    /// Default: 30.
    pub drain_timeout_secs: u64,
    /// Seconds a backend whose connect failed is tried only after the others. Default: 10.
    pub backend_failure_cooldown_secs: u64,
    /// How a backend is chosen among a route's backends. Default: `least-connections`.
    pub balance: Balance,
    /// Mechanism that moves bytes between client and backend after the ClientHello.
    /// Default: `splice`.
    pub data_path: DataPath,
    /// Threads that run connections (tokio worker threads), like HAProxy's `nbthread`.
    /// Default: none, which uses one per CPU the process may run on.
    pub worker_threads: Option<usize>,
}

/// Mechanism that moves an established connection's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataPath {
    /// A 16 KiB user-space buffer per direction until one read fills it, then splice(2)
    /// through a pipe, so the payload of bulk transfers never enters user space. A direction
    /// whose pipe cannot be created (such as at the descriptor limit) keeps copying.
    Splice,
    /// read(2) into a user-space buffer and write(2) from it.
    Copy,
}

/// Backend selection policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// The backend with the fewest open connections through this ingress.
    LeastConnections,
    /// The less loaded of two backends picked at random, which avoids herding when many
    /// ingresses share backends but each sees only its own connections.
    PowerOfTwoChoices,
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            routes_file: None,
            metrics_listen: None,
            client_hello_timeout_ms: 5000,
            client_hello_max_bytes: 16 * 1024,
            connect_timeout_ms: 3000,
            connect_attempts: 3,
            idle_timeout_secs: 600,
            max_connections_per_client: 512,
            drain_timeout_secs: 30,
            backend_failure_cooldown_secs: 10,
            balance: Balance::LeastConnections,
            data_path: DataPath::Splice,
            worker_threads: None,
        }
    }
}

/// Why a configuration could not be loaded or is not usable.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read config file {path}")]
    Read {
        /// Path of the config file.
        path: PathBuf,
        /// The I/O failure.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped fields.
    #[error("invalid config file {path} at {location}: {message}")]
    Parse {
        /// Path of the config file.
        path: PathBuf,
        /// `line L, column C` of the offending value.
        location: String,
        /// The TOML parser's message.
        message: String,
    },
    /// A field has a value the ingress cannot run with.
    #[error("invalid config: {field} = {value}: {fix}")]
    Invalid {
        /// Name of the field.
        field: &'static str,
        /// The rejected value.
        value: String,
        /// What a valid value looks like.
        fix: &'static str,
    },
}

impl IngressConfig {
    /// Reads a config file, rejecting unknown fields.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            location: toml_location(&text, &error),
            message: error.message().to_owned(),
        })
    }

    /// Checks the values that parsing alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, value: String, fix| Err(ConfigError::Invalid { field, value, fix });

        if self.listen.is_empty() {
            return invalid(
                "listen",
                "[]".into(),
                "give at least one ADDR:PORT (or --listen)",
            );
        }
        if self.client_hello_max_bytes < 512 || self.client_hello_max_bytes > 1 << 20 {
            return invalid(
                "client_hello_max_bytes",
                self.client_hello_max_bytes.to_string(),
                "use a value from 512 to 1048576; 16384 fits any ClientHello seen in practice",
            );
        }
        if self.client_hello_timeout_ms == 0 {
            return invalid(
                "client_hello_timeout_ms",
                "0".into(),
                "use a positive value such as 5000",
            );
        }
        if self.connect_timeout_ms == 0 {
            return invalid(
                "connect_timeout_ms",
                "0".into(),
                "use a positive value such as 3000",
            );
        }
        if self.connect_attempts == 0 {
            return invalid("connect_attempts", "0".into(), "use 1 or more");
        }
        if self.idle_timeout_secs == 0 {
            return invalid(
                "idle_timeout_secs",
                "0".into(),
                "use a positive value such as 600",
            );
        }
        if let Some(threads) = self.worker_threads
            && !(1..=1024).contains(&threads)
        {
            return invalid(
                "worker_threads",
                threads.to_string(),
                "use 1 to 1024, or leave it unset for one thread per CPU",
            );
        }
        if self.max_connections_per_client == 0 {
            return invalid("max_connections_per_client", "0".into(), "use 1 or more");
        }
        Ok(())
    }

    /// Time limit for receiving the ClientHello.
    pub fn client_hello_timeout(&self) -> Duration {
        Duration::from_millis(self.client_hello_timeout_ms)
    }

    /// Time limit for one backend connect.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Inactivity limit of an established connection.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// Time a shutdown waits for open connections.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    /// Time a failed backend is tried last.
    pub fn backend_failure_cooldown(&self) -> Duration {
        Duration::from_secs(self.backend_failure_cooldown_secs)
    }
}

/// Returns `line L, column C` (both 1-based) where a TOML parse error starts.
pub(crate) fn toml_location(text: &str, error: &toml::de::Error) -> String {
    let Some(span) = error.span() else {
        return "an unknown position".to_owned();
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {column}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_fields_parse() {
        let config: IngressConfig = toml::from_str(
            r#"
            listen = ["[::]:443", "0.0.0.0:443"]
            routes_file = "/etc/kiln/routes.toml"
            metrics_listen = "127.0.0.1:9443"
            balance = "power-of-two-choices"
            idle_timeout_secs = 60
            data_path = "copy"
            "#,
        )
        .unwrap();
        assert_eq!(config.listen.len(), 2);
        assert_eq!(config.balance, Balance::PowerOfTwoChoices);
        assert_eq!(config.idle_timeout_secs, 60);
        assert_eq!(config.data_path, DataPath::Copy);
        assert_eq!(config.connect_attempts, 3);
        config.validate().unwrap();
    }

    #[test]
    fn config_unknown_field_rejected() {
        let error = toml::from_str::<IngressConfig>("idle_timeout = 5").unwrap_err();
        assert!(
            error.to_string().contains("unknown field `idle_timeout`"),
            "{error}"
        );
    }

    #[test]
    fn config_without_listener_invalid() {
        let error = IngressConfig::default().validate().unwrap_err();
        assert!(error.to_string().contains("listen"), "{error}");
    }

    #[test]
    fn config_zero_threads_invalid() {
        let config = IngressConfig {
            listen: vec!["127.0.0.1:443".parse().unwrap()],
            worker_threads: Some(0),
            ..IngressConfig::default()
        };
        let error = config.validate().unwrap_err();
        assert!(error.to_string().contains("worker_threads = 0"), "{error}");
    }

    #[test]
    fn config_tiny_hello_cap_invalid() {
        let config = IngressConfig {
            listen: vec!["127.0.0.1:443".parse().unwrap()],
            client_hello_max_bytes: 100,
            ..IngressConfig::default()
        };
        let error = config.validate().unwrap_err();
        assert!(
            error.to_string().contains("client_hello_max_bytes = 100"),
            "{error}"
        );
    }
}
