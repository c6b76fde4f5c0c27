//! `kiln init`: write a commented kiln.toml to start from.

use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_core::AppName;
use serde_json::json;

use crate::error::{CliError, CliResult};
use crate::registry::ImageRef;
use crate::session::{MANIFEST_FILE, Session};

/// Arguments of `kiln init`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  kiln init
  kiln init --name web --image registry.example.com/web:1.0")]
pub(crate) struct Args {
    /// Image the app is deployed from; written into the deploy command in the file's comments
    #[arg(long, value_name = "REF")]
    image: Option<String>,

    /// App name [default: --app, KILN_APP, or the current directory's name]
    #[arg(long)]
    name: Option<String>,

    /// Where to write the manifest
    #[arg(long, value_name = "PATH", default_value = MANIFEST_FILE)]
    output: PathBuf,

    /// Overwrite an existing file
    #[arg(long)]
    force: bool,
}

/// Writes the manifest.
pub(crate) fn run(session: &mut Session, args: Args) -> CliResult {
    let name = app_name(session, &args)?;
    if let Some(image) = &args.image {
        ImageRef::parse(image).map_err(|error| {
            CliError::usage(format!("invalid --image {image:?}"))
                .with_source(error)
                .with_hint("write it as [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]")
        })?;
    }
    let text = template(&name, args.image.as_deref());

    write_new(&args.output, &text, args.force)?;

    if session.out.is_json() {
        return session
            .out
            .json(&json!({ "path": args.output, "app": name }));
    }
    session
        .out
        .line(&format!("Wrote {} for app {name}", args.output.display()))?;
    let image = args.image.as_deref().unwrap_or("REF");
    session.out.note(&format!(
        "Next: kiln apps create {name} && kiln envs create prod && kiln deploy --env prod --image {image}"
    ));
    Ok(())
}

fn app_name(session: &Session, args: &Args) -> CliResult<AppName> {
    let explicit = args.name.clone().or_else(|| session.global.app.clone());
    if let Some(name) = explicit {
        return AppName::new(name).map_err(|error| {
            CliError::usage(error.to_string()).with_hint("pass --name with a valid app name")
        });
    }
    let directory = std::env::current_dir()
        .ok()
        .and_then(|dir| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    AppName::new(directory.to_ascii_lowercase().replace(['_', ' ', '.'], "-")).map_err(|error| {
        CliError::usage(format!(
            "cannot use the directory name {directory:?} as the app name"
        ))
        .with_source(error)
        .with_hint("pass --name NAME")
    })
}

/// Creates `path` with `text`, refusing to replace a file unless `force`.
fn write_new(path: &Path, text: &str, force: bool) -> CliResult {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::AlreadyExists {
            CliError::usage(format!("{} already exists", path.display()))
                .with_hint("pass --force to overwrite it, or --output PATH to write elsewhere")
        } else {
            CliError::failure(format!("cannot create {}", path.display())).with_source(error)
        }
    })?;
    file.write_all(text.as_bytes()).map_err(|error| {
        CliError::failure(format!("cannot write {}", path.display())).with_source(error)
    })
}

/// The manifest `kiln init` writes: every section, with the defaults spelled out.
pub(crate) fn template(app: &AppName, image: Option<&str>) -> String {
    let image = image.unwrap_or("REGISTRY/REPOSITORY:TAG");
    format!(
        r#"# kiln.toml: how Kiln runs this app. The reference of every key is docs/manifest.md.
#
# Deploy with:
#   kiln deploy --env prod --image {image}
# The image tag is resolved to a digest at deploy time, so a release never changes under you.

# The app this file deploys (lowercase letters, digits and '-').
app = "{app}"

# Process types: each runs in its own microVMs.
[processes.web]
# The command to run; without it the image's entrypoint and cmd run.
# command = ["/app/server", "--port", "8443"]
count = 2           # instances
vcpus = 1           # virtual CPUs per instance
memory = "512MiB"   # memory per instance
# kill_signal = "SIGTERM"
# kill_timeout = "30s"

# Services: ports of a process type that the ingress routes to. With protocol = "tls"
# connections are routed by SNI and your process terminates TLS itself; "tcp" gets a
# dedicated IPv6 address.
[services.https]
process = "web"
port = 8443
protocol = "tls"
# hostnames = ["www.example.com"]

# How Kiln decides an instance is healthy before moving traffic to it.
[services.https.health]
type = "tcp"
interval = "10s"
timeout = "2s"
grace_period = "30s"

# Environment variables for every process type. Put secrets in `kiln secrets set`, not here.
[env]
# LOG_LEVEL = "info"

# How a deploy replaces old instances: "rolling" (start new, wait healthy, move traffic,
# drain old) or "immediate".
[deploy]
strategy = "rolling"
max_surge = 1

# Per-environment overrides, for example fewer instances in staging:
# [environments.staging.processes.web]
# count = 1
"#
    )
}
