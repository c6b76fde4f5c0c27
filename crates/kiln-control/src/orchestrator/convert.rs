//! Translations between the API's records and the scheduler's inputs and outputs.
//!
//! The scheduler crate knows nothing of the API, so the orchestrator converts at this one
//! boundary: hosts and releases in, plan steps out.

use std::collections::BTreeMap;

use kiln_api::{DeployStrategy, HostState as ApiHostState, InstanceState, PlanAction, PlanStep};
use kiln_core::{HostId, InstanceId, ProcessName, ReleaseId};
use kiln_scheduler::plan::{Action, Plan, ProcessSpec, ReleaseCommandSpec, ReleaseSpec, Strategy};
use kiln_scheduler::progress::Observed;
use kiln_scheduler::{Host, HostState, Resources};

/// The scheduler's view of a host, or `None` for a host that has not registered its capacity.
pub fn scheduler_host(host: &kiln_api::Host) -> Option<Host> {
    let capacity = host.capacity?;
    let state = match host.state {
        ApiHostState::Pending => return None,
        ApiHostState::Ready => HostState::Ready,
        ApiHostState::Cordoned => HostState::Cordoned,
        ApiHostState::Draining => HostState::Draining,
        ApiHostState::Lost => HostState::Dead,
    };
    Some(Host {
        id: host.id,
        name: host.name.clone(),
        memory_mib: capacity.memory_mib,
        cpus: capacity.vcpus,
        state,
    })
}

/// The planner's view of a release, with the env's scale overriding the manifest's counts.
pub fn planner_release(
    id: ReleaseId,
    release: &kiln_api::ReleaseSpec,
    scale: &BTreeMap<ProcessName, u32>,
) -> ReleaseSpec {
    let processes = release
        .processes
        .iter()
        .map(|(name, spec)| {
            let routed = release
                .services
                .iter()
                .any(|service| &service.process == name);
            let spec = ProcessSpec {
                count: scale.get(name).copied().unwrap_or(spec.count),
                resources: Resources {
                    memory_mib: u64::from(spec.memory_mib),
                    vcpus: spec.vcpus,
                },
                routed,
            };
            (name.clone(), spec)
        })
        .collect();

    let release_command = release.release_command.as_ref().map(|_| {
        let limits = release.release_command_limits.unwrap_or_default();
        ReleaseCommandSpec {
            resources: release_command_resources(release),
            timeout_secs: limits.timeout_secs,
        }
    });

    ReleaseSpec {
        id,
        processes,
        release_command,
    }
}

/// Resources of the one-off microVM that runs the release command of `release`.
pub fn release_command_resources(release: &kiln_api::ReleaseSpec) -> Resources {
    let limits = release.release_command_limits.unwrap_or_default();
    Resources {
        memory_mib: u64::from(limits.memory_mib),
        vcpus: limits.vcpus,
    }
}

/// The planner's strategy for a release's deploy strategy and max surge.
pub fn planner_strategy(strategy: DeployStrategy, max_surge: u32) -> Strategy {
    match strategy {
        DeployStrategy::Rolling => Strategy::Rolling { max_surge },
        DeployStrategy::Immediate => Strategy::Immediate,
    }
}

/// What the orchestrator observes from an instance's last reported state.
pub fn observed(state: InstanceState, exit_code: Option<i32>, detail: Option<String>) -> Observed {
    match state {
        InstanceState::Pending | InstanceState::Preparing | InstanceState::Booting => {
            Observed::Starting
        }
        InstanceState::Running => Observed::Running,
        InstanceState::Healthy => Observed::Healthy,
        InstanceState::Unhealthy | InstanceState::Stopping => Observed::Unhealthy,
        InstanceState::Exited => Observed::Exited { code: exit_code },
        InstanceState::Failed => Observed::Failed { detail },
    }
}

/// The API's form of a plan's steps, with hosts by name. `host_names` turns host ids into the
/// names operators know (an unknown host is shown by id), and `old_hosts` gives the host of
/// each instance that ran before the plan.
pub fn api_steps(
    plan: &Plan,
    host_names: &BTreeMap<HostId, String>,
    old_hosts: &BTreeMap<InstanceId, HostId>,
) -> Vec<PlanStep> {
    let host_name = |host: &HostId| {
        host_names
            .get(host)
            .cloned()
            .unwrap_or_else(|| host.to_string())
    };
    let instance_hosts: BTreeMap<InstanceId, HostId> = plan
        .started_instances()
        .map(|instance| (instance.id, instance.host))
        .collect();

    let mut steps = Vec::with_capacity(plan.steps.len());
    for step in &plan.steps {
        let mut actions = Vec::new();
        for action in &step.actions {
            match action {
                Action::RunReleaseCommand {
                    instance,
                    timeout_secs,
                } => actions.push(PlanAction::RunReleaseCommand {
                    instance_id: instance.id,
                    host: host_name(&instance.host),
                    timeout_secs: *timeout_secs,
                }),
                Action::StartInstances { instances } => {
                    actions.extend(instances.iter().map(|instance| PlanAction::StartInstance {
                        instance_id: instance.id,
                        process: instance.process.clone(),
                        release_id: instance.release,
                        host: host_name(&instance.host),
                    }));
                }
                Action::WaitHealthy {
                    instances,
                    deadline_secs,
                } => actions.push(PlanAction::WaitHealthy {
                    instances: instances.clone(),
                    deadline_secs: *deadline_secs,
                }),
                Action::UpdateRoutes {
                    process,
                    add,
                    remove,
                } => actions.push(PlanAction::UpdateRoutes {
                    process: process.clone(),
                    add: add.clone(),
                    remove: remove.clone(),
                }),
                Action::StopInstances {
                    instances,
                    grace_secs,
                } => {
                    actions.extend(instances.iter().map(|instance| {
                        let host = old_hosts
                            .get(instance)
                            .or_else(|| instance_hosts.get(instance))
                            .copied();
                        PlanAction::StopInstance {
                            instance_id: *instance,
                            host: host
                                .map_or_else(|| "unknown".to_owned(), |host| host_name(&host)),
                            grace_secs: *grace_secs,
                        }
                    }));
                }
                Action::SetRelease { release } => actions.push(PlanAction::SetRelease {
                    release_id: *release,
                }),
                Action::SetScale { counts } => actions.push(PlanAction::SetScale {
                    counts: counts.clone(),
                }),
            }
        }
        steps.push(PlanStep {
            name: step.name.clone(),
            actions,
        });
    }
    steps
}

#[cfg(test)]
mod tests {
    use kiln_api::{HostCapacity, ImageRef, Release, ServiceProtocol, ServiceSpec};
    use kiln_core::EnvId;
    use time::OffsetDateTime;

    use super::*;

    fn api_host(state: ApiHostState, capacity: Option<HostCapacity>) -> kiln_api::Host {
        kiln_api::Host {
            id: HostId::new(),
            name: "h1".to_owned(),
            state,
            capacity,
            driver: None,
            overlay_public_key: None,
            overlay_endpoint: None,
            ipv6_prefix: None,
            lease_expires_at: None,
            created_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn lost_host_is_dead() {
        let capacity = HostCapacity {
            vcpus: 8,
            memory_mib: 16384,
        };
        let host = scheduler_host(&api_host(ApiHostState::Lost, Some(capacity))).unwrap();
        assert_eq!(host.state, HostState::Dead);
        assert_eq!(host.memory_mib, 16384);
        assert_eq!(host.cpus, 8);
    }

    #[test]
    fn unregistered_host_skipped() {
        assert_eq!(scheduler_host(&api_host(ApiHostState::Ready, None)), None);
        let capacity = HostCapacity {
            vcpus: 8,
            memory_mib: 16384,
        };
        assert_eq!(
            scheduler_host(&api_host(ApiHostState::Pending, Some(capacity))),
            None
        );
    }

    #[test]
    fn release_scale_overrides_counts() {
        let web = ProcessName::new("web").unwrap();
        let worker = ProcessName::new("worker").unwrap();
        let process = |count| kiln_api::ProcessSpec {
            command: Vec::new(),
            count,
            vcpus: 1,
            memory_mib: 256,
            kill_signal: None,
            kill_timeout_secs: None,
        };
        let release = Release {
            id: ReleaseId::new(),
            env_id: EnvId::new(),
            version: 1,
            image: ImageRef {
                reference: "registry.test/app:1".to_owned(),
                digest: format!("sha256:{}", "0".repeat(64)),
            },
            spec: kiln_api::ReleaseSpec {
                processes: BTreeMap::from([
                    (web.clone(), process(2)),
                    (worker.clone(), process(1)),
                ]),
                services: vec![ServiceSpec {
                    name: "http".to_owned(),
                    process: web.clone(),
                    internal_port: 8080,
                    protocol: ServiceProtocol::Tls,
                    hostnames: Vec::new(),
                    proxy_protocol: false,
                    health_check: None,
                }],
                env: BTreeMap::new(),
                volumes: Vec::new(),
                strategy: DeployStrategy::Rolling,
                max_surge: 1,
                kill_signal: "SIGTERM".to_owned(),
                kill_timeout_secs: 30,
                startup_scripts: Vec::new(),
                release_command: Some(vec!["migrate".to_owned()]),
                release_command_limits: Some(kiln_api::ReleaseCommandLimits {
                    timeout_secs: 30,
                    vcpus: 2,
                    memory_mib: 256,
                }),
            },
            config_version: 1,
            rollback_of: None,
            description: String::new(),
            created_at: OffsetDateTime::UNIX_EPOCH,
        };

        let spec = planner_release(
            release.id,
            &release.spec,
            &BTreeMap::from([(worker.clone(), 5)]),
        );
        assert_eq!(spec.processes[&web].count, 2);
        assert_eq!(spec.processes[&worker].count, 5);
        assert!(spec.processes[&web].routed);
        assert!(!spec.processes[&worker].routed);
        let command = spec.release_command.unwrap();
        assert_eq!(command.timeout_secs, 30);
        assert_eq!(
            command.resources,
            Resources {
                memory_mib: 256,
                vcpus: 2
            }
        );
    }

    #[test]
    fn failed_report_observed_as_failed() {
        assert_eq!(
            observed(
                InstanceState::Failed,
                Some(1),
                Some("boot failed".to_owned())
            ),
            Observed::Failed {
                detail: Some("boot failed".to_owned())
            }
        );
        assert_eq!(
            observed(InstanceState::Exited, Some(0), None),
            Observed::Exited { code: Some(0) }
        );
    }
}
