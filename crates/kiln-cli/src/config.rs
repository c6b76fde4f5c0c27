//! The CLI's config file: named contexts, each an API URL, a token and a default org.
//!
//! The file lives at `$XDG_CONFIG_HOME/kiln/config.toml` (`~/.config/kiln/config.toml` when
//! `XDG_CONFIG_HOME` is unset). It holds API tokens, so it is always written with mode 0600
//! in a directory of mode 0700, through a temporary file and a rename so a crash never leaves
//! half a file.
//!
//! Precedence, lowest first: the context in the file (`--context`, `KILN_CONTEXT`, or the
//! file's `current_context`), then `KILN_API_URL`, `KILN_TOKEN` and `KILN_ORG`, then flags.
//! [`resolve`] is the one place that applies it.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{CliError, CliResult};

/// Name of the context used when none is named and the file sets none.
pub(crate) const DEFAULT_CONTEXT: &str = "default";

/// The config file as stored.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfigFile {
    /// The context used when `--context` and `KILN_CONTEXT` are not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) current_context: Option<String>,
    /// Contexts by name.
    #[serde(default)]
    pub(crate) contexts: BTreeMap<String, Context>,
}

/// One named context: which control plane to talk to, as whom, and for which org.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Context {
    /// Base URL of kiln-control's API, such as `https://kiln.example.com`.
    pub(crate) api_url: String,
    /// The API token; absent after `kiln logout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) token: Option<String>,
    /// The org used when `--org` and `KILN_ORG` are not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) org: Option<String>,
}

/// Returns the config file's path from `XDG_CONFIG_HOME` or `HOME`.
pub(crate) fn path() -> CliResult<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("kiln").join("config.toml"));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(home)
            .join(".config")
            .join("kiln")
            .join("config.toml"));
    }
    Err(
        CliError::failure("cannot locate the config file: neither XDG_CONFIG_HOME nor HOME is set")
            .with_hint("set XDG_CONFIG_HOME to a directory kiln may write to"),
    )
}

impl ConfigFile {
    /// Reads the file at `path`; a missing file is an empty config.
    pub(crate) fn load(path: &Path) -> CliResult<Self> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default());
            }
            Err(error) => {
                return Err(CliError::failure(format!(
                    "cannot read config file {}",
                    path.display()
                ))
                .with_source(error));
            }
        };
        toml::from_str(&text).map_err(|error| {
            CliError::failure(format!("invalid config file {}", path.display()))
                .with_source(error)
                .with_hint("fix the file, or remove it and run `kiln login` again")
        })
    }

    /// Writes the file atomically with mode 0600, creating its directory with mode 0700.
    pub(crate) fn save(&self, path: &Path) -> CliResult<()> {
        let write_failed = |error: std::io::Error| {
            CliError::failure(format!("cannot write config file {}", path.display()))
                .with_source(error)
        };
        let text = toml::to_string_pretty(self).map_err(|error| {
            CliError::failure("cannot encode the config file").with_source(error)
        })?;

        let dir = path.parent().unwrap_or(Path::new("."));
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(write_failed)?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(write_failed)?;
        }

        let temporary = path.with_extension(format!("toml.tmp{}", std::process::id()));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(write_failed)?;
        // The mode given to open() is masked by the umask and ignored for an existing file,
        // so set it explicitly before any token is written.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(write_failed)?;
        file.write_all(b"# Written by `kiln login`; holds API tokens, keep it private.\n")
            .and_then(|()| file.write_all(text.as_bytes()))
            .and_then(|()| file.sync_all())
            .map_err(write_failed)?;
        fs::rename(&temporary, path).map_err(write_failed)?;
        Ok(())
    }

    /// The name of the context to use: `requested` (from `--context` or `KILN_CONTEXT`), else
    /// the file's current context, else `default`.
    pub(crate) fn context_name(&self, requested: Option<&str>) -> String {
        requested
            .map(str::to_owned)
            .or_else(|| self.current_context.clone())
            .unwrap_or_else(|| DEFAULT_CONTEXT.to_owned())
    }
}

/// Connection settings after applying the precedence rules.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    /// The context's name.
    pub(crate) context: String,
    /// Whether the file has a context of that name.
    pub(crate) stored: bool,
    /// The API base URL, if any source set one.
    pub(crate) api_url: Option<String>,
    /// The token, if any source set one.
    pub(crate) token: Option<String>,
    /// The org, if any source set one.
    pub(crate) org: Option<String>,
}

/// Values given on the command line or in the environment (clap reads both).
#[derive(Debug, Clone, Default)]
pub(crate) struct Overrides {
    /// `--context` / `KILN_CONTEXT`.
    pub(crate) context: Option<String>,
    /// `--api-url` / `KILN_API_URL`.
    pub(crate) api_url: Option<String>,
    /// `KILN_TOKEN`.
    pub(crate) token: Option<String>,
    /// `--org` / `KILN_ORG`.
    pub(crate) org: Option<String>,
}

/// Checks that `url` can be an API base URL: `http` or `https`, a host, and no query or
/// fragment, which would corrupt every request path appended to it.
pub(crate) fn check_api_url(url: &str) -> Result<(), String> {
    let expected = "expected http(s)://HOST[:PORT]";
    let parsed = reqwest::Url::parse(url).map_err(|error| format!("{expected} ({error})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{expected}, not scheme {}", parsed.scheme()));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{expected} (the host is missing)"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!("{expected} without a query or fragment"));
    }
    Ok(())
}

/// Applies the precedence rules: overrides win over the named context in `file`.
pub(crate) fn resolve(file: &ConfigFile, overrides: &Overrides) -> Resolved {
    let name = file.context_name(overrides.context.as_deref());
    let stored = file.contexts.get(&name);

    Resolved {
        stored: stored.is_some(),
        context: name,
        api_url: overrides
            .api_url
            .clone()
            .or_else(|| stored.map(|c| c.api_url.clone())),
        token: overrides
            .token
            .clone()
            .or_else(|| stored.and_then(|c| c.token.clone())),
        org: overrides
            .org
            .clone()
            .or_else(|| stored.and_then(|c| c.org.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_url_check() {
        assert!(check_api_url("https://kiln.example.com").is_ok());
        assert!(check_api_url("http://127.0.0.1:8080/").is_ok());
        assert!(check_api_url("not a url").is_err());
        assert!(check_api_url("127.0.0.1:8080").is_err());
        assert!(check_api_url("ftp://kiln.example.com").is_err());
        assert!(check_api_url("https://kiln.example.com/?x=1").is_err());
    }

    fn sample() -> ConfigFile {
        let mut file = ConfigFile {
            current_context: Some("prod".into()),
            ..ConfigFile::default()
        };
        file.contexts.insert(
            "prod".into(),
            Context {
                api_url: "https://kiln.example".into(),
                token: Some("file-token".into()),
                org: Some("acme".into()),
            },
        );
        file
    }

    #[test]
    fn save_writes_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln").join("config.toml");

        sample().save(&path).unwrap();

        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        assert_eq!(ConfigFile::load(&path).unwrap(), sample());
    }

    #[test]
    fn save_tightens_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        fs::write(&path, "").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();

        sample().save(&path).unwrap();

        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn load_rejects_unknown_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        fs::write(&path, "[contexts.a]\napi_url = \"x\"\ntokn = \"t\"\n").unwrap();

        let error = ConfigFile::load(&path).unwrap_err();

        assert!(
            error.to_string().contains("unknown field `tokn`"),
            "{error}"
        );
    }

    #[test]
    fn resolve_prefers_overrides() {
        let overrides = Overrides {
            token: Some("env-token".into()),
            org: Some("other".into()),
            ..Overrides::default()
        };

        let resolved = resolve(&sample(), &overrides);

        assert_eq!(resolved.context, "prod");
        assert_eq!(resolved.api_url.as_deref(), Some("https://kiln.example"));
        assert_eq!(resolved.token.as_deref(), Some("env-token"));
        assert_eq!(resolved.org.as_deref(), Some("other"));
    }

    #[test]
    fn resolve_unknown_context_is_empty() {
        let overrides = Overrides {
            context: Some("staging".into()),
            ..Overrides::default()
        };

        let resolved = resolve(&sample(), &overrides);

        assert!(!resolved.stored);
        assert_eq!(resolved.api_url, None);
        assert_eq!(resolved.token, None);
    }
}
