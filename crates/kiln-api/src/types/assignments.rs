//! Assignments: what a host must run. An agent keeps its host's complete desired set, built
//! from one complete response and the changes after it, and reconciles against the whole set,
//! so a lost update cannot leave a microVM running that should not.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use kiln_core::{AppId, AppName, EnvId, EnvName, HostId, InstanceId, OrgId, OrgName};
use kiln_core::{ProcessName, ReleaseId};
use serde::{Deserialize, Serialize};

use super::instances::DesiredState;
use super::releases::{HealthCheck, ImageRef, ServiceProtocol, StartupScript, VolumeSpec};

/// A port a process listens on, with its health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ServicePort {
    /// Service name.
    pub service: String,
    /// Port inside the microVM.
    pub port: u16,
    /// Transport.
    pub protocol: ServiceProtocol,
    /// Health check; `null` means a TCP connect check with default timings.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
}

/// Network identity of an instance, decided by the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct InstanceNetwork {
    /// The instance's /128 inside the host's /64.
    pub ipv6: Ipv6Addr,
    /// The host's /64.
    pub ipv6_prefix: String,
    /// The instance's private IPv4 from 100.64.0.0/10.
    pub ipv4: Ipv4Addr,
}

/// One instance a host must run (or stop), with everything the agent needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Assignment {
    /// The instance.
    pub instance_id: InstanceId,
    /// Org id.
    pub org_id: OrgId,
    /// Org name.
    pub org: OrgName,
    /// App id.
    pub app_id: AppId,
    /// App name.
    pub app: AppName,
    /// Environment id.
    pub env_id: EnvId,
    /// Environment name.
    pub env: EnvName,
    /// Release id.
    pub release_id: ReleaseId,
    /// Release version within the environment.
    pub release_version: u64,
    /// Process type.
    pub process: ProcessName,
    /// Image pinned by digest.
    pub image: ImageRef,
    /// Argv; empty runs the image's entrypoint and cmd.
    pub command: Vec<String>,
    /// Environment variables: the manifest's, overridden by the config vars.
    pub env_vars: BTreeMap<String, String>,
    /// Version of the environment's secret set that the instance's release was made with
    /// (0: no secrets). The instance gets those secrets, so an agent may cache them by it.
    pub secrets_version: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Addresses.
    pub network: InstanceNetwork,
    /// Service ports of this process type.
    pub ports: Vec<ServicePort>,
    /// Volumes.
    pub volumes: Vec<VolumeSpec>,
    /// Signal sent to stop the workload.
    pub kill_signal: String,
    /// Seconds between the kill signal and a forced stop.
    pub kill_timeout_secs: u32,
    /// The environment's platform hostname, which HTTPS health checks send as SNI; absent
    /// from control planes that predate it.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Scripts run inside the microVM before the workload: the release's scripts that apply
    /// to this instance's process type, in order.
    pub startup_scripts: Vec<StartupScript>,
    /// Whether to run or stop it.
    pub desired: DesiredState,
    /// Runs once, as a release command: not health-checked and not restarted. Its exit code
    /// and last output lines are reported when it exits, and then it is cleaned up.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub run_once: bool,
}

/// Query of `GET /v1/host/assignments`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AssignmentsQuery {
    /// Return changes after this cursor (an event `seq`); 0 or absent starts from the
    /// beginning.
    #[serde(default)]
    pub after: Option<u64>,
    /// Seconds to wait for a change when there is none yet; 0 or absent returns at once.
    /// Capped at [`crate::MAX_WAIT_SECS`].
    #[serde(default)]
    pub wait: Option<u64>,
    /// Return only the assignments that changed after `after`, and the instances no longer
    /// assigned, instead of the complete set. The control plane may still return the complete
    /// set (`complete` is then true), for example when `after` is 0 or far behind.
    #[serde(default, deserialize_with = "query_flag")]
    #[cfg_attr(feature = "schema", schemars(with = "Option<bool>"))]
    pub changes: Option<bool>,
}

/// Reads a yes/no query parameter, which arrives as text (`true`, `false`) or, from a JSON
/// body or a number-typed query reader, as a boolean or `1`/`0`.
fn query_flag<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Bool(bool),
        Number(u64),
        Text(String),
    }
    match Option::<Flag>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Flag::Bool(value)) => Ok(Some(value)),
        Some(Flag::Number(0)) => Ok(Some(false)),
        Some(Flag::Number(1)) => Ok(Some(true)),
        Some(Flag::Text(text)) if text == "true" => Ok(Some(true)),
        Some(Flag::Text(text)) if text == "false" => Ok(Some(false)),
        Some(_) => Err(serde::de::Error::custom("expected true, false, 1 or 0")),
    }
}

/// Result of `GET /v1/host/assignments`: the host's desired set at a cursor, complete or as
/// the changes after the request's `after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HostAssignments {
    /// The host.
    pub host_id: HostId,
    /// Pass as `after` to wait for the next change.
    pub cursor: u64,
    /// True when `assignments` contains every instance placed on the host that is not yet
    /// removed. False when it contains only those that changed after the request's `after`,
    /// and `removed` then names the instances no longer assigned.
    #[serde(default = "complete_by_default")]
    pub complete: bool,
    /// The assignments: all of them, or the changed ones (see `complete`).
    pub assignments: Vec<Assignment>,
    /// Instances that left the host's set after the request's `after`; empty when `complete`.
    /// It may name an instance the client never received (one placed and removed in between),
    /// which the client ignores.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<InstanceId>,
}

/// Sets saved or sent before `complete` existed were always complete.
fn complete_by_default() -> bool {
    true
}

impl HostAssignments {
    /// Brings this complete set up to date with `page`, the response to a request for changes
    /// after this set's cursor. A complete page replaces the set. A page of changes replaces
    /// the assignments it names and drops the removed instances, keeping the set's order with
    /// new instances at the end.
    pub fn apply(&mut self, page: HostAssignments) {
        self.host_id = page.host_id;
        self.cursor = page.cursor;
        self.complete = true;
        self.removed.clear();
        if page.complete {
            self.assignments = page.assignments;
            return;
        }

        let removed: HashSet<InstanceId> = page.removed.into_iter().collect();
        self.assignments
            .retain(|assignment| !removed.contains(&assignment.instance_id));
        let mut positions: HashMap<InstanceId, usize> = self
            .assignments
            .iter()
            .enumerate()
            .map(|(position, assignment)| (assignment.instance_id, position))
            .collect();
        for changed in page.assignments {
            match positions.get(&changed.instance_id) {
                Some(&position) => self.assignments[position] = changed,
                None => {
                    positions.insert(changed.instance_id, self.assignments.len());
                    self.assignments.push(changed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(release_version: u64) -> Assignment {
        Assignment {
            instance_id: InstanceId::new(),
            org_id: OrgId::new(),
            org: "acme".parse().unwrap(),
            app_id: AppId::new(),
            app: "web".parse().unwrap(),
            env_id: EnvId::new(),
            env: "prod".parse().unwrap(),
            release_id: ReleaseId::new(),
            release_version,
            process: "web".parse().unwrap(),
            image: ImageRef {
                reference: "registry.test/web:1".to_owned(),
                digest: format!("sha256:{}", "a".repeat(64)),
            },
            command: Vec::new(),
            env_vars: BTreeMap::new(),
            secrets_version: 0,
            vcpus: 1,
            memory_mib: 128,
            network: InstanceNetwork {
                ipv6: "fd00::2".parse().unwrap(),
                ipv6_prefix: "fd00::/64".to_owned(),
                ipv4: "100.64.0.2".parse().unwrap(),
            },
            ports: Vec::new(),
            volumes: Vec::new(),
            kill_signal: "SIGTERM".to_owned(),
            kill_timeout_secs: 10,
            hostname: None,
            startup_scripts: Vec::new(),
            desired: DesiredState::Running,
            run_once: false,
        }
    }

    fn page(cursor: u64, complete: bool, assignments: Vec<Assignment>) -> HostAssignments {
        HostAssignments {
            host_id: HostId::new(),
            cursor,
            complete,
            assignments,
            removed: Vec::new(),
        }
    }

    #[test]
    fn changes_replace_add_and_remove_in_order() {
        let (a, b, c) = (assignment(1), assignment(1), assignment(1));
        let mut set = page(10, true, vec![a.clone(), b.clone(), c.clone()]);

        let mut newer_b = b.clone();
        newer_b.release_version = 2;
        let d = assignment(1);
        let mut changes = page(20, false, vec![d.clone(), newer_b.clone()]);
        changes.removed = vec![a.instance_id];
        set.apply(changes);

        assert_eq!(set.cursor, 20);
        assert!(set.complete);
        assert!(set.removed.is_empty());
        assert_eq!(set.assignments, vec![newer_b, c, d]);
    }

    #[test]
    fn complete_page_replaces_the_set() {
        let mut set = page(10, true, vec![assignment(1), assignment(1)]);
        let only = assignment(3);
        set.apply(page(30, true, vec![only.clone()]));
        assert_eq!(set.assignments, vec![only]);
        assert_eq!(set.cursor, 30);
    }

    #[test]
    fn empty_changes_move_only_the_cursor() {
        let a = assignment(1);
        let mut set = page(10, true, vec![a.clone()]);
        set.apply(page(11, false, Vec::new()));
        assert_eq!(set.assignments, vec![a]);
        assert_eq!(set.cursor, 11);
    }

    #[test]
    fn removing_an_unknown_instance_changes_nothing() {
        let a = assignment(1);
        let mut set = page(10, true, vec![a.clone()]);
        let mut changes = page(12, false, Vec::new());
        changes.removed = vec![InstanceId::new()];
        set.apply(changes);
        assert_eq!(set.assignments, vec![a]);
    }

    #[test]
    fn sets_saved_without_complete_read_as_complete() {
        let json = serde_json::json!({
            "host_id": HostId::new(),
            "cursor": 5,
            "assignments": [],
        });
        let set: HostAssignments = serde_json::from_value(json).unwrap();
        assert!(set.complete);
        assert!(set.removed.is_empty());
    }

    #[test]
    fn changes_flag_reads_text_bool_and_digit() {
        let read = |value: serde_json::Value| {
            serde_json::from_value::<AssignmentsQuery>(serde_json::json!({ "changes": value }))
                .map(|query| query.changes)
        };
        assert_eq!(read(serde_json::json!("true")).unwrap(), Some(true));
        assert_eq!(read(serde_json::json!("false")).unwrap(), Some(false));
        assert_eq!(read(serde_json::json!(true)).unwrap(), Some(true));
        assert_eq!(read(serde_json::json!(1)).unwrap(), Some(true));
        assert_eq!(read(serde_json::json!(0)).unwrap(), Some(false));
        assert_eq!(read(serde_json::Value::Null).unwrap(), None);
        for bad in [
            serde_json::json!("maybe"),
            serde_json::json!(2),
            serde_json::json!("TRUE"),
        ] {
            let error = read(bad.clone()).unwrap_err().to_string();
            assert!(
                error.contains("expected true, false, 1 or 0"),
                "{bad}: {error}"
            );
        }
    }
}
