//! Reads `[services]`: ports, protocols, hostnames and health checks.
//!
//! Rules local to one service are checked here: a `tcp` service has no hostnames, HTTP-only
//! health-check keys need `type = "http"`, and a check's timeout fits in its interval.

use std::ops::Range;
use std::time::Duration;

use super::diagnostics::{Diagnostics, ErrorCode, Problem};
use super::fields::{
    Field, Spanned, boolean, choice, duration, integer, string, string_items, table,
};
use super::reader::named_entries;
use super::schema::{DEFAULT_HEALTH_INTERVAL, Protocol, ServiceName};
use super::units::format_duration;
use crate::names::Hostname;

const SERVICE_KEYS: &[&str] = &["process", "port", "protocol", "hostnames", "health"];
const HEALTH_KEYS: &[&str] = &[
    "type",
    "path",
    "expected_status",
    "tls",
    "interval",
    "timeout",
    "grace_period",
];

pub(super) const HOSTNAMES_HELP: &str =
    "write hostnames as an array of strings, such as [\"app.example.com\", \"*.example.net\"]";

pub(super) const HEALTH_INTERVAL_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(600));
pub(super) const HEALTH_TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(300));
pub(super) const HEALTH_GRACE_RANGE: (Duration, Duration) =
    (Duration::ZERO, Duration::from_secs(3600));

/// Maximum length of an HTTP health-check path, which keeps the request line short.
const MAX_HEALTH_PATH_LEN: usize = 1024;

/// A service as read; `process` and `port` are `None` when absent or invalid.
pub(super) struct ServiceDraft {
    pub(super) name: Spanned<ServiceName>,
    pub(super) path: String,
    pub(super) process: Option<Spanned<String>>,
    pub(super) port: Option<Spanned<u16>>,
    pub(super) protocol: Protocol,
    pub(super) hostnames: Vec<HostnameEntry>,
    pub(super) health: HealthDraft,
}

/// A valid hostname with its position and key path (`services.https.hostnames[1]`).
pub(super) struct HostnameEntry {
    pub(super) hostname: Hostname,
    pub(super) span: Range<usize>,
    pub(super) key: String,
}

/// A health check as read; `None` fields take their defaults when the manifest is built.
#[derive(Default)]
pub(super) struct HealthDraft {
    pub(super) http: bool,
    pub(super) path: Option<String>,
    pub(super) expected_status: Option<u16>,
    pub(super) tls: Option<bool>,
    pub(super) interval: Option<Duration>,
    pub(super) timeout: Option<Duration>,
    pub(super) grace_period: Option<Duration>,
}

/// Reads `[services]`. Returns the valid services and every service key as written.
pub(super) fn read_services(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
) -> (Vec<ServiceDraft>, Vec<String>) {
    const HELP: &str =
        "define services as tables, such as [services.https] with process = \"web\", port = 8443";
    let Some(services) = table(diagnostics, field, HELP) else {
        return (Vec::new(), Vec::new());
    };

    let (entries, declared) = named_entries(diagnostics, &services, ServiceName::new);
    let mut drafts = Vec::new();
    for (name, entry) in entries {
        let Some(service) = table(diagnostics, &entry, HELP) else {
            continue;
        };
        service.reject_unknown(diagnostics, SERVICE_KEYS);

        let process = match service.get("process") {
            Some(field) => string(
                diagnostics,
                &field,
                "name the process type that listens on the port, such as process = \"web\"",
            ),
            None => {
                service.missing(
                    diagnostics,
                    "process",
                    "name the process type that listens on the port, such as process = \"web\"",
                );
                None
            }
        };
        let port = match service.get("port") {
            Some(field) => read_port(diagnostics, &field),
            None => {
                service.missing(
                    diagnostics,
                    "port",
                    "give the port the process listens on inside its microVM, such as port = 8443",
                );
                None
            }
        };
        let protocol = service
            .get("protocol")
            .and_then(|field| choice(diagnostics, &field, &["tls", "tcp"]))
            .map_or(Protocol::Tls, |text| {
                if text.value == "tcp" {
                    Protocol::Tcp
                } else {
                    Protocol::Tls
                }
            });
        let hostnames = match service.get("hostnames") {
            Some(field) => {
                let hostnames = read_hostnames(diagnostics, &field);
                if protocol == Protocol::Tcp && !hostnames.is_empty() {
                    diagnostics.push(field.value_span(), tcp_hostnames_problem(&field.path));
                }
                hostnames
            }
            None => Vec::new(),
        };
        let health = match service.get("health") {
            Some(field) => read_health(diagnostics, &field),
            None => HealthDraft::default(),
        };

        drafts.push(ServiceDraft {
            name,
            path: service.path.clone(),
            process,
            port,
            protocol,
            hostnames,
            health,
        });
    }
    (drafts, declared)
}

pub(super) fn tcp_hostnames_problem(path: &str) -> Problem {
    Problem {
        code: ErrorCode::InvalidValue,
        key: path.to_owned(),
        message: "a `tcp` service cannot have hostnames".to_owned(),
        help: "hostnames route TLS connections by their SNI, and a `tcp` service gets a \
               dedicated address instead; remove `hostnames` or use protocol = \"tls\""
            .to_owned(),
    }
}

fn read_port(diagnostics: &mut Diagnostics<'_>, field: &Field<'_>) -> Option<Spanned<u16>> {
    const HELP: &str = "use a port from 1 to 65535 that the process listens on inside its microVM (port 0 would mean \"any free port\", which the ingress could not find)";
    let port = integer(diagnostics, field, (1, 65_535), HELP)?;
    let value = u16::try_from(port.value).ok()?;
    Some(Spanned {
        value,
        span: port.span,
    })
}

/// Reads a list of hostnames; invalid ones are reported and left out.
pub(super) fn read_hostnames(
    diagnostics: &mut Diagnostics<'_>,
    field: &Field<'_>,
) -> Vec<HostnameEntry> {
    let Some((texts, _)) = string_items(diagnostics, field, HOSTNAMES_HELP) else {
        return Vec::new();
    };

    let mut hostnames = Vec::new();
    for (index, text) in texts.into_iter().enumerate() {
        let key = format!("{}[{index}]", field.path);
        match Hostname::new(&text.value) {
            Ok(hostname) => hostnames.push(HostnameEntry {
                hostname,
                span: text.span,
                key,
            }),
            Err(error) => diagnostics.push(
                text.span,
                Problem {
                    code: ErrorCode::InvalidHostname,
                    key,
                    message: error.to_string(),
                    help: "use a DNS name of at least two labels, each 1 to 63 letters, digits or '-', such as \"app.example.com\"; '*.' may start it to cover one label".to_owned(),
                },
            ),
        }
    }
    hostnames
}

fn read_health(diagnostics: &mut Diagnostics<'_>, field: &Field<'_>) -> HealthDraft {
    let Some(health) = table(
        diagnostics,
        field,
        "define the health check as a table, such as [services.https.health] with type = \"http\"",
    ) else {
        return HealthDraft::default();
    };
    health.reject_unknown(diagnostics, HEALTH_KEYS);

    let http = health
        .get("type")
        .and_then(|field| choice(diagnostics, &field, &["tcp", "http"]))
        .is_some_and(|kind| kind.value == "http");

    let mut draft = HealthDraft {
        http,
        ..HealthDraft::default()
    };
    for key in ["path", "expected_status", "tls"] {
        let Some(field) = health.get(key) else {
            continue;
        };
        if !http {
            diagnostics.push(
                field.key_span.clone(),
                Problem {
                    code: ErrorCode::InvalidValue,
                    key: field.path.clone(),
                    message: format!("`{key}` applies only to HTTP health checks"),
                    help: "set type = \"http\" for an HTTP check, or remove the key for a TCP check (the default)".to_owned(),
                },
            );
            continue;
        }
        match key {
            "path" => draft.path = read_health_path(diagnostics, &field),
            "expected_status" => {
                draft.expected_status = integer(
                    diagnostics,
                    &field,
                    (100, 599),
                    "use an HTTP status code from 100 to 599",
                )
                .and_then(|status| u16::try_from(status.value).ok());
            }
            _ => {
                draft.tls = boolean(
                    diagnostics,
                    &field,
                    "use true to send the check over TLS or false for plain HTTP",
                );
            }
        }
    }

    let interval = health
        .get("interval")
        .and_then(|field| duration(diagnostics, &field, HEALTH_INTERVAL_RANGE));
    let timeout_field = health.get("timeout");
    let timeout = timeout_field
        .as_ref()
        .and_then(|field| duration(diagnostics, field, HEALTH_TIMEOUT_RANGE));
    draft.grace_period = health
        .get("grace_period")
        .and_then(|field| duration(diagnostics, &field, HEALTH_GRACE_RANGE))
        .map(|grace| grace.value);

    let effective_interval = interval
        .as_ref()
        .map_or(DEFAULT_HEALTH_INTERVAL, |i| i.value);
    if let (Some(timeout), Some(field)) = (&timeout, &timeout_field)
        && timeout.value > effective_interval
    {
        diagnostics.push(
            timeout.span.clone(),
            Problem {
                code: ErrorCode::Conflict,
                key: field.path.clone(),
                message: format!(
                    "the timeout is longer than the interval ({})",
                    format_duration(effective_interval)
                ),
                help:
                    "a check must end before the next one starts; make timeout at most the interval"
                        .to_owned(),
            },
        );
    }
    draft.interval = interval.map(|i| i.value);
    draft.timeout = timeout.map(|t| t.value);
    draft
}

fn read_health_path(diagnostics: &mut Diagnostics<'_>, field: &Field<'_>) -> Option<String> {
    const HELP: &str = "use an absolute request path of printable ASCII without spaces, such as \"/healthz\" or \"/status?full=1\"";
    let path = string(diagnostics, field, HELP)?;
    let valid = path.value.starts_with('/')
        && path.value.len() <= MAX_HEALTH_PATH_LEN
        && path.value.chars().all(|c| c.is_ascii_graphic());
    if valid {
        return Some(path.value);
    }
    diagnostics.push(
        path.span,
        Problem {
            code: ErrorCode::InvalidValue,
            key: field.path.clone(),
            message: format!("invalid HTTP path {:?}", path.value),
            help: HELP.to_owned(),
        },
    );
    None
}
