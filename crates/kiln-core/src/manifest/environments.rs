//! Per-environment overrides (`[environments.staging]`) and the resolution of one
//! environment's effective manifest.
//!
//! An override may change only what differs between environments of one app: instance
//! counts and sizes, hostnames, environment variables, volume sizes and the deploy strategy.
//! Commands, ports and health checks stay the same in every environment, so a release that
//! passed staging runs the same program in production.

use std::collections::BTreeMap;
use std::ops::Range;

use super::diagnostics::{Diagnostics, ErrorCode, Problem};
use super::fields::{Field, Spanned, TableRef, table};
use super::reader::{
    DeployDraft, named_entries, read_count, read_deploy, read_env, read_memory, read_vcpus,
    read_volume_size,
};
use super::schema::{
    EnvOverrides, Manifest, ProcessOverride, ResolvedManifest, Service, VolumeOverride,
};
use super::services::{HostnameEntry, read_hostnames};
use crate::names::EnvName;

const ENV_KEYS: &[&str] = &["processes", "services", "env", "volumes", "deploy"];
const ENV_FIXED_KEYS: &[&str] = &["app", "startup", "release_command", "environments"];
const PROCESS_KEYS: &[&str] = &["count", "vcpus", "memory"];
const PROCESS_FIXED_KEYS: &[&str] = &["command", "kill_signal", "kill_timeout"];
const SERVICE_KEYS: &[&str] = &["hostnames"];
const SERVICE_FIXED_KEYS: &[&str] = &["process", "port", "protocol", "health"];
const VOLUME_KEYS: &[&str] = &["size"];
const VOLUME_FIXED_KEYS: &[&str] = &["process", "path"];

/// One environment's overrides as read, before the references are checked.
pub(super) struct OverrideDraft {
    pub(super) name: Spanned<EnvName>,
    pub(super) processes: Vec<NamedOverride<ProcessOverride>>,
    pub(super) services: Vec<NamedOverride<ServiceOverrideDraft>>,
    pub(super) env: BTreeMap<String, String>,
    pub(super) volumes: Vec<NamedOverride<VolumeOverride>>,
    pub(super) deploy: Option<DeployDraft>,
}

/// An override of one named entry of the base (a process type, service or volume).
pub(super) struct NamedOverride<T> {
    /// The entry's name as written, checked against the base in `validate`.
    pub(super) name: Spanned<String>,
    pub(super) path: String,
    pub(super) value: T,
}

pub(super) struct ServiceOverrideDraft {
    /// The hostnames and the span of the `hostnames` key, when set.
    pub(super) hostnames: Option<(Range<usize>, Vec<HostnameEntry>)>,
}

/// Reads `[environments]`: one table of overrides per environment name.
pub(super) fn read_environments(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
) -> Vec<OverrideDraft> {
    const HELP: &str = "define environments as tables, such as [environments.staging]";
    let Some(environments) = table(diagnostics, field, HELP) else {
        return Vec::new();
    };

    let (entries, _) = named_entries(diagnostics, &environments, EnvName::new);
    let mut drafts = Vec::new();
    for (name, entry) in entries {
        let Some(overrides) = table(diagnostics, &entry, HELP) else {
            continue;
        };
        reject_fixed(diagnostics, &overrides, ENV_KEYS, ENV_FIXED_KEYS);

        let mut draft = OverrideDraft {
            name,
            processes: Vec::new(),
            services: Vec::new(),
            env: BTreeMap::new(),
            volumes: Vec::new(),
            deploy: None,
        };
        if let Some(field) = overrides.get("processes") {
            draft.processes = read_named(
                diagnostics,
                &field,
                PROCESS_KEYS,
                PROCESS_FIXED_KEYS,
                read_process,
            );
        }
        if let Some(field) = overrides.get("services") {
            draft.services = read_named(
                diagnostics,
                &field,
                SERVICE_KEYS,
                SERVICE_FIXED_KEYS,
                read_service,
            );
        }
        if let Some(field) = overrides.get("env") {
            draft.env = read_env(diagnostics, &field);
        }
        if let Some(field) = overrides.get("volumes") {
            draft.volumes = read_named(
                diagnostics,
                &field,
                VOLUME_KEYS,
                VOLUME_FIXED_KEYS,
                read_volume,
            );
        }
        if let Some(field) = overrides.get("deploy") {
            draft.deploy = read_deploy(diagnostics, &field);
        }
        drafts.push(draft);
    }
    drafts
}

/// Reads a table of named overrides, such as `[environments.staging.processes.web]`.
fn read_named<T>(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
    allowed: &[&str],
    fixed: &[&str],
    read: fn(&mut Diagnostics<'_>, &TableRef<'_>) -> T,
) -> Vec<NamedOverride<T>> {
    let help = format!(
        "define overrides as tables of names, such as [{}.NAME] with {}",
        field.path,
        allowed.join(", ")
    );
    let Some(entries) = table(diagnostics, field, &help) else {
        return Vec::new();
    };

    let mut overrides = Vec::new();
    for entry in entries.fields() {
        let Some(inner) = table(diagnostics, &entry, &help) else {
            continue;
        };
        reject_fixed(diagnostics, &inner, allowed, fixed);
        overrides.push(NamedOverride {
            name: Spanned {
                value: entry.key.to_owned(),
                span: entry.key_span.clone(),
            },
            path: entry.path.clone(),
            value: read(diagnostics, &inner),
        });
    }
    overrides
}

/// Reports unknown keys, with a specific message for keys that exist in the base but are
/// the same in every environment.
fn reject_fixed(
    diagnostics: &mut Diagnostics<'_>,
    table: &TableRef<'_>,
    allowed: &[&str],
    fixed: &[&str],
) {
    for field in table.fields() {
        if !fixed.contains(&field.key) {
            continue;
        }
        diagnostics.push(
            field.key_span.clone(),
            Problem {
                code: ErrorCode::UnknownKey,
                key: field.path.clone(),
                message: format!("`{}` cannot be set per environment", field.key),
                help: format!(
                    "every environment shares the base value, so a release behaves the same in each; set it outside [environments], and here set only: {}",
                    allowed.join(", ")
                ),
            },
        );
    }

    table.reject_unknown_except(diagnostics, allowed, fixed);
}

fn read_process(diagnostics: &mut Diagnostics<'_>, table: &TableRef<'_>) -> ProcessOverride {
    ProcessOverride {
        count: table
            .get("count")
            .and_then(|field| read_count(diagnostics, &field)),
        vcpus: table
            .get("vcpus")
            .and_then(|field| read_vcpus(diagnostics, &field)),
        memory_mib: table
            .get("memory")
            .and_then(|field| read_memory(diagnostics, &field)),
    }
}

fn read_service(diagnostics: &mut Diagnostics<'_>, table: &TableRef<'_>) -> ServiceOverrideDraft {
    ServiceOverrideDraft {
        hostnames: table.get("hostnames").map(|field| {
            let hostnames = read_hostnames(diagnostics, &field);
            (field.value_span(), hostnames)
        }),
    }
}

fn read_volume(diagnostics: &mut Diagnostics<'_>, table: &TableRef<'_>) -> VolumeOverride {
    VolumeOverride {
        size_mib: table
            .get("size")
            .and_then(|field| read_volume_size(diagnostics, &field)),
    }
}

impl Manifest {
    /// Returns the effective manifest of `environment`: the base with that environment's
    /// overrides applied. An environment without an `[environments]` entry gets the base.
    ///
    /// Environment variables merge (the environment's value wins); hostnames and the deploy
    /// strategy replace the base values as a whole; counts and sizes replace per key.
    pub fn resolve(&self, environment: &EnvName) -> ResolvedManifest {
        let empty = EnvOverrides::default();
        let overrides = self.environments.get(environment).unwrap_or(&empty);

        let mut processes = self.processes.clone();
        for (name, process_override) in &overrides.processes {
            let Some(process) = processes.get_mut(name) else {
                continue;
            };
            process.count = process_override.count.unwrap_or(process.count);
            process.vcpus = process_override.vcpus.unwrap_or(process.vcpus);
            process.memory_mib = process_override.memory_mib.unwrap_or(process.memory_mib);
        }

        let mut services = self.services.clone();
        for (name, service_override) in &overrides.services {
            let Some(Service { hostnames, .. }) = services.get_mut(name) else {
                continue;
            };
            if let Some(replacement) = &service_override.hostnames {
                hostnames.clone_from(replacement);
            }
        }

        let mut env = self.env.clone();
        env.extend(overrides.env.clone());

        let mut volumes = self.volumes.clone();
        for (name, volume_override) in &overrides.volumes {
            let Some(volume) = volumes.get_mut(name) else {
                continue;
            };
            volume.size_mib = volume_override.size_mib.unwrap_or(volume.size_mib);
        }

        ResolvedManifest {
            app: self.app.clone(),
            environment: environment.clone(),
            processes,
            services,
            env,
            volumes,
            deploy: overrides.deploy.unwrap_or(self.deploy),
            startup: self.startup.clone(),
            release_command: self.release_command.clone(),
        }
    }
}
