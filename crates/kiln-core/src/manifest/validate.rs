//! Rules across tables (references between entries, ports, mount paths and hostnames, also
//! within each environment after its overrides) and the final build of a [`Manifest`].

use std::collections::BTreeMap;
use std::ops::Range;

use super::diagnostics::{Diagnostics, ErrorCode, Problem};
use super::environments::OverrideDraft;
use super::fields::Spanned;
use super::reader::{DeployDraft, Draft, VolumeDraft};
use super::schema::{
    DEFAULT_COUNT, DEFAULT_EXPECTED_STATUS, DEFAULT_HEALTH_GRACE, DEFAULT_HEALTH_INTERVAL,
    DEFAULT_HEALTH_TIMEOUT, DEFAULT_KILL_TIMEOUT, DEFAULT_MAX_SURGE, DEFAULT_MEMORY_MIB,
    DEFAULT_RELEASE_TIMEOUT, DEFAULT_STARTUP_TIMEOUT, DEFAULT_VCPUS, Deploy, EnvOverrides,
    HealthCheck, Manifest, MaxSurge, Probe, Process, Protocol, ReleaseCommand, Service,
    ServiceName, ServiceOverride, StartupScript, Volume, VolumeName,
};
use super::services::{HealthDraft, tcp_hostnames_problem};
use crate::names::{EnvName, Hostname, ProcessName};

/// Checks the rules that involve more than one table.
pub(super) fn check(draft: &Draft, diagnostics: &mut Diagnostics<'_>) {
    if let Some(span) = &draft.processes_span
        && draft.declared_processes.is_empty()
    {
        diagnostics.push(
            span.clone(),
            Problem {
                code: ErrorCode::MissingKey,
                key: "processes".to_owned(),
                message: "no process type is defined".to_owned(),
                help: "define at least one process type, such as [processes.web] with count = 1"
                    .to_owned(),
            },
        );
    }

    check_services(draft, diagnostics);
    check_volumes(draft, diagnostics);
    for script in &draft.startup {
        for (index, process) in script.processes.iter().enumerate() {
            let path = format!("{}.processes[{index}]", script.path);
            check_process_reference(draft, diagnostics, &path, process);
        }
    }
    for environment in &draft.environments {
        check_override_references(draft, environment, diagnostics);
    }
    check_environment_hostnames(draft, diagnostics);
}

fn check_process_reference(
    draft: &Draft,
    diagnostics: &mut Diagnostics<'_>,
    path: &str,
    reference: &Spanned<String>,
) {
    if draft.declared_processes.contains(&reference.value) {
        return;
    }
    diagnostics.push(
        reference.span.clone(),
        Problem {
            code: ErrorCode::UnknownReference,
            key: path.to_owned(),
            message: format!("no process type {:?} is defined", reference.value),
            help: format!(
                "use one of the process types under [processes]: {}",
                list_or_none(&draft.declared_processes)
            ),
        },
    );
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "(none defined)".to_owned()
    } else {
        names.join(", ")
    }
}

fn check_services(draft: &Draft, diagnostics: &mut Diagnostics<'_>) {
    let mut ports: BTreeMap<(&str, u16), &ServiceName> = BTreeMap::new();
    let mut hostnames: BTreeMap<&Hostname, &ServiceName> = BTreeMap::new();

    for service in &draft.services {
        if let Some(process) = &service.process {
            let path = format!("{}.process", service.path);
            check_process_reference(draft, diagnostics, &path, process);
        }

        if let (Some(process), Some(port)) = (&service.process, &service.port) {
            let key = (process.value.as_str(), port.value);
            if let Some(other) = ports.insert(key, &service.name.value) {
                diagnostics.push(
                    port.span.clone(),
                    Problem {
                        code: ErrorCode::Conflict,
                        key: format!("{}.port", service.path),
                        message: format!(
                            "port {} of process type `{}` is already used by service `{other}`",
                            port.value, process.value
                        ),
                        help: "each service needs its own port on its process type; change the port or merge the two services".to_owned(),
                    },
                );
            }
        }

        for entry in &service.hostnames {
            let Some(other) = hostnames.insert(&entry.hostname, &service.name.value) else {
                continue;
            };
            let message = if *other == service.name.value {
                format!("hostname `{}` is listed twice", entry.hostname)
            } else {
                format!(
                    "hostname `{}` is already claimed by service `{other}`",
                    entry.hostname
                )
            };
            diagnostics.push(
                entry.span.clone(),
                duplicate_hostname(entry.key.clone(), message),
            );
        }
    }
}

fn duplicate_hostname(key: String, message: String) -> Problem {
    Problem {
        code: ErrorCode::DuplicateHostname,
        key,
        message,
        help: "a hostname routes to exactly one service of one environment; remove the duplicate or give each its own hostname".to_owned(),
    }
}

/// Returns the process type a volume belongs to: its `process` key, or the only process type
/// when there is exactly one.
fn volume_process(draft: &Draft, volume: &VolumeDraft) -> Option<String> {
    match (&volume.process, draft.declared_processes.as_slice()) {
        (Some(process), _) => Some(process.value.clone()),
        (None, [only]) => Some(only.clone()),
        (None, _) => None,
    }
}

fn check_volumes(draft: &Draft, diagnostics: &mut Diagnostics<'_>) {
    let mut mounts: BTreeMap<(String, &str), &VolumeName> = BTreeMap::new();

    for volume in &draft.volumes {
        match &volume.process {
            Some(process) => {
                let path = format!("{}.process", volume.path_key);
                check_process_reference(draft, diagnostics, &path, process);
            }
            None if draft.declared_processes.len() > 1 => diagnostics.push(
                volume.anchor.clone(),
                Problem {
                    code: ErrorCode::MissingKey,
                    key: format!("{}.process", volume.path_key),
                    message: "missing required key `process`".to_owned(),
                    help: format!(
                        "the manifest has several process types ({}), so name the one that mounts this volume, such as process = \"{}\"",
                        draft.declared_processes.join(", "),
                        draft.declared_processes[0]
                    ),
                },
            ),
            None => {}
        }

        let (Some(process), Some(mount_path)) = (volume_process(draft, volume), &volume.mount_path)
        else {
            continue;
        };
        if let Some(other) = mounts.insert((process.clone(), &mount_path.value), &volume.name.value)
        {
            diagnostics.push(
                mount_path.span.clone(),
                Problem {
                    code: ErrorCode::Conflict,
                    key: format!("{}.path", volume.path_key),
                    message: format!(
                        "volume `{other}` is already mounted at {:?} in process type `{process}`",
                        mount_path.value
                    ),
                    help: "give each volume of a process type its own mount path".to_owned(),
                },
            );
        }
    }
}

fn check_override_references(
    draft: &Draft,
    environment: &OverrideDraft,
    diagnostics: &mut Diagnostics<'_>,
) {
    for process in &environment.processes {
        if !draft.declared_processes.contains(&process.name.value) {
            let problem = unknown_override(
                &process.name.value,
                &process.path,
                "process type",
                "processes",
                &draft.declared_processes,
            );
            diagnostics.push(process.name.span.clone(), problem);
        }
    }
    for volume in &environment.volumes {
        if !draft.declared_volumes.contains(&volume.name.value) {
            let problem = unknown_override(
                &volume.name.value,
                &volume.path,
                "volume",
                "volumes",
                &draft.declared_volumes,
            );
            diagnostics.push(volume.name.span.clone(), problem);
        }
    }
    for service in &environment.services {
        if !draft.declared_services.contains(&service.name.value) {
            let problem = unknown_override(
                &service.name.value,
                &service.path,
                "service",
                "services",
                &draft.declared_services,
            );
            diagnostics.push(service.name.span.clone(), problem);
            continue;
        }
        let base = draft
            .services
            .iter()
            .find(|base| base.name.value.as_str() == service.name.value);
        if let (Some(base), Some((span, hostnames))) = (base, &service.value.hostnames)
            && base.protocol == Protocol::Tcp
            && !hostnames.is_empty()
        {
            diagnostics.push(
                span.clone(),
                tcp_hostnames_problem(&format!("{}.hostnames", service.path)),
            );
        }
    }
}

fn unknown_override(
    name: &str,
    path: &str,
    kind: &str,
    table: &str,
    declared: &[String],
) -> Problem {
    Problem {
        code: ErrorCode::UnknownReference,
        key: path.to_owned(),
        message: format!("no {kind} {name:?} is defined in the base manifest"),
        help: format!(
            "overrides change entries defined under [{table}]; use one of: {}",
            list_or_none(declared)
        ),
    }
}

/// One hostname claim of a service in one environment.
struct Claim<'d> {
    service: &'d str,
    span: Range<usize>,
    key: String,
    /// True when the environment's override sets it, false when inherited from the base.
    overridden: bool,
}

/// Checks hostnames after each environment's overrides: no hostname twice within one
/// environment, and no hostname in two declared environments.
fn check_environment_hostnames(draft: &Draft, diagnostics: &mut Diagnostics<'_>) {
    let mut claims_by_hostname: BTreeMap<&Hostname, Vec<(&EnvName, Claim<'_>)>> = BTreeMap::new();

    for environment in &draft.environments {
        let env_name = &environment.name.value;
        let mut seen: BTreeMap<&Hostname, Claim<'_>> = BTreeMap::new();

        for service in &draft.services {
            let service_override = environment
                .services
                .iter()
                .find(|o| o.name.value == service.name.value.as_str());
            let (entries, overridden) =
                match service_override.and_then(|o| o.value.hostnames.as_ref()) {
                    Some((_, hostnames)) => (hostnames, true),
                    None => (&service.hostnames, false),
                };

            for entry in entries {
                let claim = Claim {
                    service: service.name.value.as_str(),
                    span: entry.span.clone(),
                    key: entry.key.clone(),
                    overridden,
                };
                if let Some(first) = seen.get(&entry.hostname) {
                    // Two inherited claims are a base duplicate, reported once already.
                    if first.overridden || claim.overridden {
                        diagnostics.push(
                            claim.span.clone(),
                            duplicate_hostname(
                                claim.key.clone(),
                                format!(
                                    "in environment `{env_name}`, hostname `{}` is claimed by service `{}` and by service `{}`",
                                    entry.hostname, first.service, claim.service
                                ),
                            ),
                        );
                    }
                    continue;
                }
                seen.insert(&entry.hostname, claim);
            }
        }

        for (hostname, claim) in seen {
            claims_by_hostname
                .entry(hostname)
                .or_default()
                .push((env_name, claim));
        }
    }

    for (hostname, claims) in claims_by_hostname {
        if claims.len() < 2 {
            continue;
        }
        let envs: Vec<String> = claims.iter().map(|(env, _)| format!("`{env}`")).collect();
        let envs = match envs.split_last() {
            Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
            None => String::new(),
        };
        let (_, at) = claims
            .iter()
            .find(|(_, claim)| claim.overridden)
            .unwrap_or(&claims[0]);
        diagnostics.push(
            at.span.clone(),
            Problem {
                code: ErrorCode::DuplicateHostname,
                key: at.key.clone(),
                message: format!(
                    "hostname `{hostname}` is claimed by environments {envs}"
                ),
                help: "a hostname routes to one environment; set hostnames per environment under [environments.NAME.services.SERVICE]".to_owned(),
            },
        );
    }
}

/// Builds the manifest from a draft that passed every check. Returns `None` when a required
/// value is missing, which the checks have reported already.
pub(super) fn build(draft: Draft) -> Option<Manifest> {
    let mut processes = BTreeMap::new();
    for process in &draft.processes {
        processes.insert(
            process.name.value.clone(),
            Process {
                command: process.command.clone(),
                count: process.count.unwrap_or(DEFAULT_COUNT),
                vcpus: process.vcpus.unwrap_or(DEFAULT_VCPUS),
                memory_mib: process.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
                kill_signal: process.kill_signal.unwrap_or_default(),
                kill_timeout: process.kill_timeout.unwrap_or(DEFAULT_KILL_TIMEOUT),
            },
        );
    }

    let mut services = BTreeMap::new();
    for service in &draft.services {
        let process = ProcessName::new(service.process.as_ref()?.value.clone()).ok()?;
        services.insert(
            service.name.value.clone(),
            Service {
                process,
                port: service.port.as_ref()?.value,
                protocol: service.protocol,
                hostnames: service
                    .hostnames
                    .iter()
                    .map(|entry| entry.hostname.clone())
                    .collect(),
                health: build_health(&service.health, service.protocol),
            },
        );
    }

    let mut volumes = BTreeMap::new();
    for volume in &draft.volumes {
        let process = ProcessName::new(volume_process(&draft, volume)?).ok()?;
        volumes.insert(
            volume.name.value.clone(),
            Volume {
                process,
                path: volume.mount_path.as_ref()?.value.clone(),
                size_mib: volume.size_mib?,
            },
        );
    }

    let mut startup = Vec::new();
    for script in &draft.startup {
        let processes = script
            .processes
            .iter()
            .map(|p| ProcessName::new(p.value.clone()).ok())
            .collect::<Option<Vec<_>>>()?;
        startup.push(StartupScript {
            command: script.command.clone()?,
            timeout: script.timeout.unwrap_or(DEFAULT_STARTUP_TIMEOUT),
            processes,
        });
    }

    let release_command = match &draft.release_command {
        Some(release) => Some(ReleaseCommand {
            command: release.command.clone()?,
            timeout: release.timeout.unwrap_or(DEFAULT_RELEASE_TIMEOUT),
            vcpus: release.vcpus.unwrap_or(DEFAULT_VCPUS),
            memory_mib: release.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
        }),
        None => None,
    };

    let mut environments = BTreeMap::new();
    for environment in &draft.environments {
        environments.insert(
            environment.name.value.clone(),
            build_overrides(environment)?,
        );
    }

    Some(Manifest {
        app: draft.app?,
        processes,
        services,
        env: draft.env,
        volumes,
        deploy: draft
            .deploy
            .as_ref()
            .map_or_else(Deploy::default, build_deploy),
        startup,
        release_command,
        environments,
    })
}

fn build_health(health: &HealthDraft, protocol: Protocol) -> HealthCheck {
    let probe = if health.http {
        Probe::Http {
            path: health.path.clone().unwrap_or_else(|| "/".to_owned()),
            expected_status: health.expected_status.unwrap_or(DEFAULT_EXPECTED_STATUS),
            tls: health.tls.unwrap_or(protocol == Protocol::Tls),
        }
    } else {
        Probe::Tcp
    };
    HealthCheck {
        probe,
        interval: health.interval.unwrap_or(DEFAULT_HEALTH_INTERVAL),
        timeout: health.timeout.unwrap_or(DEFAULT_HEALTH_TIMEOUT),
        grace_period: health.grace_period.unwrap_or(DEFAULT_HEALTH_GRACE),
    }
}

fn build_deploy(deploy: &DeployDraft) -> Deploy {
    if deploy.immediate {
        return Deploy::Immediate;
    }
    Deploy::Rolling {
        max_surge: deploy
            .max_surge
            .unwrap_or(MaxSurge::Instances(DEFAULT_MAX_SURGE)),
    }
}

fn build_overrides(environment: &OverrideDraft) -> Option<EnvOverrides> {
    let mut overrides = EnvOverrides {
        env: environment.env.clone(),
        deploy: environment.deploy.as_ref().map(build_deploy),
        ..EnvOverrides::default()
    };
    for process in &environment.processes {
        let name = ProcessName::new(process.name.value.clone()).ok()?;
        overrides.processes.insert(name, process.value.clone());
    }
    for service in &environment.services {
        let name = ServiceName::new(service.name.value.clone()).ok()?;
        let hostnames = service
            .value
            .hostnames
            .as_ref()
            .map(|(_, entries)| entries.iter().map(|entry| entry.hostname.clone()).collect());
        overrides
            .services
            .insert(name, ServiceOverride { hostnames });
    }
    for volume in &environment.volumes {
        let name = VolumeName::new(volume.name.value.clone()).ok()?;
        overrides.volumes.insert(name, volume.value.clone());
    }
    Some(overrides)
}
