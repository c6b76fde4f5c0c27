//! Configuration from environment variables, read once at start.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// Port when `PORT` is not set.
pub const DEFAULT_PORT: u16 = 8443;
/// Directory where kiln-init writes one file per secret.
pub const DEFAULT_SECRETS_DIR: &str = "/run/kiln/secrets";

/// The server's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on: `LISTEN_ADDR`, or `[::]:PORT`.
    pub listen: SocketAddr,
    /// Source of the certificate.
    pub tls: TlsSource,
    /// Identity reported in every response.
    pub identity: Identity,
}

/// Source of the server certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// PEM files named by `TLS_CERT_FILE` (the chain) and `TLS_KEY_FILE` (the private key).
    Files {
        /// Certificate chain, leaf first.
        cert: PathBuf,
        /// Private key (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
    },
    /// A self-signed certificate generated at start for these names (`TLS_HOSTNAMES`,
    /// comma-separated, default `localhost`).
    SelfSigned {
        /// Subject alternative names.
        hostnames: Vec<String>,
    },
}

/// The identity Kiln gives an instance, reported in every response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `KILN_APP`.
    pub app: String,
    /// `KILN_ENV`.
    pub env: String,
    /// `KILN_RELEASE`.
    pub release: String,
    /// `KILN_INSTANCE`.
    pub instance: String,
    /// Directory listed for secret names: `SECRETS_DIR`, default `/run/kiln/secrets`.
    pub secrets_dir: PathBuf,
}

/// Invalid configuration, with the variable and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(&std::env::vars().collect())
    }

    /// Reads the configuration from a map of variables, so tests need not touch the process
    /// environment.
    pub fn from_vars(vars: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let get = |name: &str| vars.get(name).filter(|value| !value.is_empty());

        let listen = match (get("LISTEN_ADDR"), get("PORT")) {
            (Some(address), _) => address.parse().map_err(|_| {
                ConfigError(format!(
                    "invalid LISTEN_ADDR {address:?}: expected an address and port such as [::]:8443 or 127.0.0.1:0"
                ))
            })?,
            (None, Some(port)) => {
                let port: u16 = port.parse().map_err(|_| {
                    ConfigError(format!("invalid PORT {port:?}: expected a number from 0 to 65535"))
                })?;
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
            }
            (None, None) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, DEFAULT_PORT)),
        };

        let tls = match (get("TLS_CERT_FILE"), get("TLS_KEY_FILE")) {
            (Some(cert), Some(key)) => TlsSource::Files {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
            },
            (None, None) => TlsSource::SelfSigned {
                hostnames: get("TLS_HOSTNAMES")
                    .map(|names| {
                        names
                            .split(',')
                            .map(str::trim)
                            .filter(|name| !name.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .filter(|names: &Vec<String>| !names.is_empty())
                    .unwrap_or_else(|| vec!["localhost".to_owned()]),
            },
            _ => {
                return Err(ConfigError(
                    "TLS_CERT_FILE and TLS_KEY_FILE must be set together; set both, or neither to generate a self-signed certificate".to_owned(),
                ));
            }
        };

        let identity_var = |name: &str| get(name).cloned().unwrap_or_else(|| "(unset)".to_owned());
        let identity = Identity {
            app: identity_var("KILN_APP"),
            env: identity_var("KILN_ENV"),
            release: identity_var("KILN_RELEASE"),
            instance: identity_var("KILN_INSTANCE"),
            secrets_dir: get("SECRETS_DIR")
                .map_or_else(|| PathBuf::from(DEFAULT_SECRETS_DIR), PathBuf::from),
        };

        Ok(Self {
            listen,
            tls,
            identity,
        })
    }
}

/// Secret names found in a directory, or why there are none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretNames {
    /// File names, sorted.
    Found(Vec<String>),
    /// The directory does not exist (the env has no secrets, or the app runs outside Kiln).
    NoDirectory,
    /// The directory could not be read.
    Unreadable(String),
}

/// Lists the secret file names in `dir`, sorted, without opening any file.
pub fn list_secret_names(dir: &Path) -> SecretNames {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return SecretNames::NoDirectory;
        }
        Err(error) => return SecretNames::Unreadable(error.to_string()),
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('.'))
        .collect();
    names.sort();
    SecretNames::Found(names)
}

impl Identity {
    /// Renders the plain-text response body.
    pub fn render(&self, secrets: &SecretNames) -> String {
        let mut body = String::new();
        let _ = writeln!(body, "Hello from Kiln!");
        let _ = writeln!(body, "app: {}", self.app);
        let _ = writeln!(body, "env: {}", self.env);
        let _ = writeln!(body, "release: {}", self.release);
        let _ = writeln!(body, "instance: {}", self.instance);
        let secrets = match secrets {
            SecretNames::Found(names) if names.is_empty() => "(none)".to_owned(),
            SecretNames::Found(names) => names.join(", "),
            SecretNames::NoDirectory => {
                format!("(none: {} does not exist)", self.secrets_dir.display())
            }
            SecretNames::Unreadable(error) => {
                format!("(unreadable: {}: {error})", self.secrets_dir.display())
            }
        };
        let _ = writeln!(body, "secrets: {secrets}");
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_listen_on_all_ipv6() {
        let config = Config::from_vars(&vars(&[])).unwrap();
        assert_eq!(config.listen, "[::]:8443".parse().unwrap());
        assert_eq!(
            config.tls,
            TlsSource::SelfSigned {
                hostnames: vec!["localhost".to_owned()]
            }
        );
        assert_eq!(config.identity.app, "(unset)");
        assert_eq!(
            config.identity.secrets_dir,
            PathBuf::from(DEFAULT_SECRETS_DIR)
        );
    }

    #[test]
    fn port_and_listen_addr() {
        let config = Config::from_vars(&vars(&[("PORT", "9000")])).unwrap();
        assert_eq!(config.listen, "[::]:9000".parse().unwrap());
        let config =
            Config::from_vars(&vars(&[("PORT", "9000"), ("LISTEN_ADDR", "127.0.0.1:0")])).unwrap();
        assert_eq!(config.listen, "127.0.0.1:0".parse().unwrap());

        let error = Config::from_vars(&vars(&[("PORT", "http")])).unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid PORT \"http\": expected a number from 0 to 65535"
        );
        let error = Config::from_vars(&vars(&[("LISTEN_ADDR", "localhost:80")])).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("invalid LISTEN_ADDR \"localhost:80\"")
        );
    }

    #[test]
    fn tls_files_need_both() {
        let error = Config::from_vars(&vars(&[("TLS_CERT_FILE", "/c.pem")])).unwrap_err();
        assert!(error.to_string().contains("must be set together"));
        let config = Config::from_vars(&vars(&[
            ("TLS_CERT_FILE", "/c.pem"),
            ("TLS_KEY_FILE", "/k.pem"),
        ]))
        .unwrap();
        assert!(matches!(config.tls, TlsSource::Files { .. }));
        let config =
            Config::from_vars(&vars(&[("TLS_HOSTNAMES", "a.example.com, b.example.com,")]))
                .unwrap();
        assert_eq!(
            config.tls,
            TlsSource::SelfSigned {
                hostnames: vec!["a.example.com".to_owned(), "b.example.com".to_owned()]
            }
        );
    }

    #[test]
    fn body_names_identity_and_secrets() {
        let config = Config::from_vars(&vars(&[
            ("KILN_APP", "hello"),
            ("KILN_ENV", "prod"),
            ("KILN_RELEASE", "v3"),
            ("KILN_INSTANCE", "inst_1"),
        ]))
        .unwrap();
        let body = config
            .identity
            .render(&SecretNames::Found(vec!["A".to_owned(), "B".to_owned()]));
        assert_eq!(
            body,
            "Hello from Kiln!\napp: hello\nenv: prod\nrelease: v3\ninstance: inst_1\nsecrets: A, B\n"
        );
        let body = config.identity.render(&SecretNames::NoDirectory);
        assert!(body.ends_with("secrets: (none: /run/kiln/secrets does not exist)\n"));
    }

    #[test]
    fn secret_names_sorted_without_values() {
        let dir = std::env::temp_dir().join(format!("hello-tls-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ZETA"), "value-z").unwrap();
        std::fs::write(dir.join("ALPHA"), "value-a").unwrap();
        std::fs::write(dir.join(".hidden"), "x").unwrap();
        assert_eq!(
            list_secret_names(&dir),
            SecretNames::Found(vec!["ALPHA".to_owned(), "ZETA".to_owned()])
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(list_secret_names(&dir), SecretNames::NoDirectory);
    }
}
