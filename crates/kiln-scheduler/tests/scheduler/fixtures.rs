//! Builders for hosts, instances and releases with readable, deterministic ids.

use kiln_core::{EnvId, HostId, InstanceId, ProcessName, ReleaseId};
use kiln_scheduler::{Host, HostState, PlacedInstance, Resources};
use uuid::Uuid;

/// Host id `n`; ids sort by `n`.
pub(crate) fn host_id(n: u128) -> HostId {
    HostId::from_uuid(Uuid::from_u128(0x1000_0000 + n))
}

/// Instance id `n`; ids sort by `n`.
pub(crate) fn instance_id(n: u128) -> InstanceId {
    InstanceId::from_uuid(Uuid::from_u128(0x2000_0000 + n))
}

/// Env id `n`.
pub(crate) fn env_id(n: u128) -> EnvId {
    EnvId::from_uuid(Uuid::from_u128(0x3000_0000 + n))
}

/// Release id `n`.
pub(crate) fn release_id(n: u128) -> ReleaseId {
    ReleaseId::from_uuid(Uuid::from_u128(0x4000_0000 + n))
}

pub(crate) fn process(name: &str) -> ProcessName {
    ProcessName::new(name).expect("test process names are valid labels")
}

pub(crate) fn resources(memory_mib: u64, vcpus: u32) -> Resources {
    Resources { memory_mib, vcpus }
}

/// Ready host `h{n}`.
pub(crate) fn host(n: u128, memory_mib: u64, cpus: u32) -> Host {
    Host {
        id: host_id(n),
        name: format!("h{n}"),
        memory_mib,
        cpus,
        state: HostState::Ready,
    }
}

pub(crate) fn placed(
    n: u128,
    env: EnvId,
    process_name: &str,
    host: HostId,
    resources: Resources,
) -> PlacedInstance {
    PlacedInstance {
        id: instance_id(n),
        env,
        process: process(process_name),
        host,
        resources,
    }
}
