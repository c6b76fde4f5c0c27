//! Reads the base manifest (everything outside `[environments]`) from the TOML tree into
//! drafts: every key checked for its type, format and range, every unknown key reported.
//!
//! Drafts keep `None` for values that were absent or invalid and the spans that the
//! cross-table rules in `validate` need. Rules that involve only one table (such as
//! `max_surge` with the immediate strategy) are checked here. `[services]` has its own module.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use toml_edit::ImDocument;

use super::diagnostics::{Diagnostics, ErrorCode, Problem};
use super::environments::{OverrideDraft, read_environments};
use super::fields::{
    Field, Spanned, TableRef, choice, command, duration, integer, quoted_list, size_mib, string,
    string_list, table, table_list,
};
use super::schema::{
    MAX_COUNT, MAX_MEMORY_MIB, MAX_VCPUS, MAX_VOLUME_MIB, MIN_MEMORY_MIB, MIN_VOLUME_MIB, MaxSurge,
    Signal, VolumeName,
};
use super::services::{ServiceDraft, read_services};
use crate::names::{AppName, NameError, ProcessName};

/// Keys allowed at the top level.
const TOP_KEYS: &[&str] = &[
    "app",
    "processes",
    "services",
    "env",
    "volumes",
    "deploy",
    "startup",
    "release_command",
    "environments",
];
const PROCESS_KEYS: &[&str] = &[
    "command",
    "count",
    "vcpus",
    "memory",
    "kill_signal",
    "kill_timeout",
];
const VOLUME_KEYS: &[&str] = &["process", "path", "size"];
const DEPLOY_KEYS: &[&str] = &["strategy", "max_surge"];
const STARTUP_KEYS: &[&str] = &["command", "timeout", "processes"];
const RELEASE_KEYS: &[&str] = &["command", "timeout", "vcpus", "memory"];

const NAME_HELP: &str = "write the name as a quoted string of 1 to 63 characters of a-z, 0-9 and '-', starting with a letter and not ending with '-'";
pub(super) const COUNT_HELP: &str = "use 0 to 100 instances; 0 defines the process type without running it, and `kiln scale` changes counts beyond that without a new release";
pub(super) const VCPUS_HELP: &str =
    "use 1 to 32 vCPUs per instance (Firecracker's maximum per microVM is 32)";
pub(super) const MEMORY_HELP: &str = "use 128 to 65536 MiB, as an integer number of MiB or a string such as \"512MiB\" or \"2GiB\"; below 128 MiB the guest kernel and kiln-init leave too little for a workload";
pub(super) const VOLUME_SIZE_HELP: &str = "use 16 MiB to 1 TiB, as an integer number of MiB or a string such as \"512MiB\" or \"10GiB\"; below 16 MiB ext4's journal and metadata take most of the space";

/// The limits of each duration key, shared by the docs and the reader.
pub(super) const KILL_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(3600));
pub(super) const STARTUP_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(3600));
pub(super) const RELEASE_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(86_400));

/// Maximum length of a volume mount path in bytes, well below Linux's PATH_MAX of 4096.
const MAX_MOUNT_PATH_LEN: usize = 1024;
/// Mount points that belong to the guest system or to kiln-init.
const RESERVED_MOUNT_PATHS: &[&str] = &["/proc", "/sys", "/dev", "/run/kiln"];

/// The manifest as read, before the cross-table rules.
#[derive(Default)]
pub(super) struct Draft {
    pub(super) app: Option<AppName>,
    pub(super) processes: Vec<ProcessDraft>,
    /// Every key under `[processes]`, valid name or not, so that a reference to a process
    /// type with an invalid name is not also reported as unknown.
    pub(super) declared_processes: Vec<String>,
    /// Span of the `processes` key, when present.
    pub(super) processes_span: Option<Range<usize>>,
    pub(super) services: Vec<ServiceDraft>,
    pub(super) declared_services: Vec<String>,
    pub(super) env: BTreeMap<String, String>,
    pub(super) volumes: Vec<VolumeDraft>,
    pub(super) declared_volumes: Vec<String>,
    pub(super) deploy: Option<DeployDraft>,
    pub(super) startup: Vec<StartupDraft>,
    pub(super) release_command: Option<ReleaseDraft>,
    pub(super) environments: Vec<OverrideDraft>,
}

pub(super) struct ProcessDraft {
    pub(super) name: Spanned<ProcessName>,
    pub(super) command: Option<Vec<String>>,
    pub(super) count: Option<u32>,
    pub(super) vcpus: Option<u32>,
    pub(super) memory_mib: Option<u32>,
    pub(super) kill_signal: Option<Signal>,
    pub(super) kill_timeout: Option<Duration>,
}

pub(super) struct VolumeDraft {
    pub(super) name: Spanned<VolumeName>,
    pub(super) path_key: String,
    pub(super) anchor: Range<usize>,
    pub(super) process: Option<Spanned<String>>,
    pub(super) mount_path: Option<Spanned<String>>,
    pub(super) size_mib: Option<u32>,
}

#[derive(Default)]
pub(super) struct DeployDraft {
    pub(super) immediate: bool,
    pub(super) max_surge: Option<MaxSurge>,
}

pub(super) struct StartupDraft {
    pub(super) path: String,
    pub(super) command: Option<Vec<String>>,
    pub(super) timeout: Option<Duration>,
    pub(super) processes: Vec<Spanned<String>>,
}

pub(super) struct ReleaseDraft {
    pub(super) command: Option<Vec<String>>,
    pub(super) timeout: Option<Duration>,
    pub(super) vcpus: Option<u32>,
    pub(super) memory_mib: Option<u32>,
}

/// Reads the whole document into a draft, recording every problem found on the way.
pub(super) fn read(document: &ImDocument<&str>, diagnostics: &mut Diagnostics<'_>) -> Draft {
    let root = TableRef {
        path: String::new(),
        anchor: diagnostics.first_line(0..document.raw().len()),
        inner: document.as_table(),
    };
    root.reject_unknown(diagnostics, TOP_KEYS);

    let mut draft = Draft::default();

    match root.get("app") {
        Some(field) => draft.app = read_name(diagnostics, &field, AppName::new),
        None => root.missing(
            diagnostics,
            "app",
            "name the app at the top of the file, such as app = \"hello\"",
        ),
    }

    match root.get("processes") {
        Some(field) => read_processes(diagnostics, &field, &mut draft),
        None => root.missing(
            diagnostics,
            "processes",
            "define at least one process type, such as [processes.web] with count = 1",
        ),
    }

    if let Some(field) = root.get("services") {
        let (services, declared) = read_services(diagnostics, &field);
        draft.services = services;
        draft.declared_services = declared;
    }
    if let Some(field) = root.get("env") {
        draft.env = read_env(diagnostics, &field);
    }
    if let Some(field) = root.get("volumes") {
        read_volumes(diagnostics, &field, &mut draft);
    }
    if let Some(field) = root.get("deploy") {
        draft.deploy = read_deploy(diagnostics, &field);
    }
    if let Some(field) = root.get("startup") {
        draft.startup = read_startup(diagnostics, &field);
    }
    if let Some(field) = root.get("release_command") {
        draft.release_command = read_release_command(diagnostics, &field);
    }
    if let Some(field) = root.get("environments") {
        draft.environments = read_environments(diagnostics, &field);
    }

    draft
}

/// Reads a string value that must be a valid name.
pub(super) fn read_name<N>(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
    parse: impl Fn(String) -> Result<N, NameError>,
) -> Option<N> {
    let text = string(diagnostics, field, NAME_HELP)?;
    match parse(text.value) {
        Ok(name) => Some(name),
        Err(error) => {
            diagnostics.push(text.span, invalid_name(&field.path, &error));
            None
        }
    }
}

fn invalid_name(path: &str, error: &NameError) -> Problem {
    Problem {
        code: ErrorCode::InvalidName,
        key: path.to_owned(),
        message: error.to_string(),
        help: "names appear in hostnames and device names, which is why they must be DNS labels"
            .to_owned(),
    }
}

/// Reads the keys of a table of named entries (`[processes.NAME]`), validating each key as a
/// name. Returns the valid entries and every key as written.
pub(super) fn named_entries<'a, N>(
    diagnostics: &mut Diagnostics<'_>,
    table: &TableRef<'a>,
    parse: impl Fn(String) -> Result<N, NameError>,
) -> (Vec<(Spanned<N>, Field<'a>)>, Vec<String>) {
    let mut entries = Vec::new();
    let mut declared = Vec::new();
    for field in table.fields() {
        declared.push(field.key.to_owned());
        match parse(field.key.to_owned()) {
            Ok(name) => entries.push((
                Spanned {
                    value: name,
                    span: field.key_span.clone(),
                },
                field,
            )),
            Err(error) => {
                diagnostics.push(field.key_span.clone(), invalid_name(&field.path, &error))
            }
        }
    }
    (entries, declared)
}

fn read_processes(diagnostics: &mut Diagnostics<'_>, field: &Field<'_>, draft: &mut Draft) {
    const HELP: &str = "define process types as tables, such as [processes.web]";
    let Some(processes) = table(diagnostics, field, HELP) else {
        return;
    };
    draft.processes_span = Some(field.key_span.clone());

    let (entries, declared) = named_entries(diagnostics, &processes, ProcessName::new);
    draft.declared_processes = declared;
    for (name, entry) in entries {
        let Some(process) = table(diagnostics, &entry, HELP) else {
            continue;
        };
        process.reject_unknown(diagnostics, PROCESS_KEYS);

        let signal = process
            .get("kill_signal")
            .and_then(|field| read_signal(diagnostics, &field));
        let kill_timeout = process
            .get("kill_timeout")
            .and_then(|field| duration(diagnostics, &field, KILL_TIMEOUT_RANGE));
        draft.processes.push(ProcessDraft {
            name,
            command: process
                .get("command")
                .and_then(|field| command(diagnostics, &field)),
            count: process
                .get("count")
                .and_then(|field| read_count(diagnostics, &field)),
            vcpus: process
                .get("vcpus")
                .and_then(|field| read_vcpus(diagnostics, &field)),
            memory_mib: process
                .get("memory")
                .and_then(|field| read_memory(diagnostics, &field)),
            kill_signal: signal,
            kill_timeout: kill_timeout.map(|timeout| timeout.value),
        });
    }
}

pub(super) fn read_count(diagnostics: &mut Diagnostics<'_>, field: &Field<'_>) -> Option<u32> {
    integer(diagnostics, field, (0, MAX_COUNT), COUNT_HELP).map(|count| count.value)
}

pub(super) fn read_vcpus(diagnostics: &mut Diagnostics<'_>, field: &Field<'_>) -> Option<u32> {
    integer(diagnostics, field, (1, MAX_VCPUS), VCPUS_HELP).map(|vcpus| vcpus.value)
}

pub(super) fn read_memory(diagnostics: &mut Diagnostics<'_>, field: &Field<'_>) -> Option<u32> {
    size_mib(
        diagnostics,
        field,
        (MIN_MEMORY_MIB, MAX_MEMORY_MIB),
        MEMORY_HELP,
    )
}

pub(super) fn read_volume_size(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
) -> Option<u32> {
    size_mib(
        diagnostics,
        field,
        (MIN_VOLUME_MIB, MAX_VOLUME_MIB),
        VOLUME_SIZE_HELP,
    )
}

fn read_signal(diagnostics: &mut Diagnostics<'_>, field: &Field<'_>) -> Option<Signal> {
    let names: Vec<&str> = Signal::ALL.iter().map(|signal| signal.as_str()).collect();
    let help = format!("use one of: {}", quoted_list(&names));
    let text = string(diagnostics, field, &help)?;
    if let Ok(signal) = text.value.parse() {
        return Some(signal);
    }

    let message = if matches!(text.value.as_str(), "SIGKILL" | "KILL") {
        "SIGKILL cannot be the kill signal: the process cannot catch it, and Kiln sends it \
         anyway when kill_timeout ends"
            .to_owned()
    } else {
        format!("unknown signal {:?}", text.value)
    };
    diagnostics.push(
        text.span,
        Problem {
            code: ErrorCode::InvalidValue,
            key: field.path.clone(),
            message,
            help,
        },
    );
    None
}

/// Reads an `[env]` table: variable names as keys, string values.
pub(super) fn read_env(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let Some(table) = table(
        diagnostics,
        field,
        "define environment variables as a table, such as [env] with RUST_LOG = \"info\"",
    ) else {
        return env;
    };

    for entry in table.fields() {
        if let Some(problem) = env_name_problem(entry.key, &entry.path) {
            diagnostics.push(entry.key_span.clone(), problem);
            continue;
        }
        let help = format!("quote the value, such as {} = \"8080\"", entry.key);
        let Some(value) = string(diagnostics, &entry, &help) else {
            continue;
        };
        if value.value.contains('\0') {
            diagnostics.push(
                value.span,
                Problem {
                    code: ErrorCode::InvalidValue,
                    key: entry.path.clone(),
                    message:
                        "the value contains a NUL byte, which no environment variable can hold"
                            .to_owned(),
                    help: "remove the \\u0000 escape from the value".to_owned(),
                },
            );
            continue;
        }
        env.insert(entry.key.to_owned(), value.value);
    }
    env
}

fn env_name_problem(name: &str, path: &str) -> Option<Problem> {
    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Some(Problem {
            code: ErrorCode::InvalidName,
            key: path.to_owned(),
            message: format!("invalid environment variable name {name:?}"),
            help: "use letters, digits and '_', not starting with a digit, such as DATABASE_URL"
                .to_owned(),
        });
    }
    if name.to_ascii_uppercase().starts_with("KILN_") {
        return Some(Problem {
            code: ErrorCode::InvalidName,
            key: path.to_owned(),
            message: format!("environment variable {name} uses the reserved prefix KILN_"),
            help: "Kiln sets KILN_APP, KILN_ENV, KILN_RELEASE, KILN_INSTANCE and other KILN_ variables itself; choose another name".to_owned(),
        });
    }
    None
}

fn read_volumes(diagnostics: &mut Diagnostics<'_>, field: &Field<'_>, draft: &mut Draft) {
    const HELP: &str =
        "define volumes as tables, such as [volumes.data] with path = \"/data\", size = \"1GiB\"";
    let Some(volumes) = table(diagnostics, field, HELP) else {
        return;
    };

    let (entries, declared) = named_entries(diagnostics, &volumes, VolumeName::new);
    draft.declared_volumes = declared;
    for (name, entry) in entries {
        let Some(volume) = table(diagnostics, &entry, HELP) else {
            continue;
        };
        volume.reject_unknown(diagnostics, VOLUME_KEYS);

        let process = volume.get("process").and_then(|field| {
            string(
                diagnostics,
                &field,
                "name the process type that mounts the volume, such as process = \"web\"",
            )
        });
        let mount_path = match volume.get("path") {
            Some(field) => read_mount_path(diagnostics, &field),
            None => {
                volume.missing(
                    diagnostics,
                    "path",
                    "give the absolute mount path inside the microVM, such as path = \"/data\"",
                );
                None
            }
        };
        let size_mib = match volume.get("size") {
            Some(field) => read_volume_size(diagnostics, &field),
            None => {
                volume.missing(diagnostics, "size", VOLUME_SIZE_HELP);
                None
            }
        };

        draft.volumes.push(VolumeDraft {
            name,
            path_key: volume.path.clone(),
            anchor: volume.anchor.clone(),
            process,
            mount_path,
            size_mib,
        });
    }
}

fn read_mount_path(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
) -> Option<Spanned<String>> {
    const HELP: &str = "use an absolute, normalized path such as \"/data\" (no '.', '..', empty or trailing components), outside /proc, /sys, /dev and /run/kiln";
    let path = string(diagnostics, field, HELP)?;

    let reason = mount_path_problem(&path.value);
    let Some(reason) = reason else {
        return Some(path);
    };
    diagnostics.push(
        path.span,
        Problem {
            code: ErrorCode::InvalidValue,
            key: field.path.clone(),
            message: format!("invalid mount path {:?}: {reason}", path.value),
            help: HELP.to_owned(),
        },
    );
    None
}

fn mount_path_problem(path: &str) -> Option<&'static str> {
    if !path.starts_with('/') {
        return Some("it is not absolute");
    }
    if path == "/" {
        return Some("it would hide the root filesystem");
    }
    if path.len() > MAX_MOUNT_PATH_LEN {
        return Some("it is longer than 1024 bytes");
    }
    if path.contains('\0') {
        return Some("it contains a NUL byte");
    }
    if path[1..]
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Some("it is not normalized");
    }
    let reserved = RESERVED_MOUNT_PATHS.iter().any(|reserved| {
        path == *reserved
            || path
                .strip_prefix(reserved)
                .is_some_and(|rest| rest.starts_with('/'))
    });
    if reserved {
        return Some("it is inside a directory that the guest system or kiln-init owns");
    }
    None
}

/// Reads a `[deploy]` table.
pub(super) fn read_deploy(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
) -> Option<DeployDraft> {
    let deploy = table(
        diagnostics,
        field,
        "define the deploy strategy as a table, such as [deploy] with strategy = \"rolling\"",
    )?;
    deploy.reject_unknown(diagnostics, DEPLOY_KEYS);

    let immediate = deploy
        .get("strategy")
        .and_then(|field| choice(diagnostics, &field, &["rolling", "immediate"]))
        .is_some_and(|strategy| strategy.value == "immediate");
    let surge_field = deploy.get("max_surge");
    let max_surge = surge_field
        .as_ref()
        .and_then(|field| read_max_surge(diagnostics, field));

    if immediate && let Some(field) = &surge_field {
        diagnostics.push(
            field.key_span.clone(),
            Problem {
                code: ErrorCode::Conflict,
                key: field.path.clone(),
                message: "max_surge applies only to the rolling strategy".to_owned(),
                help: "an immediate deploy stops every old instance before starting new ones; remove max_surge or use strategy = \"rolling\"".to_owned(),
            },
        );
    }
    Some(DeployDraft {
        immediate,
        max_surge,
    })
}

fn read_max_surge(diagnostics: &mut Diagnostics<'_>, field: &Field<'_>) -> Option<MaxSurge> {
    const HELP: &str = "use a number of instances from 1 to 100, such as 2, or a percentage of the count from 1% to 100%, such as \"25%\"";
    if field.item.as_integer().is_some() {
        return integer(diagnostics, field, (1, 100), HELP)
            .map(|surge| MaxSurge::Instances(surge.value));
    }

    let text = string(diagnostics, field, HELP)?;
    let percent = text
        .value
        .strip_suffix('%')
        .and_then(|digits| digits.parse::<u32>().ok())
        .filter(|percent| (1..=100).contains(percent));
    if percent.is_none() {
        diagnostics.push(
            text.span,
            Problem {
                code: ErrorCode::InvalidValue,
                key: field.path.clone(),
                message: format!("invalid max_surge {:?}", text.value),
                help: HELP.to_owned(),
            },
        );
    }
    percent.map(MaxSurge::Percent)
}

fn read_startup(diagnostics: &mut Diagnostics<'_>, field: &Field<'_>) -> Vec<StartupDraft> {
    let tables = table_list(
        diagnostics,
        field,
        "define startup scripts as [[startup]] sections, each with command = [...]",
    );

    let mut scripts = Vec::new();
    for script in tables {
        script.reject_unknown(diagnostics, STARTUP_KEYS);
        let command = match script.get("command") {
            Some(field) => command(diagnostics, &field),
            None => {
                script.missing(
                    diagnostics,
                    "command",
                    "give the argv to run, such as command = [\"/app/bin/prepare\"]",
                );
                None
            }
        };
        let timeout = script
            .get("timeout")
            .and_then(|field| duration(diagnostics, &field, STARTUP_TIMEOUT_RANGE))
            .map(|timeout| timeout.value);
        let processes = script
            .get("processes")
            .and_then(|field| {
                string_list(
                    diagnostics,
                    &field,
                    "list process type names, such as processes = [\"web\"]",
                )
            })
            .unwrap_or_default();
        scripts.push(StartupDraft {
            path: script.path.clone(),
            command,
            timeout,
            processes,
        });
    }
    scripts
}

fn read_release_command(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
) -> Option<ReleaseDraft> {
    let release = table(
        diagnostics,
        field,
        "define the release command as a table, such as [release_command] with command = [\"/app/migrate\"]",
    )?;
    release.reject_unknown(diagnostics, RELEASE_KEYS);

    let command = match release.get("command") {
        Some(field) => command(diagnostics, &field),
        None => {
            release.missing(
                diagnostics,
                "command",
                "give the argv to run once per release, such as command = [\"/app/migrate\", \"up\"]",
            );
            None
        }
    };
    Some(ReleaseDraft {
        command,
        timeout: release
            .get("timeout")
            .and_then(|field| duration(diagnostics, &field, RELEASE_TIMEOUT_RANGE))
            .map(|timeout| timeout.value),
        vcpus: release
            .get("vcpus")
            .and_then(|field| read_vcpus(diagnostics, &field)),
        memory_mib: release
            .get("memory")
            .and_then(|field| read_memory(diagnostics, &field)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_path_rules() {
        assert_eq!(mount_path_problem("/data"), None);
        assert_eq!(mount_path_problem("/var/lib/app"), None);
        assert_eq!(mount_path_problem("/runner"), None);
        assert_eq!(mount_path_problem("/devices"), None);
        assert_eq!(mount_path_problem("data"), Some("it is not absolute"));
        assert_eq!(
            mount_path_problem("/"),
            Some("it would hide the root filesystem")
        );
        assert_eq!(mount_path_problem("/data/"), Some("it is not normalized"));
        assert_eq!(mount_path_problem("/a//b"), Some("it is not normalized"));
        assert_eq!(mount_path_problem("/a/../b"), Some("it is not normalized"));
        assert!(mount_path_problem("/proc").is_some());
        assert!(mount_path_problem("/run/kiln/secrets").is_some());
        assert!(mount_path_problem("/dev/shm").is_some());
    }

    #[test]
    fn env_name_rules() {
        assert!(env_name_problem("RUST_LOG", "env.RUST_LOG").is_none());
        assert!(env_name_problem("_private", "env._private").is_none());
        assert!(env_name_problem("1X", "env.1X").is_some());
        assert!(env_name_problem("A-B", "env.A-B").is_some());
        assert!(env_name_problem("", "env").is_some());
        assert!(env_name_problem("KILN_APP", "env.KILN_APP").is_some());
        assert!(env_name_problem("kiln_x", "env.kiln_x").is_some());
    }
}
