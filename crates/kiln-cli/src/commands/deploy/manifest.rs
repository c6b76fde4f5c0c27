//! Reading kiln.toml for a deploy: parse, validate, apply the environment's overrides, and
//! convert to the API's release spec.

use std::path::Path;

use kiln_api::ReleaseSpec;
use kiln_core::{AppName, EnvName};

use crate::error::{CliError, CliResult};

/// The manifest of one environment, ready to send.
#[derive(Debug, Clone)]
pub(crate) struct LoadedManifest {
    /// The app the manifest names.
    pub(crate) app: AppName,
    /// The release spec for the environment.
    pub(crate) spec: ReleaseSpec,
}

/// Loads the manifest at `path` for `env`.
pub(crate) fn load(path: &Path, env: &EnvName) -> CliResult<LoadedManifest> {
    Err(CliError::failure(format!(
        "cannot deploy {} to {env}: manifest validation is not built yet",
        path.display()
    )))
}
