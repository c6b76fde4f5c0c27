//! Reading kiln.toml for a deploy: parse and validate it locally, apply the environment's
//! overrides, and convert the result to the API's release spec.
//!
//! Validation happens before any network call, so a typo is reported with its file, line,
//! column and the offending text underlined, without a round trip.

use std::io::IsTerminal;
use std::path::Path;

use kiln_api::{
    DeployStrategy, HealthCheck, HealthCheckKind, ProcessSpec, ReleaseCommandLimits, ReleaseSpec,
    ServiceProtocol, ServiceSpec, StartupScript, VolumeSpec,
};
use kiln_core::manifest::{Deploy, Manifest, ManifestErrors, Probe, Protocol, ResolvedManifest};
use kiln_core::{AppName, EnvName};
use miette::{GraphicalReportHandler, GraphicalTheme, ThemeCharacters, ThemeStyles};

use crate::error::{CliError, CliResult};

/// The manifest of one environment, ready to send.
#[derive(Debug, Clone)]
pub(crate) struct LoadedManifest {
    /// The app the manifest names.
    pub(crate) app: AppName,
    /// The release spec for the environment.
    pub(crate) spec: ReleaseSpec,
}

/// Loads the manifest at `path` and resolves it for `env`.
pub(crate) fn load(path: &Path, env: &EnvName) -> CliResult<LoadedManifest> {
    let source = std::fs::read_to_string(path).map_err(|error| {
        let hint = if error.kind() == std::io::ErrorKind::NotFound {
            "run `kiln init` to create one, or pass --config PATH"
        } else {
            "check the file's permissions, or pass --config PATH"
        };
        CliError::failure(format!("cannot read manifest {}", path.display()))
            .with_source(error)
            .with_hint(hint)
    })?;

    let manifest =
        Manifest::parse_named(&path.display().to_string(), &source).map_err(|errors| {
            CliError::failure(errors.to_string())
                .with_detail(render(&errors))
                .with_hint("fix the marked values; docs/manifest.md describes every key")
        })?;

    let resolved = manifest.resolve(env);
    Ok(LoadedManifest {
        app: resolved.app.clone(),
        spec: release_spec(&resolved),
    })
}

/// Renders every error with the offending text underlined: in colour on a terminal, in
/// plain ASCII otherwise (CI logs, `NO_COLOR`).
fn render(errors: &ManifestErrors) -> String {
    let color = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let theme = if color {
        GraphicalTheme::unicode()
    } else {
        GraphicalTheme {
            characters: ThemeCharacters::ascii(),
            styles: ThemeStyles::none(),
        }
    };
    let handler = GraphicalReportHandler::new_themed(theme).with_width(100);
    let mut text = String::new();
    if handler.render_report(&mut text, errors).is_err() {
        // The graphical report failed to format; the plain form carries the same facts.
        return errors.render_plain();
    }
    without_headline(&text, &errors.to_string())
}

/// Removes the report's first line when it repeats `headline`, which the CLI already printed
/// as the error message.
fn without_headline(report: &str, headline: &str) -> String {
    let mut lines = report.lines().skip_while(|line| line.trim().is_empty());
    match lines.next() {
        Some(first) if first.contains(headline) => {
            let rest: Vec<&str> = lines.skip_while(|line| line.trim().is_empty()).collect();
            rest.join("\n")
        }
        _ => report.to_owned(),
    }
}

/// Converts a resolved manifest to the API's release spec.
fn release_spec(manifest: &ResolvedManifest) -> ReleaseSpec {
    let processes = manifest
        .processes
        .iter()
        .map(|(name, process)| {
            let spec = ProcessSpec {
                command: process.command.clone().unwrap_or_default(),
                count: process.count,
                vcpus: process.vcpus,
                memory_mib: process.memory_mib,
                kill_signal: Some(process.kill_signal.as_str().to_owned()),
                kill_timeout_secs: Some(whole_secs(process.kill_timeout)),
            };
            (name.clone(), spec)
        })
        .collect();

    let services = manifest
        .services
        .iter()
        .map(|(name, service)| ServiceSpec {
            name: name.to_string(),
            process: service.process.clone(),
            internal_port: service.port,
            protocol: match service.protocol {
                Protocol::Tls => ServiceProtocol::Tls,
                Protocol::Tcp => ServiceProtocol::Tcp,
            },
            hostnames: service.hostnames.clone(),
            proxy_protocol: false,
            health_check: Some(HealthCheck {
                kind: match &service.health.probe {
                    Probe::Tcp => HealthCheckKind::Tcp,
                    Probe::Http {
                        path,
                        expected_status,
                        tls,
                    } => HealthCheckKind::Http {
                        path: path.clone(),
                        expected_status: Some(*expected_status),
                        tls: *tls,
                    },
                },
                interval_secs: whole_secs(service.health.interval),
                timeout_secs: whole_secs(service.health.timeout),
                grace_period_secs: whole_secs(service.health.grace_period),
            }),
        })
        .collect();

    let volumes = manifest
        .volumes
        .iter()
        .map(|(name, volume)| VolumeSpec {
            name: name.to_string(),
            mount_path: volume.path.clone(),
            size_mib: volume.size_mib,
        })
        .collect();

    let largest_count = manifest
        .processes
        .values()
        .map(|p| p.count)
        .max()
        .unwrap_or(1);
    let (strategy, max_surge) = match manifest.deploy {
        Deploy::Rolling { max_surge } => (
            DeployStrategy::Rolling,
            max_surge.instances_for(largest_count),
        ),
        Deploy::Immediate => (DeployStrategy::Immediate, 1),
    };

    // Each process type sends its own kill signal and timeout. The release-wide ones (the
    // first process type's signal, the longest timeout) are for servers that predate them.
    // TODO(correctness): the API's VolumeSpec has no process type, so the release does not say
    // which process type a manifest volume belongs to (agents do not mount volumes yet).
    let kill_signal = manifest.processes.values().next().map_or_else(
        || "SIGTERM".to_owned(),
        |p| p.kill_signal.as_str().to_owned(),
    );
    let kill_timeout_secs = manifest
        .processes
        .values()
        .map(|p| whole_secs(p.kill_timeout))
        .max()
        .unwrap_or(30);

    ReleaseSpec {
        processes,
        services,
        env: manifest.env.clone(),
        volumes,
        strategy,
        max_surge,
        kill_signal,
        kill_timeout_secs,
        startup_scripts: manifest
            .startup
            .iter()
            .map(|script| StartupScript {
                command: shell_command(&script.command),
                timeout_secs: Some(whole_secs(script.timeout)),
                processes: script.processes.clone(),
            })
            .collect(),
        release_command: manifest.release_command.as_ref().map(|r| r.command.clone()),
        release_command_limits: manifest.release_command.as_ref().map(|release| {
            ReleaseCommandLimits {
                timeout_secs: u64::from(whole_secs(release.timeout)),
                vcpus: release.vcpus,
                memory_mib: release.memory_mib,
            }
        }),
    }
}

/// Joins `argv` into one command line that `/bin/sh -c` (how kiln-init runs a startup script)
/// splits back into exactly `argv`, running `argv[0]` as the command.
fn shell_command(argv: &[String]) -> String {
    argv.iter()
        .enumerate()
        .map(|(index, arg)| shell_quote(arg, index == 0))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes `arg` unless the shell reads it as it is. A command word is quoted unless it is a
/// path, because a bare word there may be a reserved word (`if`) or an assignment (`A=b`).
fn shell_quote(arg: &str, command: bool) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    let path = |c: char| c.is_ascii_alphanumeric() || "_./-".contains(c);
    let safe = if command {
        arg.contains('/') && arg.chars().all(path)
    } else {
        !arg.is_empty() && arg.chars().all(plain)
    };
    if safe {
        return arg.to_owned();
    }
    // Inside single quotes nothing is special except the closing quote, which is written as
    // quote, escaped quote, quote.
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// Seconds, rounded up so a sub-second value never becomes 0.
fn whole_secs(duration: std::time::Duration) -> u32 {
    let secs = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_scripts_keep_timeout_and_processes() {
        let source = r#"app = "shop"

[processes.web]
command = ["/app/web"]

[processes.worker]
command = ["/app/worker"]

[[startup]]
command = ["/bin/sh", "-c", "ulimit -n 65536"]
timeout = "2m"
processes = ["worker"]
"#;
        let manifest = Manifest::parse_named("kiln.toml", source).unwrap();
        let spec = release_spec(&manifest.resolve(&EnvName::new("prod").unwrap()));
        assert_eq!(
            spec.startup_scripts,
            [StartupScript {
                command: "/bin/sh -c 'ulimit -n 65536'".to_owned(),
                timeout_secs: Some(120),
                processes: vec![kiln_core::ProcessName::new("worker").unwrap()],
            }]
        );
    }

    #[test]
    fn http_health_check_keeps_status_and_tls() {
        let source = r#"app = "shop"

[processes.web]
command = ["/app/web"]

[services.https]
process = "web"
port = 8443
protocol = "tls"

[services.https.health]
type = "http"
path = "/healthz"
expected_status = 204
"#;
        let manifest = Manifest::parse_named("kiln.toml", source).unwrap();
        let spec = release_spec(&manifest.resolve(&EnvName::new("prod").unwrap()));
        let check = spec.services[0].health_check.clone().unwrap();
        assert_eq!(
            check.kind,
            HealthCheckKind::Http {
                path: "/healthz".to_owned(),
                expected_status: Some(204),
                tls: true,
            }
        );
    }

    #[test]
    fn init_template_is_valid() {
        let app = AppName::new("web").unwrap();
        let text = crate::commands::init::template(&app, Some("127.0.0.1:5000/web:1"));

        let manifest = Manifest::parse(&text).unwrap_or_else(|e| panic!("{}", e.render_plain()));
        let spec = release_spec(&manifest.resolve(&EnvName::new("prod").unwrap()));

        assert_eq!(manifest.app, app);
        assert_eq!(spec.processes.len(), 1);
        assert_eq!(spec.services.len(), 1);
        assert_eq!(spec.services[0].internal_port, 8443);
        assert_eq!(spec.strategy, DeployStrategy::Rolling);
    }

    #[test]
    fn shell_command_round_trips_through_sh() {
        let cases: &[&[&str]] = &[
            &["/app/bin/fetch-geoip"],
            &["/bin/sh", "-c", "ulimit -n 65536"],
            &[
                "echo",
                "it's",
                "",
                "$HOME",
                "a\\b",
                "*",
                "two  spaces",
                "new\nline",
            ],
        ];
        for argv in cases {
            let argv: Vec<String> = argv.iter().map(|arg| (*arg).to_owned()).collect();
            let line = shell_command(&argv);
            let output = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(format!(
                    "for arg in {line}; do printf '%s\\0' \"$arg\"; done"
                ))
                .output()
                .unwrap();
            let parsed: Vec<String> = String::from_utf8(output.stdout)
                .unwrap()
                .split_terminator('\0')
                .map(str::to_owned)
                .collect();
            assert_eq!(parsed, argv, "{line}");
        }
    }

    #[test]
    fn shell_command_runs_argv0_as_the_command() {
        // Run as the command itself: a bare `printf` is quoted and still found on PATH.
        let argv = ["printf", "[%s]", "a b", "if", "A=b"].map(str::to_owned);
        let output = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(shell_command(&argv))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(output.stdout).unwrap(), "[a b][if][A=b]");

        assert_eq!(shell_command(&["if".to_owned()]), "'if'");
        assert_eq!(shell_command(&["A=b".to_owned()]), "'A=b'");
        assert_eq!(shell_command(&["/usr/bin/env".to_owned()]), "/usr/bin/env");
    }

    #[test]
    fn shell_command_leaves_plain_arguments_alone() {
        let argv = ["/bin/sh", "-c", "ulimit -n 65536"].map(str::to_owned);
        assert_eq!(shell_command(&argv), "/bin/sh -c 'ulimit -n 65536'");
    }

    #[test]
    fn whole_secs_rounds_up() {
        assert_eq!(whole_secs(std::time::Duration::from_millis(1500)), 2);
        assert_eq!(whole_secs(std::time::Duration::from_secs(10)), 10);
        assert_eq!(whole_secs(std::time::Duration::ZERO), 0);
    }
}
