//! Tests of whole manifests: every rule, overrides, the canonical form, snapshots of the error
//! texts and property tests that no input panics.

use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::names::{EnvName, Hostname, ProcessName};

const FULL: &str = include_str!("../../tests/manifests/full.toml");

const MINIMAL: &str = r#"
app = "hello"

[processes.web]
"#;

fn errors_of(source: &str) -> Vec<ManifestError> {
    match Manifest::parse(source) {
        Ok(manifest) => panic!("expected errors, parsed {manifest:#?}"),
        Err(errors) => errors.errors,
    }
}

/// Parses `source`, expecting exactly one error.
fn one_error(source: &str) -> ManifestError {
    let mut errors = errors_of(source);
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    errors.remove(0)
}

fn process(name: &str) -> ProcessName {
    ProcessName::new(name).unwrap()
}

fn service(name: &str) -> ServiceName {
    ServiceName::new(name).unwrap()
}

fn env(name: &str) -> EnvName {
    EnvName::new(name).unwrap()
}

fn hostnames(names: &[&str]) -> Vec<Hostname> {
    names
        .iter()
        .map(|name| Hostname::new(name).unwrap())
        .collect()
}

/// Returns a manifest with one web process type and `rest` appended.
fn with_web(rest: &str) -> String {
    format!("app = \"hello\"\n\n[processes.web]\ncount = 1\n\n{rest}")
}

// Parsing valid manifests.

#[test]
fn minimal_manifest_gets_defaults() {
    let manifest = Manifest::parse(MINIMAL).unwrap();
    let web = &manifest.processes[&process("web")];
    assert_eq!(manifest.app.as_str(), "hello");
    assert_eq!(web.command, None);
    assert_eq!(web.count, DEFAULT_COUNT);
    assert_eq!(web.vcpus, DEFAULT_VCPUS);
    assert_eq!(web.memory_mib, DEFAULT_MEMORY_MIB);
    assert_eq!(web.kill_signal, Signal::Term);
    assert_eq!(web.kill_timeout, DEFAULT_KILL_TIMEOUT);
    assert!(manifest.services.is_empty());
    assert_eq!(
        manifest.deploy,
        Deploy::Rolling {
            max_surge: MaxSurge::Instances(1)
        }
    );
    assert!(manifest.startup.is_empty());
    assert_eq!(manifest.release_command, None);
}

#[test]
fn full_manifest_reads_every_key() {
    let manifest = Manifest::parse(FULL).unwrap();

    let web = &manifest.processes[&process("web")];
    assert_eq!(
        web.command.as_deref(),
        Some(
            &[
                "/app/server".to_owned(),
                "--listen".to_owned(),
                "[::]:8443".to_owned()
            ][..]
        )
    );
    assert_eq!((web.count, web.vcpus, web.memory_mib), (2, 2, 1024));
    assert_eq!(web.kill_signal, Signal::Int);
    assert_eq!(web.kill_timeout, Duration::from_secs(45));
    assert_eq!(manifest.processes[&process("worker")].memory_mib, 512);

    let https = &manifest.services[&service("https")];
    assert_eq!(https.process, process("web"));
    assert_eq!(https.port, 8443);
    assert_eq!(https.protocol, Protocol::Tls);
    assert_eq!(
        https.hostnames,
        hostnames(&["shop.example.com", "www.shop.example.com"])
    );
    assert_eq!(
        https.health,
        HealthCheck {
            probe: Probe::Http {
                path: "/healthz".to_owned(),
                expected_status: 204,
                tls: true
            },
            interval: Duration::from_secs(15),
            timeout: Duration::from_secs(3),
            grace_period: Duration::from_secs(20),
        }
    );
    let proxy = &manifest.services[&service("postgres-proxy")];
    assert_eq!(proxy.protocol, Protocol::Tcp);
    assert_eq!(proxy.health.probe, Probe::Tcp);
    assert_eq!(proxy.health.interval, Duration::from_secs(5));
    assert_eq!(proxy.health.timeout, DEFAULT_HEALTH_TIMEOUT);

    assert_eq!(manifest.env["RUST_LOG"], "info");
    let uploads = &manifest.volumes[&VolumeName::new("uploads").unwrap()];
    assert_eq!(uploads.path, "/var/lib/shop/uploads");
    assert_eq!(uploads.size_mib, 10 * 1024);
    assert_eq!(
        manifest.deploy,
        Deploy::Rolling {
            max_surge: MaxSurge::Percent(50)
        }
    );

    assert_eq!(manifest.startup.len(), 2);
    assert_eq!(manifest.startup[0].timeout, Duration::from_secs(120));
    assert_eq!(manifest.startup[0].processes, vec![process("web")]);
    assert_eq!(manifest.startup[1].timeout, DEFAULT_STARTUP_TIMEOUT);
    assert!(manifest.startup[1].processes.is_empty());

    let release = manifest.release_command.as_ref().unwrap();
    assert_eq!(
        release.command,
        vec!["/app/migrate".to_owned(), "up".to_owned()]
    );
    assert_eq!(release.timeout, Duration::from_secs(900));
    assert_eq!((release.vcpus, release.memory_mib), (DEFAULT_VCPUS, 512));

    assert_eq!(manifest.environments.len(), 2);
}

#[test]
fn http_check_tls_follows_protocol() {
    let source = with_web(
        "[services.plain]\nprocess = \"web\"\nport = 8080\nprotocol = \"tcp\"\nhealth = { type = \"http\" }\n\n\
         [services.secure]\nprocess = \"web\"\nport = 8443\nhealth = { type = \"http\" }\n\n\
         [services.forced]\nprocess = \"web\"\nport = 9000\nhealth = { type = \"http\", tls = false }\n",
    );
    let manifest = Manifest::parse(&source).unwrap();
    let tls_of = |name: &str| match &manifest.services[&service(name)].health.probe {
        Probe::Http {
            tls,
            path,
            expected_status,
        } => {
            assert_eq!(path, "/");
            assert_eq!(*expected_status, DEFAULT_EXPECTED_STATUS);
            *tls
        }
        Probe::Tcp => panic!("{name} has a TCP probe"),
    };
    assert!(!tls_of("plain"));
    assert!(tls_of("secure"));
    assert!(!tls_of("forced"));
}

#[test]
fn volume_defaults_to_the_only_process() {
    let source = with_web("[volumes.data]\npath = \"/data\"\nsize = 1024\n");
    let manifest = Manifest::parse(&source).unwrap();
    assert_eq!(
        manifest.volumes[&VolumeName::new("data").unwrap()].process,
        process("web")
    );
}

#[test]
fn startup_accepts_inline_array() {
    let source = format!(
        "startup = [{{ command = [\"/a\"] }}, {{ command = [\"/b\"], timeout = \"5s\" }}]\n{MINIMAL}"
    );
    let manifest = Manifest::parse(&source).unwrap();
    assert_eq!(manifest.startup[1].command, vec!["/b".to_owned()]);
    assert_eq!(manifest.startup[1].timeout, Duration::from_secs(5));
}

#[test]
fn example_app_manifest_is_valid() {
    let source = include_str!("../../../../examples/hello-tls/kiln.toml");
    let manifest = Manifest::parse(source).unwrap();
    let https = &manifest.services[&service("https")];
    assert_eq!(https.port, 8443);
    assert_eq!(https.protocol, Protocol::Tls);
    assert_eq!(
        manifest.resolve(&env("prod")).processes[&process("web")].count,
        2
    );
}

// Environment overrides.

#[test]
fn resolve_applies_overrides() {
    let manifest = Manifest::parse(FULL).unwrap();
    let staging = manifest.resolve(&env("staging"));

    assert_eq!(staging.environment, env("staging"));
    let web = &staging.processes[&process("web")];
    assert_eq!((web.count, web.vcpus, web.memory_mib), (1, 2, 512));
    assert_eq!(
        staging.processes[&process("worker")],
        manifest.processes[&process("worker")]
    );
    assert_eq!(
        staging.services[&service("https")].hostnames,
        hostnames(&["staging.shop.example.com"])
    );
    assert_eq!(staging.services[&service("https")].port, 8443);
    assert_eq!(staging.env["RUST_LOG"], "debug");
    assert_eq!(staging.env["SHOP_SANDBOX"], "1");
    assert_eq!(staging.env["SHOP_CURRENCY"], "EUR");
    assert_eq!(
        staging.volumes[&VolumeName::new("uploads").unwrap()].size_mib,
        1024
    );
    assert_eq!(staging.deploy, Deploy::Immediate);
    assert_eq!(staging.startup, manifest.startup);
    assert_eq!(staging.release_command, manifest.release_command);
}

#[test]
fn resolve_keeps_base_for_unset_values() {
    let manifest = Manifest::parse(FULL).unwrap();
    let prod = manifest.resolve(&env("prod"));

    assert_eq!(prod.processes[&process("web")].count, 4);
    assert_eq!(prod.processes[&process("web")].memory_mib, 1024);
    assert_eq!(prod.services, manifest.services);
    assert_eq!(prod.env, manifest.env);
    assert_eq!(prod.deploy, manifest.deploy);
}

#[test]
fn resolve_undeclared_env_is_base() {
    let manifest = Manifest::parse(FULL).unwrap();
    let dev = manifest.resolve(&env("dev"));

    assert_eq!(dev.processes, manifest.processes);
    assert_eq!(dev.services, manifest.services);
    assert_eq!(dev.env, manifest.env);
    assert_eq!(dev.volumes, manifest.volumes);
    assert_eq!(dev.deploy, manifest.deploy);
}

#[test]
fn override_deploy_replaces_whole_table() {
    let source = format!(
        "{}\n[environments.staging.deploy]\nstrategy = \"rolling\"\n",
        with_web("[deploy]\nmax_surge = 3\n")
    );
    let manifest = Manifest::parse(&source).unwrap();
    assert_eq!(
        manifest.resolve(&env("prod")).deploy,
        Deploy::Rolling {
            max_surge: MaxSurge::Instances(3)
        }
    );
    assert_eq!(manifest.resolve(&env("staging")).deploy, Deploy::default());
}

#[test]
fn override_of_unknown_entries_rejected() {
    let source = with_web(
        "[environments.staging.processes.api]\ncount = 1\n\n\
         [environments.staging.services.https]\nhostnames = [\"a.example.com\"]\n\n\
         [environments.staging.volumes.data]\nsize = 100\n",
    );
    let errors = errors_of(&source);
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "environments.staging.processes.api",
            "environments.staging.services.https",
            "environments.staging.volumes.data"
        ]
    );
    assert!(errors.iter().all(|e| e.code == ErrorCode::UnknownReference));
    assert!(
        errors[0].help.contains("use one of: web"),
        "{}",
        errors[0].help
    );
    assert!(
        errors[1].help.contains("(none defined)"),
        "{}",
        errors[1].help
    );
}

#[test]
fn override_of_fixed_key_rejected() {
    let source = with_web("[environments.staging.processes.web]\ncommand = [\"/other\"]\n");
    let error = one_error(&source);
    assert_eq!(error.code, ErrorCode::UnknownKey);
    assert_eq!(error.key, "environments.staging.processes.web.command");
    assert_eq!(error.message, "`command` cannot be set per environment");
    assert!(
        error.help.ends_with("here set only: count, vcpus, memory"),
        "{}",
        error.help
    );

    let source = with_web("[environments.staging]\napp = \"other\"\n");
    assert_eq!(
        one_error(&source).message,
        "`app` cannot be set per environment"
    );
}

#[test]
fn override_values_are_checked() {
    let source =
        with_web("[environments.staging.processes.web]\ncount = 500\nmemory = 64\nreplicas = 2\n");
    let errors = errors_of(&source);
    let codes: Vec<ErrorCode> = errors.iter().map(|e| e.code).collect();
    assert_eq!(
        codes,
        [
            ErrorCode::OutOfRange,
            ErrorCode::OutOfRange,
            ErrorCode::UnknownKey
        ]
    );
}

#[test]
fn invalid_environment_name_rejected() {
    let error = one_error(&with_web("[environments.Staging]\n"));
    assert_eq!(error.code, ErrorCode::InvalidName);
    assert_eq!(error.found, "Staging");
}

#[test]
fn override_hostnames_on_tcp_service_rejected() {
    let source = with_web(
        "[services.db]\nprocess = \"web\"\nport = 5432\nprotocol = \"tcp\"\n\n\
         [environments.staging.services.db]\nhostnames = [\"db.example.com\"]\n",
    );
    let error = one_error(&source);
    assert_eq!(error.key, "environments.staging.services.db.hostnames");
    assert_eq!(error.message, "a `tcp` service cannot have hostnames");
}

// Hostnames claimed twice.

#[test]
fn hostname_twice_across_services() {
    let source = with_web(
        "[services.a]\nprocess = \"web\"\nport = 8443\nhostnames = [\"app.example.com\"]\n\n\
         [services.b]\nprocess = \"web\"\nport = 9443\nhostnames = [\"APP.example.com.\"]\n",
    );
    let error = one_error(&source);
    assert_eq!(error.code, ErrorCode::DuplicateHostname);
    assert_eq!(error.key, "services.b.hostnames[0]");
    assert_eq!(
        error.message,
        "hostname `app.example.com` is already claimed by service `a`"
    );
    assert_eq!((error.line, error.column), (14, 14));
}

#[test]
fn hostname_twice_in_one_service() {
    let source = with_web(
        "[services.a]\nprocess = \"web\"\nport = 8443\nhostnames = [\"x.example.com\", \"x.example.com\"]\n",
    );
    let error = one_error(&source);
    assert_eq!(error.key, "services.a.hostnames[1]");
    assert_eq!(error.message, "hostname `x.example.com` is listed twice");
}

#[test]
fn hostname_collides_within_env_after_override() {
    let source = with_web(
        "[services.a]\nprocess = \"web\"\nport = 8443\nhostnames = [\"a.example.com\"]\n\n\
         [services.b]\nprocess = \"web\"\nport = 9443\nhostnames = [\"b.example.com\"]\n\n\
         [environments.staging.services.b]\nhostnames = [\"a.example.com\"]\n",
    );
    let errors = errors_of(&source);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(
        errors[0].key,
        "environments.staging.services.b.hostnames[0]"
    );
    assert_eq!(
        errors[0].message,
        "in environment `staging`, hostname `a.example.com` is claimed by service `a` and by service `b`"
    );
}

#[test]
fn hostname_collides_across_declared_envs() {
    let source = with_web(
        "[services.a]\nprocess = \"web\"\nport = 8443\nhostnames = [\"a.example.com\"]\n\n\
         [environments.prod]\n\n\
         [environments.staging.services.a]\nhostnames = [\"a.example.com\"]\n",
    );
    let error = one_error(&source);
    assert_eq!(error.code, ErrorCode::DuplicateHostname);
    assert_eq!(error.key, "environments.staging.services.a.hostnames[0]");
    assert_eq!(
        error.message,
        "hostname `a.example.com` is claimed by environments `prod` and `staging`"
    );
}

#[test]
fn inherited_hostname_in_two_envs_reported_once() {
    let source = with_web(
        "[services.a]\nprocess = \"web\"\nport = 8443\nhostnames = [\"a.example.com\"]\n\n\
         [environments.prod]\n[environments.staging]\n[environments.dev]\n",
    );
    let error = one_error(&source);
    assert_eq!(error.key, "services.a.hostnames[0]");
    assert_eq!(
        error.message,
        "hostname `a.example.com` is claimed by environments `prod`, `staging` and `dev`"
    );
}

#[test]
fn distinct_hostnames_per_env_accepted() {
    let source = with_web(
        "[services.a]\nprocess = \"web\"\nport = 8443\nhostnames = [\"a.example.com\"]\n\n\
         [environments.prod]\n\n\
         [environments.staging.services.a]\nhostnames = [\"staging.a.example.com\"]\n",
    );
    assert!(Manifest::parse(&source).is_ok());
}

// Rules of single values.

#[test]
fn unknown_keys_suggest_closest() {
    let source = "app = \"hello\"\nname = \"x\"\n\n[processes.web]\ncpus = 2\nmemroy = 512\n";
    let errors = errors_of(source);
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert_eq!(errors[0].key, "name");
    assert!(
        errors[0]
            .help
            .starts_with("allowed keys here: app, processes"),
        "{}",
        errors[0].help
    );
    assert_eq!(errors[1].key, "processes.web.cpus");
    assert!(
        errors[1].help.starts_with("did you mean `vcpus`?"),
        "{}",
        errors[1].help
    );
    assert!(
        errors[2].help.starts_with("did you mean `memory`?"),
        "{}",
        errors[2].help
    );
    assert_eq!((errors[2].line, errors[2].column), (6, 1));
}

#[test]
fn missing_required_keys() {
    let errors = errors_of("# nothing\n");
    let messages: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "missing required key `app`",
            "missing required key `processes`"
        ]
    );

    let error = one_error("app = \"hello\"\nprocesses = {}\n");
    assert_eq!(error.message, "no process type is defined");
}

#[test]
fn names_must_be_dns_labels() {
    let source = "app = \"Hello_App\"\n\n[processes.Web]\n[processes.ok]\n\n\
                  [services.\"my service\"]\nprocess = \"ok\"\nport = 1\n\n\
                  [volumes.-data]\npath = \"/d\"\nsize = 16\n";
    let errors = errors_of(source);
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "app",
            "processes.Web",
            "services.\"my service\"",
            "volumes.-data"
        ]
    );
    assert!(errors.iter().all(|e| e.code == ErrorCode::InvalidName));
    assert_eq!(errors[0].found, "\"Hello_App\"");
    assert!(
        errors[0]
            .message
            .contains("lowercase letters, digits and '-'")
    );
}

#[test]
fn memory_floor_and_ceiling() {
    let cases = [
        ("64", "64 is below the minimum of 128 MiB"),
        ("127", "127 is below the minimum of 128 MiB"),
        ("\"64MiB\"", "\"64MiB\" is below the minimum of 128 MiB"),
        ("\"65GiB\"", "\"65GiB\" is above the maximum of 65536 MiB"),
        ("-1", "-1 is below the minimum of 128 MiB"),
    ];
    for (value, expected) in cases {
        let error = one_error(&format!("app = \"a\"\n[processes.web]\nmemory = {value}\n"));
        assert_eq!(error.code, ErrorCode::OutOfRange, "{value}");
        assert_eq!(error.message, expected);
        assert_eq!(error.found, value);
        assert!(
            error.help.contains("the guest kernel and kiln-init"),
            "{}",
            error.help
        );
    }
    for value in ["128", "\"128MiB\"", "65536", "\"64GiB\""] {
        let source = format!("app = \"a\"\n[processes.web]\nmemory = {value}\n");
        assert!(Manifest::parse(&source).is_ok(), "{value}");
    }
}

#[test]
fn memory_size_strings_checked() {
    let error = one_error("app = \"a\"\n[processes.web]\nmemory = \"1GB\"\n");
    assert_eq!(error.code, ErrorCode::InvalidSize);
    assert_eq!(
        error.message,
        "invalid size \"1GB\": unknown unit \"GB\"; use MiB, GiB or TiB; write GiB (1 GiB = 1024 MiB)"
    );

    let error = one_error("app = \"a\"\n[processes.web]\nmemory = 1.5\n");
    assert_eq!(error.code, ErrorCode::WrongType);
}

#[test]
fn count_and_vcpu_ranges() {
    let cases = [
        (
            "count = 101",
            "processes.web.count",
            "101 is outside the allowed range 0 to 100",
        ),
        (
            "count = -1",
            "processes.web.count",
            "-1 is outside the allowed range 0 to 100",
        ),
        (
            "vcpus = 0",
            "processes.web.vcpus",
            "0 is outside the allowed range 1 to 32",
        ),
        (
            "vcpus = 33",
            "processes.web.vcpus",
            "33 is outside the allowed range 1 to 32",
        ),
    ];
    for (line, key, message) in cases {
        let error = one_error(&format!("app = \"a\"\n[processes.web]\n{line}\n"));
        assert_eq!(error.code, ErrorCode::OutOfRange, "{line}");
        assert_eq!(error.key, key);
        assert_eq!(error.message, message);
    }
    let error = one_error("app = \"a\"\n[processes.web]\ncount = \"2\"\n");
    assert_eq!(error.message, "expected an integer, found a string");
    assert!(Manifest::parse("app = \"a\"\n[processes.web]\ncount = 0\nvcpus = 32\n").is_ok());
}

#[test]
fn port_range() {
    for (port, message) in [
        ("0", "0 is outside the allowed range 1 to 65535"),
        ("65536", "65536 is outside the allowed range 1 to 65535"),
        ("-443", "-443 is outside the allowed range 1 to 65535"),
    ] {
        let error = one_error(&with_web(&format!(
            "[services.a]\nprocess = \"web\"\nport = {port}\n"
        )));
        assert_eq!(error.code, ErrorCode::OutOfRange);
        assert_eq!(error.key, "services.a.port");
        assert_eq!(error.message, message);
        assert!(error.help.contains("1 to 65535"));
    }
    assert!(Manifest::parse(&with_web("[services.a]\nprocess = \"web\"\nport = 65535\n")).is_ok());
}

#[test]
fn duplicate_port_on_one_process() {
    let source = with_web(
        "[services.a]\nprocess = \"web\"\nport = 8443\n\n[services.b]\nprocess = \"web\"\nport = 8443\n",
    );
    let error = one_error(&source);
    assert_eq!(error.code, ErrorCode::Conflict);
    assert_eq!(
        error.message,
        "port 8443 of process type `web` is already used by service `a`"
    );
}

#[test]
fn duplicate_process_type() {
    let source = "app = \"a\"\n\n[processes.web]\ncount = 1\n\n[processes.web]\ncount = 2\n";
    let error = one_error(source);
    assert_eq!(error.code, ErrorCode::Conflict);
    assert_eq!(error.key, "processes.web");
    assert_eq!(error.message, "process type `web` is defined twice");
    assert_eq!((error.line, error.column), (6, 1));
    assert_eq!(error.found, "[processes.web]");

    let source = "app = \"a\"\n\n[processes.web]\n[processes.\"web\"]\n";
    assert_eq!(
        one_error(source).message,
        "process type `web` is defined twice"
    );
}

#[test]
fn service_names_unknown_process() {
    let source = with_web("[services.a]\nprocess = \"api\"\nport = 80\n");
    let error = one_error(&source);
    assert_eq!(error.code, ErrorCode::UnknownReference);
    assert_eq!(error.key, "services.a.process");
    assert_eq!(error.message, "no process type \"api\" is defined");
    assert_eq!(
        error.help,
        "use one of the process types under [processes]: web"
    );
}

#[test]
fn reference_to_invalid_process_name_not_reported_twice() {
    let source = "app = \"a\"\n[processes.Web]\n[services.a]\nprocess = \"Web\"\nport = 80\n";
    let error = one_error(source);
    assert_eq!(error.code, ErrorCode::InvalidName);
}

#[test]
fn invalid_hostnames_rejected() {
    let source = with_web(
        "[services.a]\nprocess = \"web\"\nport = 443\nhostnames = [\"ok.example.com\", \"localhost\", \"a_b.example.com\", 7]\n",
    );
    let errors = errors_of(&source);
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "services.a.hostnames[1]",
            "services.a.hostnames[2]",
            "services.a.hostnames[3]"
        ],
        "{errors:#?}"
    );
    let source = with_web(
        "[services.a]\nprocess = \"web\"\nport = 443\nhostnames = [\"localhost\", \"a_b.example.com\"]\n",
    );
    let errors = errors_of(&source);
    assert_eq!(errors.len(), 2);
    assert!(errors.iter().all(|e| e.code == ErrorCode::InvalidHostname));
    assert!(
        errors[0].message.contains("at least two labels"),
        "{}",
        errors[0].message
    );
}

#[test]
fn tcp_service_cannot_have_hostnames() {
    let source = with_web(
        "[services.db]\nprocess = \"web\"\nport = 5432\nprotocol = \"tcp\"\nhostnames = [\"db.example.com\"]\n",
    );
    let error = one_error(&source);
    assert_eq!(error.key, "services.db.hostnames");
    assert!(error.help.contains("dedicated address"));
}

#[test]
fn protocol_choices() {
    let error = one_error(&with_web(
        "[services.a]\nprocess = \"web\"\nport = 80\nprotocol = \"http\"\n",
    ));
    assert_eq!(error.message, "unknown value \"http\"");
    assert_eq!(error.help, "use one of: \"tls\" or \"tcp\"");
}

#[test]
fn durations_in_human_form() {
    let cases = [
        (
            "\"30\"",
            ErrorCode::InvalidDuration,
            "invalid duration \"30\": the number 30 has no unit; add one, such as \"30s\" (units: ms, s, m, h)",
        ),
        (
            "30",
            ErrorCode::WrongType,
            "expected a duration string, found an integer",
        ),
        (
            "\"1.5s\"",
            ErrorCode::InvalidDuration,
            "invalid duration \"1.5s\": fractions are not allowed; use a smaller unit, such as \"1500ms\" for 1.5 seconds",
        ),
        (
            "\"30sec\"",
            ErrorCode::InvalidDuration,
            "invalid duration \"30sec\": unknown unit \"sec\"; use ms, s, m or h, such as \"30s\" or \"2m\"",
        ),
        (
            "\"2h\"",
            ErrorCode::OutOfRange,
            "\"2h\" is outside the allowed range",
        ),
        (
            "\"0s\"",
            ErrorCode::OutOfRange,
            "\"0s\" is outside the allowed range",
        ),
    ];
    for (value, code, message) in cases {
        let error = one_error(&format!(
            "app = \"a\"\n[processes.web]\nkill_timeout = {value}\n"
        ));
        assert_eq!(error.code, code, "{value}");
        assert_eq!(error.message, message);
        assert!(error.help.contains("from 1s to 1h"), "{}", error.help);
    }
    let error = one_error("app = \"a\"\n[processes.web]\nkill_timeout = 30\n");
    assert!(
        error
            .help
            .starts_with("a bare number has no unit; quote it with a unit, such as \"30s\""),
        "{}",
        error.help
    );
}

#[test]
fn health_check_rules() {
    let service = |health: &str| {
        with_web(&format!(
            "[services.a]\nprocess = \"web\"\nport = 80\nprotocol = \"tcp\"\n\n[services.a.health]\n{health}\n"
        ))
    };

    let error = one_error(&service("path = \"/x\""));
    assert_eq!(error.message, "`path` applies only to HTTP health checks");

    let error = one_error(&service(
        "type = \"http\"\ninterval = \"5s\"\ntimeout = \"10s\"",
    ));
    assert_eq!(error.code, ErrorCode::Conflict);
    assert_eq!(error.key, "services.a.health.timeout");
    assert_eq!(
        error.message,
        "the timeout is longer than the interval (5s)"
    );

    let error = one_error(&service("timeout = \"11s\""));
    assert_eq!(
        error.message,
        "the timeout is longer than the interval (10s)"
    );

    let error = one_error(&service("type = \"http\"\npath = \"healthz\""));
    assert_eq!(error.message, "invalid HTTP path \"healthz\"");

    let error = one_error(&service("type = \"http\"\nexpected_status = 600"));
    assert_eq!(error.message, "600 is outside the allowed range 100 to 599");

    let error = one_error(&service("type = \"grpc\""));
    assert_eq!(error.help, "use one of: \"tcp\" or \"http\"");

    let error = one_error(&service("grace_period = \"2h\""));
    assert_eq!(error.code, ErrorCode::OutOfRange);

    assert!(
        Manifest::parse(&service(
            "grace_period = \"0s\"\ninterval = \"1s\"\ntimeout = \"500ms\""
        ))
        .is_ok()
    );
}

#[test]
fn env_var_rules() {
    let source = with_web(
        "[env]\nGOOD = \"1\"\nKILN_APP = \"x\"\n\"1BAD\" = \"x\"\nPORT = 8080\nNUL = \"a\\u0000b\"\n",
    );
    let errors = errors_of(&source);
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["env.KILN_APP", "env.1BAD", "env.PORT", "env.NUL"]);
    assert_eq!(
        errors[0].message,
        "environment variable KILN_APP uses the reserved prefix KILN_"
    );
    assert_eq!(
        errors[1].message,
        "invalid environment variable name \"1BAD\""
    );
    assert_eq!(errors[2].help, "quote the value, such as PORT = \"8080\"");
    assert!(errors[3].message.contains("NUL byte"));
}

#[test]
fn volume_rules() {
    let two = "app = \"a\"\n[processes.web]\n[processes.worker]\n\n";
    let error = one_error(&format!(
        "{two}[volumes.data]\npath = \"/data\"\nsize = 100\n"
    ));
    assert_eq!(error.code, ErrorCode::MissingKey);
    assert_eq!(error.key, "volumes.data.process");
    assert!(
        error.help.contains("several process types (web, worker)"),
        "{}",
        error.help
    );

    let error = one_error(&with_web("[volumes.data]\npath = \"data/\"\nsize = 100\n"));
    assert_eq!(
        error.message,
        "invalid mount path \"data/\": it is not absolute"
    );

    let error = one_error(&with_web(
        "[volumes.data]\npath = \"/run/kiln/x\"\nsize = 100\n",
    ));
    assert!(error.message.contains("guest system or kiln-init"));

    let error = one_error(&with_web("[volumes.data]\npath = \"/data\"\nsize = 8\n"));
    assert_eq!(error.message, "8 is below the minimum of 16 MiB");
    assert!(error.help.contains("ext4"));

    let error = one_error(&with_web("[volumes.data]\npath = \"/data\"\n"));
    assert_eq!(error.message, "missing required key `size`");
    assert_eq!(error.found, "data");

    let error = one_error(&with_web(
        "[volumes.a]\npath = \"/data\"\nsize = 100\n[volumes.b]\npath = \"/data\"\nsize = 100\n",
    ));
    assert_eq!(error.code, ErrorCode::Conflict);
    assert_eq!(
        error.message,
        "volume `a` is already mounted at \"/data\" in process type `web`"
    );

    let error = one_error(&with_web(
        "[volumes.a]\nprocess = \"db\"\npath = \"/data\"\nsize = 100\n",
    ));
    assert_eq!(error.code, ErrorCode::UnknownReference);
}

#[test]
fn deploy_rules() {
    let error = one_error(&with_web(
        "[deploy]\nstrategy = \"immediate\"\nmax_surge = 2\n",
    ));
    assert_eq!(error.code, ErrorCode::Conflict);
    assert_eq!(
        error.message,
        "max_surge applies only to the rolling strategy"
    );

    for value in ["0", "101", "\"0%\"", "\"150%\"", "\"half\""] {
        let errors = errors_of(&with_web(&format!("[deploy]\nmax_surge = {value}\n")));
        assert_eq!(errors.len(), 1, "{value}: {errors:#?}");
    }
    let error = one_error(&with_web("[deploy]\nstrategy = \"canary\"\n"));
    assert_eq!(error.help, "use one of: \"rolling\" or \"immediate\"");
}

#[test]
fn kill_signal_rules() {
    let error = one_error("app = \"a\"\n[processes.web]\nkill_signal = \"SIGKILL\"\n");
    assert!(
        error
            .message
            .starts_with("SIGKILL cannot be the kill signal"),
        "{}",
        error.message
    );
    let error = one_error("app = \"a\"\n[processes.web]\nkill_signal = \"sigterm\"\n");
    assert_eq!(error.message, "unknown signal \"sigterm\"");
    assert!(error.help.contains("\"SIGTERM\""));
    let manifest =
        Manifest::parse("app = \"a\"\n[processes.web]\nkill_signal = \"USR2\"\n").unwrap();
    assert_eq!(
        manifest.processes[&process("web")].kill_signal,
        Signal::Usr2
    );
}

#[test]
fn command_rules() {
    let cases = [
        ("command = []", "the command is empty"),
        ("command = [\"\"]", "the program (first element) is empty"),
        (
            "command = [\"/a\", \"b\\u0000\"]",
            "an argument contains a NUL byte, which no process argument can hold",
        ),
        (
            "command = \"/app/server --port 80\"",
            "expected an array of strings, found a string",
        ),
    ];
    for (line, message) in cases {
        let error = one_error(&format!("app = \"a\"\n[processes.web]\n{line}\n"));
        assert_eq!(error.message, message, "{line}");
    }
}

#[test]
fn startup_rules() {
    let source = format!(
        "{MINIMAL}[[startup]]\ntimeout = \"5s\"\n\n[[startup]]\ncommand = [\"/x\"]\nprocesses = [\"api\"]\nname = \"x\"\n"
    );
    let errors = errors_of(&source);
    let messages: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "missing required key `command`",
            "no process type \"api\" is defined",
            "unknown key `name`"
        ]
    );
    assert_eq!(errors[0].key, "startup[0].command");
    assert_eq!(errors[0].found, "[[startup]]");
    assert_eq!(errors[1].key, "startup[1].processes[0]");
}

#[test]
fn release_command_rules() {
    let source = format!("{MINIMAL}[release_command]\ntimeout = \"2d\"\n");
    let errors = errors_of(&source);
    let messages: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "missing required key `command`",
            "invalid duration \"2d\": unknown unit \"d\"; use ms, s, m or h, such as \"30s\" or \"2m\""
        ]
    );
}

#[test]
fn wrong_types_named() {
    let error = one_error("app = 7\n[processes.web]\n");
    assert_eq!(error.message, "expected a string, found an integer");
    let error = one_error("app = \"a\"\nprocesses = [\"web\"]\n");
    assert_eq!(error.message, "expected a table, found an array");
    let error = one_error("app = \"a\"\n[processes]\nweb = 1\n");
    assert_eq!(error.message, "expected a table, found an integer");
    let error = one_error(&format!("{MINIMAL}[startup]\ncommand = [\"/x\"]\n"));
    assert_eq!(error.message, "expected an array of tables, found a table");
    let error = one_error(&format!("startup = [1]\n{MINIMAL}"));
    assert_eq!(error.message, "expected an inline table, found an integer");
}

#[test]
fn syntax_error_positioned() {
    let error = one_error("app = \"a\"\n[processes.web\ncount = 1\n");
    assert_eq!(error.code, ErrorCode::Syntax);
    assert_eq!(error.line, 2);
    assert!(
        error.message.starts_with("invalid TOML: "),
        "{}",
        error.message
    );
}

#[test]
fn all_errors_collected() {
    let source = include_str!("../../tests/manifests/many-errors.toml");
    let errors = errors_of(source);
    assert!(errors.len() >= 15, "{errors:#?}");
    let mut sorted = errors.clone();
    sorted.sort_by_key(|e| e.span.start);
    assert_eq!(errors, sorted, "errors are ordered by position");
    for error in &errors {
        assert!(error.line > 0);
        assert!(error.column > 0);
        assert!(!error.help.is_empty(), "{error:?}");
        assert!(!error.key.is_empty(), "{error:?}");
        assert_eq!(
            source[error.span.clone()].lines().next().unwrap_or(""),
            error.found.trim_end_matches('…')
        );
    }
}

#[test]
fn error_serializes_for_api_details() {
    let error = one_error("app = \"a\"\n[processes.web]\nvcpus = 0\n");
    let json = serde_json::to_value(&error).unwrap();
    assert_eq!(json["code"], "manifest::out_of_range");
    assert_eq!(json["key"], "processes.web.vcpus");
    assert_eq!(json["line"], 3);
    assert_eq!(json["column"], 9);
    assert_eq!(json["found"], "0");
    assert_eq!(json["span"]["start"], 34);
    assert_eq!(json["span"]["end"], 35);
}

// The canonical form.

#[test]
fn canonical_json_round_trips() {
    let manifest = Manifest::parse(FULL).unwrap();
    let json = manifest.to_canonical_json();
    let back = Manifest::from_canonical_json(&json).unwrap();
    assert_eq!(back, manifest);
    assert_eq!(back.to_canonical_json(), json);

    let staging = manifest.resolve(&env("staging"));
    let json = staging.to_canonical_json();
    assert_eq!(
        ResolvedManifest::from_canonical_json(&json).unwrap(),
        staging
    );
}

#[test]
fn canonical_json_ignores_formatting() {
    let a = "app = \"hello\"\n[processes.web]\nmemory = \"1GiB\"\ncount = 2\n[env]\nB = \"2\"\nA = \"1\"\n";
    let b = "app = \"hello\" # same manifest, written differently\n\n[env]\nA = \"1\"\nB = \"2\"\n\n[processes]\nweb = { count = 2, memory = 1024, vcpus = 1 }\n";
    let a = Manifest::parse(a).unwrap();
    let b = Manifest::parse(b).unwrap();
    assert_eq!(a.to_canonical_json(), b.to_canonical_json());
    assert_eq!(a.digest(), b.digest());
    assert!(a.digest().starts_with("sha256:"));
    assert_eq!(a.digest().len(), "sha256:".len() + 64);
}

#[test]
fn digest_changes_with_content() {
    let a = Manifest::parse(MINIMAL).unwrap();
    let b =
        Manifest::parse(&MINIMAL.replace("[processes.web]", "[processes.web]\ncount = 2")).unwrap();
    assert_ne!(a.digest(), b.digest());
    let resolved = a.resolve(&env("prod"));
    assert_ne!(resolved.digest(), a.resolve(&env("staging")).digest());
}

#[test]
fn canonical_json_snapshot() {
    let manifest = Manifest::parse(FULL).unwrap();
    let json = String::from_utf8(manifest.resolve(&env("staging")).to_canonical_json()).unwrap();
    insta::assert_snapshot!("canonical_staging", json);
}

// Snapshots of the error texts.

fn render_graphical(errors: &ManifestErrors) -> String {
    let handler =
        miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
            .with_width(100)
            .with_links(false);
    let mut text = String::new();
    handler.render_report(&mut text, errors).unwrap();
    text
}

#[test]
fn snapshot_many_errors_plain() {
    let source = include_str!("../../tests/manifests/many-errors.toml");
    let errors = Manifest::parse(source).unwrap_err();
    insta::assert_snapshot!("many_errors_plain", errors.render_plain());
}

#[test]
fn snapshot_many_errors_graphical() {
    let source = include_str!("../../tests/manifests/many-errors.toml");
    let errors = Manifest::parse(source).unwrap_err();
    insta::assert_snapshot!("many_errors_graphical", render_graphical(&errors));
}

#[test]
fn snapshot_environment_errors() {
    let source = include_str!("../../tests/manifests/environment-errors.toml");
    let errors = Manifest::parse_named("examples/kiln.toml", source).unwrap_err();
    insta::assert_snapshot!(
        "environment_errors",
        format!("{errors}\n\n{}", errors.render_plain())
    );
}

#[test]
fn snapshot_syntax_errors() {
    let cases = [
        (
            "unclosed_header",
            "app = \"a\"\n[processes.web\ncount = 1\n",
        ),
        (
            "duplicate_process",
            "app = \"a\"\n[processes.web]\n[processes.worker]\n[processes.web]\n",
        ),
        ("bad_string", "app = \"a\n"),
    ];
    let mut text = String::new();
    for (name, source) in cases {
        let errors = Manifest::parse(source).unwrap_err();
        text.push_str(&format!("== {name}\n{}\n", render_graphical(&errors)));
    }
    insta::assert_snapshot!("syntax_errors", text);
}

// Inputs that must never panic.

fn example_lines() -> Vec<&'static str> {
    FULL.lines().collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_text_never_panics(source in "\\PC{0,400}") {
        let _ = Manifest::parse(&source);
    }

    #[test]
    fn shuffled_manifest_lines_never_panic(
        picks in proptest::collection::vec(0usize..1000, 0..60),
    ) {
        let lines = example_lines();
        let source: Vec<&str> = picks.iter().map(|i| lines[i % lines.len()]).collect();
        let source = source.join("\n");
        if let Err(errors) = Manifest::parse(&source) {
            for error in &errors.errors {
                prop_assert!(error.span.end <= source.len());
                prop_assert!(source.is_char_boundary(error.span.start));
                prop_assert!(source.is_char_boundary(error.span.end));
            }
            let _ = errors.render_plain();
            let _ = render_graphical(&errors);
        }
    }

    #[test]
    fn mutated_manifest_never_panics(
        start in 0usize..2000,
        len in 0usize..40,
        insert in "\\PC{0,20}",
    ) {
        let mut source = FULL.to_owned();
        let mut start = start % source.len();
        while !source.is_char_boundary(start) {
            start -= 1;
        }
        let mut end = (start + len).min(source.len());
        while !source.is_char_boundary(end) {
            end += 1;
        }
        source.replace_range(start..end, &insert);
        match Manifest::parse(&source) {
            Ok(manifest) => {
                let json = manifest.to_canonical_json();
                prop_assert_eq!(Manifest::from_canonical_json(&json).ok(), Some(manifest));
            }
            Err(errors) => {
                prop_assert!(!errors.errors.is_empty());
                let _ = render_graphical(&errors);
            }
        }
    }
}
