//! Releases: immutable, numbered per environment (v1, v2, ...). A release fixes the image
//! digest, the resolved manifest of its environment ([`ReleaseSpec`]) and the config version.
//!
//! The CLI resolves `kiln.toml` (with the environment's overrides applied) into a
//! [`ReleaseSpec`], so the server stores one explicit wire format independent of the file
//! format.

use std::collections::BTreeMap;

use kiln_core::{EnvId, Hostname, ProcessName, ReleaseId};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// An OCI image pinned by digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    /// Reference the user gave, such as `registry.example/app:1.2` (for display and pulls).
    pub reference: String,
    /// Manifest digest, `sha256:` followed by 64 lowercase hex characters.
    pub digest: String,
}

/// One process type of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// Argv to run; empty runs the image's entrypoint and cmd.
    #[serde(default)]
    pub command: Vec<String>,
    /// Number of instances.
    pub count: u32,
    /// Virtual CPUs per instance, 1 to 32.
    pub vcpus: u32,
    /// Memory per instance in MiB, 128 to 65536.
    pub memory_mib: u32,
    /// Signal that stops this process type's instances, in place of the release's
    /// `kill_signal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_signal: Option<String>,
    /// Seconds between the signal and a forced stop for this process type, in place of the
    /// release's `kill_timeout_secs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_timeout_secs: Option<u32>,
}

/// Transport of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ServiceProtocol {
    /// TLS routed by SNI on the shared ingress addresses; the tenant terminates TLS.
    Tls,
    /// Raw TCP on the environment's dedicated IPv6 address.
    Tcp,
}

/// Health check of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// How to probe.
    pub kind: HealthCheckKind,
    /// Seconds between probes.
    pub interval_secs: u32,
    /// Seconds before one probe counts as failed.
    pub timeout_secs: u32,
    /// Seconds after boot during which failures do not count.
    pub grace_period_secs: u32,
}

/// How a health check probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HealthCheckKind {
    /// A TCP connect to the service port succeeds.
    Tcp,
    /// An HTTP GET of `path` on the service port returns `expected_status`, or any 2xx or 3xx
    /// status when none is set.
    Http {
        /// Request path, starting with `/`.
        path: String,
        /// The status that counts as healthy, 100 to 599; absent accepts any 2xx or 3xx.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expected_status: Option<u16>,
        /// Whether the request goes over TLS. The certificate is not verified, because it
        /// names the public hostname and not the instance address.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        tls: bool,
    },
}

/// A service: a port of a process type that the ingress exposes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Name of the service, unique within the release.
    pub name: String,
    /// The process type that listens.
    pub process: ProcessName,
    /// Port the process listens on inside the microVM, 1 to 65535.
    pub internal_port: u16,
    /// Transport.
    pub protocol: ServiceProtocol,
    /// Extra hostnames routed to this service besides the platform hostname.
    #[serde(default)]
    pub hostnames: Vec<Hostname>,
    /// Whether the ingress prepends a PROXY protocol v2 header.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Health check; absent means a TCP connect check with default timings.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
}

/// A volume mounted into instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// Name of the volume.
    pub name: String,
    /// Absolute mount path inside the guest.
    pub mount_path: String,
    /// Size in MiB.
    pub size_mib: u32,
}

/// How a deploy replaces instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum DeployStrategy {
    /// Start new instances, wait until healthy, shift routes, drain old ones.
    #[default]
    Rolling,
    /// Stop old instances and start new ones at once.
    Immediate,
}

/// The resolved manifest of one environment, as a release records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ReleaseSpec {
    /// Process types by name.
    pub processes: BTreeMap<ProcessName, ProcessSpec>,
    /// Services exposed through the ingress.
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Environment variables from the manifest (config vars override them).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Volumes.
    #[serde(default)]
    pub volumes: Vec<VolumeSpec>,
    /// Deploy strategy.
    #[serde(default)]
    pub strategy: DeployStrategy,
    /// Extra instances a rolling deploy may start per process type.
    #[serde(default = "default_max_surge")]
    pub max_surge: u32,
    /// Signal sent to stop an instance, such as `SIGTERM`.
    #[serde(default = "default_kill_signal")]
    pub kill_signal: String,
    /// Seconds between the kill signal and a forced stop.
    #[serde(default = "default_kill_timeout")]
    pub kill_timeout_secs: u32,
    /// Scripts run inside the microVM, in order, before the workload.
    #[serde(default, deserialize_with = "startup_scripts")]
    pub startup_scripts: Vec<StartupScript>,
    /// Command run once per release in its own microVM before the rollout.
    #[serde(default)]
    pub release_command: Option<Vec<String>>,
    /// Timeout and size of the release command's microVM; absent uses
    /// [`ReleaseCommandLimits::default`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_command_limits: Option<ReleaseCommandLimits>,
}

/// A script run inside the microVM before the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct StartupScript {
    /// Shell command, run with `/bin/sh -c` as root.
    pub command: String,
    /// Seconds the script may run before it is killed and the instance fails to start;
    /// absent lets it run as long as it takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u32>,
    /// Process types it runs for; empty means every process type and the release command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<ProcessName>,
}

impl StartupScript {
    /// Returns true when the script runs before instances of `process`.
    pub fn applies_to(&self, process: &ProcessName) -> bool {
        self.processes.is_empty() || self.processes.contains(process)
    }
}

/// Reads startup scripts, accepting the bare command strings that releases stored before
/// scripts had a timeout and process types.
fn startup_scripts<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<StartupScript>, D::Error> {
    /// A script as a bare command string or as a table. Unlike an untagged enum, an invalid
    /// table keeps its own error, which names the field.
    struct Stored(StartupScript);

    impl<'de> Deserialize<'de> for Stored {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_any(StoredVisitor)
        }
    }

    struct StoredVisitor;

    impl<'de> serde::de::Visitor<'de> for StoredVisitor {
        type Value = Stored;

        fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            formatter.write_str("a startup script: a command string or a table with `command`")
        }

        fn visit_str<E: serde::de::Error>(self, command: &str) -> Result<Stored, E> {
            Ok(Stored(StartupScript {
                command: command.to_owned(),
                timeout_secs: None,
                processes: Vec::new(),
            }))
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Stored, A::Error> {
            StartupScript::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                .map(Stored)
        }
    }

    let stored = Vec::<Stored>::deserialize(deserializer)?;
    Ok(stored.into_iter().map(|Stored(script)| script).collect())
}

/// Timeout and size of the microVM that runs a release command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ReleaseCommandLimits {
    /// Time the command gets to exit 0, in seconds. Default 600.
    pub timeout_secs: u64,
    /// Virtual CPUs. Default 1.
    pub vcpus: u32,
    /// Guest memory in MiB. Default 512.
    pub memory_mib: u32,
}

impl Default for ReleaseCommandLimits {
    fn default() -> Self {
        Self {
            timeout_secs: 600,
            vcpus: 1,
            memory_mib: 512,
        }
    }
}

fn default_max_surge() -> u32 {
    1
}

fn default_kill_signal() -> String {
    "SIGTERM".to_owned()
}

fn default_kill_timeout() -> u32 {
    30
}

/// A release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Release {
    /// Id of the release.
    pub id: ReleaseId,
    /// The environment it belongs to.
    pub env_id: EnvId,
    /// Number within the environment, from 1.
    pub version: u64,
    /// The image.
    pub image: ImageRef,
    /// The resolved manifest.
    pub spec: ReleaseSpec,
    /// Config version the release was cut with.
    pub config_version: u64,
    /// For a rollback: the release whose image and config this one repeats.
    #[serde(default)]
    pub rollback_of: Option<ReleaseId>,
    /// Free-form description, such as a commit message.
    #[serde(default)]
    pub description: String,
    /// When the release was created.
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "schema", schemars(schema_with = "crate::schema::timestamp"))]
    pub created_at: OffsetDateTime,
}

/// Body of `POST .../envs/{env}/releases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateRelease {
    /// The image, pinned by digest.
    pub image: ImageRef,
    /// The resolved manifest.
    pub spec: ReleaseSpec,
    /// Free-form description.
    #[serde(default)]
    pub description: String,
}

#[cfg(test)]
mod startup_script_tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Scripts {
        #[serde(deserialize_with = "startup_scripts")]
        scripts: Vec<StartupScript>,
    }

    #[test]
    fn startup_scripts_read_strings_and_tables() {
        let parsed: Scripts = serde_json::from_value(serde_json::json!({
            "scripts": ["echo old", {"command": "echo new", "timeout_secs": 5}],
        }))
        .unwrap();
        assert_eq!(parsed.scripts[0].command, "echo old");
        assert_eq!(parsed.scripts[0].timeout_secs, None);
        assert_eq!(parsed.scripts[1].timeout_secs, Some(5));
    }

    #[test]
    fn startup_script_typo_names_field() {
        let error = serde_json::from_value::<Scripts>(serde_json::json!({
            "scripts": [{"command": "echo", "timeout": 5}],
        }))
        .unwrap_err();
        assert!(
            error.to_string().contains("unknown field `timeout`"),
            "{error}"
        );
    }
}
