//! What every command needs: the global flags, the output policy, the config file and the
//! org, app and env the command acts on.
//!
//! The app comes from `--app`, then `KILN_APP`, then the `app` key of `./kiln.toml`, so a
//! developer in a project directory never has to name it.

use std::path::{Path, PathBuf};

use kiln_core::{AppName, EnvName, OrgName};

use crate::cli::GlobalArgs;
use crate::config::{self, ConfigFile, Overrides, Resolved};
use crate::error::{CliError, CliResult};
use crate::exit::ExitKind;
use crate::http::Http;
use crate::output::Output;

/// The manifest file read from the current directory.
pub(crate) const MANIFEST_FILE: &str = "kiln.toml";

/// State shared by every command of one `kiln` run.
#[derive(Debug)]
pub(crate) struct Session {
    /// The global flags.
    pub(crate) global: GlobalArgs,
    /// The printing policy.
    pub(crate) out: Output,
    config_path: PathBuf,
    config: ConfigFile,
    resolved: Resolved,
}

impl Session {
    /// Loads the config file and applies the precedence rules to the global flags.
    pub(crate) fn new(global: GlobalArgs) -> CliResult<Self> {
        let config_path = config::path()?;
        let config = ConfigFile::load(&config_path)?;
        if let Some(url) = &global.api_url {
            config::check_api_url(url).map_err(|reason| {
                CliError::usage(format!("invalid --api-url {url:?}: {reason}"))
                    .with_hint("pass a URL like https://kiln.example.com, or fix KILN_API_URL")
            })?;
        }
        let overrides = Overrides {
            context: global.context.clone(),
            api_url: global.api_url.clone(),
            token: std::env::var("KILN_TOKEN").ok().filter(|t| !t.is_empty()),
            org: global.org.clone(),
        };
        let resolved = config::resolve(&config, &overrides);
        Ok(Self {
            out: Output::new(global.json),
            global,
            config_path,
            config,
            resolved,
        })
    }

    /// The config file's path.
    pub(crate) fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The config file as loaded.
    pub(crate) fn config(&self) -> &ConfigFile {
        &self.config
    }

    /// The settings after precedence.
    pub(crate) fn resolved(&self) -> &Resolved {
        &self.resolved
    }

    /// A transport to the control plane, authenticated with the resolved token.
    pub(crate) fn api(&self) -> CliResult<Http> {
        let context = &self.resolved.context;
        if !self.resolved.stored && self.global.context.is_some() {
            let known: Vec<&str> = self.config.contexts.keys().map(String::as_str).collect();
            let known = if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            };
            return Err(CliError::new(
                ExitKind::NotFound,
                format!("context {context:?} not found"),
            )
            .with_hint(format!(
                "known contexts: {known}; run `kiln login --context {context} --api-url URL` \
                         to create it"
            )));
        }
        let Some(api_url) = &self.resolved.api_url else {
            return Err(CliError::new(
                ExitKind::Auth,
                format!("not logged in: context {context:?} has no API URL"),
            )
            .with_hint("run `kiln login --api-url URL`, or pass --api-url or set KILN_API_URL"));
        };
        let Some(token) = &self.resolved.token else {
            return Err(CliError::new(
                ExitKind::Auth,
                format!("not logged in: context {context:?} has no token"),
            )
            .with_hint("run `kiln login`, or set KILN_TOKEN"));
        };
        Http::new(api_url, Some(token.clone()), self.global.verbose)
    }

    /// The org to act in.
    pub(crate) fn org(&self) -> CliResult<OrgName> {
        let Some(org) = &self.resolved.org else {
            return Err(CliError::usage("no org given")
                .with_hint("pass --org, set KILN_ORG, or log in with `kiln login --org ORG`"));
        };
        OrgName::new(org.clone()).map_err(|error| {
            CliError::usage(error.to_string())
                .with_hint("check --org, KILN_ORG or the context's org")
        })
    }

    /// The app to act on: `--app`, `KILN_APP`, or `app` in ./kiln.toml.
    pub(crate) fn app(&self) -> CliResult<AppName> {
        self.app_from(Path::new(MANIFEST_FILE))
    }

    /// Like [`Session::app`], reading the manifest at `manifest` instead of ./kiln.toml.
    pub(crate) fn app_from(&self, manifest: &Path) -> CliResult<AppName> {
        if let Some(app) = &self.global.app {
            return AppName::new(app.clone()).map_err(|error| {
                CliError::usage(error.to_string()).with_hint("check --app or KILN_APP")
            });
        }
        if let Some(app) = app_in_manifest(manifest)? {
            return AppName::new(app).map_err(|error| {
                CliError::usage(error.to_string())
                    .with_hint(format!("fix `app` in {}", manifest.display()))
            });
        }
        Err(CliError::usage("no app given").with_hint(format!(
            "pass --app, set KILN_APP, or run in a directory with a {MANIFEST_FILE} that names it"
        )))
    }

    /// The environment to act on.
    pub(crate) fn env(&self) -> CliResult<EnvName> {
        let Some(env) = &self.global.env else {
            return Err(CliError::usage("no environment given")
                .with_hint("pass --env (for example --env prod) or set KILN_ENV"));
        };
        EnvName::new(env.clone()).map_err(|error| {
            CliError::usage(error.to_string()).with_hint("check --env or KILN_ENV")
        })
    }
}

/// Reads the top-level `app` key of the manifest at `path`, if the file exists.
///
/// Only the name is read here; `kiln deploy` validates the whole manifest.
fn app_in_manifest(path: &Path) -> CliResult<Option<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(
                CliError::failure(format!("cannot read {}", path.display())).with_source(error)
            );
        }
    };
    let table: toml::Table = toml::from_str(&text).map_err(|error| {
        CliError::failure(format!("invalid manifest {}", path.display()))
            .with_source(error)
            .with_hint("fix the file, or pass --app")
    })?;
    Ok(table.get("app").and_then(|v| v.as_str()).map(str::to_owned))
}
