//! The scheduler core: decides which host each new instance runs on.
//!
//! Rules, in the order they are applied to each instance:
//!
//! 1. Only hosts in the `ready` state are candidates; cordoned, draining and dead hosts get
//!    nothing.
//! 2. Memory is a hard cap: guest memory plus the per-VM overhead must fit under the host's
//!    memory minus its reserve, counting every instance already on the host.
//! 3. CPU is oversubscribed: a host offers `cpus * ratio` vCPUs.
//! 4. Among the hosts that fit, the one with the fewest replicas of the same env and process
//!    type wins, so replicas spread across hosts as far as capacity allows; then the host with
//!    the most free memory; then the lowest host id.
//!
//! Hosts are kept sorted by id and every tie is broken by id, so the same snapshot and request
//! always give the same placements. Hash maps are used for lookups only, never iterated.

use std::collections::HashMap;
use std::fmt;

use kiln_core::{EnvId, HostId, InstanceId, ProcessName};
use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterSnapshot, HostState, Resources};

/// Default per-VM memory overhead in MiB: the VMM process, its page tables and device buffers.
pub const DEFAULT_VM_OVERHEAD_MIB: u64 = 64;

/// Default memory kept back on every host for the agent, the page cache and the kernel, in MiB.
pub const DEFAULT_HOST_RESERVE_MIB: u64 = 1024;

/// Default CPU oversubscription ratio: a host offers four vCPUs per CPU thread.
pub const DEFAULT_CPU_OVERSUBSCRIPTION: u32 = 4;

/// Scheduler settings shared by every placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Memory each microVM costs beyond its guest memory, in MiB. Default 64.
    pub vm_overhead_mib: u64,
    /// Memory of every host that instances never get, in MiB. Default 1024.
    pub host_reserve_mib: u64,
    /// vCPUs offered per host CPU thread; 1 disables oversubscription. Default 4.
    pub cpu_oversubscription: u32,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            vm_overhead_mib: DEFAULT_VM_OVERHEAD_MIB,
            host_reserve_mib: DEFAULT_HOST_RESERVE_MIB,
            cpu_oversubscription: DEFAULT_CPU_OVERSUBSCRIPTION,
        }
    }
}

impl SchedulerConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        if self.cpu_oversubscription == 0 {
            return Err(ScheduleError::InvalidOversubscription);
        }
        Ok(())
    }
}

/// One new instance to place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRequest {
    /// Id the new instance will have; the caller chooses it so the decision stays pure.
    pub id: InstanceId,
    /// Environment the instance serves.
    pub env: EnvId,
    /// Process type the instance runs.
    pub process: ProcessName,
    /// Resources the instance asks for.
    pub resources: Resources,
}

/// The decision for one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Placement {
    /// The instance placed.
    pub instance: InstanceId,
    /// The host it runs on.
    pub host: HostId,
}

/// Why the scheduler could not place every requested instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The oversubscription ratio is zero.
    #[error("invalid CPU oversubscription ratio 0: use 1 to disable oversubscription, or more")]
    InvalidOversubscription,
    /// Two hosts in the snapshot have the same id.
    #[error("host {host} appears twice in the cluster snapshot")]
    DuplicateHost {
        /// The repeated id.
        host: HostId,
    },
    /// An instance id appears twice among the existing and requested instances.
    #[error("instance {instance} appears twice among the existing and requested instances")]
    DuplicateInstance {
        /// The repeated id.
        instance: InstanceId,
    },
    /// A request asks for no memory or no vCPU.
    #[error(
        "invalid request for instance {instance}: it asks for {memory_mib} MiB and {vcpus} vCPUs; \
         both must be at least 1"
    )]
    EmptyRequest {
        /// The instance requested.
        instance: InstanceId,
        /// Requested guest memory in MiB.
        memory_mib: u64,
        /// Requested vCPUs.
        vcpus: u32,
    },
    /// No host is in the `ready` state.
    #[error(
        "cannot place instance {instance} ({process} of {env}): no host is ready \
         ({cordoned} cordoned, {draining} draining, {dead} dead); uncordon a host or join a new one"
    )]
    NoReadyHost {
        /// The instance that could not be placed.
        instance: InstanceId,
        /// Its environment.
        env: EnvId,
        /// Its process type.
        process: ProcessName,
        /// Hosts cordoned by an operator.
        cordoned: usize,
        /// Hosts being drained.
        draining: usize,
        /// Hosts whose lease expired.
        dead: usize,
    },
    /// No ready host has enough free memory.
    #[error("{0}")]
    InsufficientMemory(Box<MemoryShortfall>),
    /// Hosts with enough memory have too few free vCPUs.
    #[error("{0}")]
    InsufficientCpu(Box<CpuShortfall>),
}

/// The explanation of a memory shortfall.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot place instance {instance} ({process} of {env}): no host has {required_mib} MiB free \
     ({guest_mib} MiB guest memory plus {overhead_mib} MiB per-VM overhead); the largest free \
     is {largest_free_mib} MiB on host {host}{placed}; add a host or lower the memory of \
     {process}",
    placed = PlacedSoFar(*.placed, *.requested)
)]
pub struct MemoryShortfall {
    /// The instance that could not be placed.
    pub instance: InstanceId,
    /// Its environment.
    pub env: EnvId,
    /// Its process type.
    pub process: ProcessName,
    /// Guest memory plus overhead, in MiB.
    pub required_mib: u64,
    /// Guest memory in the request, in MiB.
    pub guest_mib: u64,
    /// Per-VM overhead, in MiB.
    pub overhead_mib: u64,
    /// The most free memory on any ready host, in MiB.
    pub largest_free_mib: u64,
    /// Name of the host with the most free memory.
    pub host: String,
    /// Instances of this request placed before this one.
    pub placed: usize,
    /// Instances in the request.
    pub requested: usize,
}

/// The explanation of a vCPU shortfall on the hosts with enough memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot place instance {instance} ({process} of {env}): no host with {required_mib} MiB \
     free has {vcpus} vCPUs free (CPU is oversubscribed {ratio}x); the most free is \
     {most_free_vcpus} vCPUs on host {host}{placed}; add a host or lower the vCPUs of {process}",
    placed = PlacedSoFar(*.placed, *.requested)
)]
pub struct CpuShortfall {
    /// The instance that could not be placed.
    pub instance: InstanceId,
    /// Its environment.
    pub env: EnvId,
    /// Its process type.
    pub process: ProcessName,
    /// Guest memory plus overhead, in MiB.
    pub required_mib: u64,
    /// vCPUs in the request.
    pub vcpus: u32,
    /// The oversubscription ratio in force.
    pub ratio: u32,
    /// The most free vCPUs on a host with enough memory.
    pub most_free_vcpus: u64,
    /// Name of that host.
    pub host: String,
    /// Instances of this request placed before this one.
    pub placed: usize,
    /// Instances in the request.
    pub requested: usize,
}

/// Formats "; placed 2 of 5 instances before it" when a request placed some instances.
struct PlacedSoFar(usize, usize);

impl fmt::Display for PlacedSoFar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self(_, requested) if *requested <= 1 => Ok(()),
            Self(placed, requested) => {
                write!(f, " (placed {placed} of {requested} instances before it)")
            }
        }
    }
}

/// Replicas of one process type of one env: the unit that spreads across hosts.
type GroupKey = (EnvId, ProcessName);

#[derive(Debug, Clone)]
struct HostSlot {
    id: HostId,
    name: String,
    state: HostState,
    memory_capacity_mib: u64,
    vcpu_capacity: u64,
    memory_used_mib: u64,
    vcpus_used: u64,
}

impl HostSlot {
    fn free_memory_mib(&self) -> u64 {
        self.memory_capacity_mib
            .saturating_sub(self.memory_used_mib)
    }

    fn free_vcpus(&self) -> u64 {
        self.vcpu_capacity.saturating_sub(self.vcpus_used)
    }
}

#[derive(Debug, Clone)]
struct Held {
    /// Index into `Scheduler::hosts`, or `None` for an instance on a host not in the snapshot.
    host: Option<usize>,
    group: GroupKey,
    resources: Resources,
}

/// The scheduler over a working copy of the cluster: placements and removals update it, so a
/// caller (the deploy planner) can simulate a rollout step by step.
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    hosts: Vec<HostSlot>,
    host_index: HashMap<HostId, usize>,
    instances: HashMap<InstanceId, Held>,
    /// Replica count per host index, per group.
    groups: HashMap<GroupKey, Vec<u32>>,
}

impl Scheduler {
    /// Builds the working copy from a snapshot.
    ///
    /// Instances on a host missing from the snapshot are remembered (so their ids stay taken)
    /// but use no capacity anywhere.
    pub fn new(snapshot: &ClusterSnapshot, config: SchedulerConfig) -> Result<Self, ScheduleError> {
        config.validate()?;

        let mut hosts: Vec<HostSlot> = snapshot
            .hosts
            .iter()
            .map(|host| HostSlot {
                id: host.id,
                name: host.name.clone(),
                state: host.state,
                memory_capacity_mib: host.memory_mib.saturating_sub(config.host_reserve_mib),
                vcpu_capacity: u64::from(host.cpus) * u64::from(config.cpu_oversubscription),
                memory_used_mib: 0,
                vcpus_used: 0,
            })
            .collect();
        hosts.sort_by_key(|host| host.id);

        let mut host_index = HashMap::with_capacity(hosts.len());
        for (index, host) in hosts.iter().enumerate() {
            if host_index.insert(host.id, index).is_some() {
                return Err(ScheduleError::DuplicateHost { host: host.id });
            }
        }

        let mut scheduler = Self {
            config,
            hosts,
            host_index,
            instances: HashMap::with_capacity(snapshot.instances.len()),
            groups: HashMap::new(),
        };
        for instance in &snapshot.instances {
            let host = scheduler.host_index.get(&instance.host).copied();
            scheduler.hold(
                instance.id,
                host,
                (instance.env, instance.process.clone()),
                instance.resources,
            )?;
        }
        Ok(scheduler)
    }

    /// The settings in force.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Places every requested instance, in order, or none of them.
    pub fn place(&mut self, requests: &[InstanceRequest]) -> Result<Vec<Placement>, ScheduleError> {
        let mut placements = Vec::with_capacity(requests.len());
        for (placed, request) in requests.iter().enumerate() {
            match self.place_one(request, placed, requests.len()) {
                Ok(placement) => placements.push(placement),
                Err(error) => {
                    for placement in &placements {
                        self.remove(placement.instance);
                    }
                    return Err(error);
                }
            }
        }
        Ok(placements)
    }

    /// Places one instance on a host the caller chose, such as the host an instance is being
    /// restored to. Capacity is charged even when it is exceeded: the caller owns that decision.
    pub fn place_on(
        &mut self,
        request: &InstanceRequest,
        host: HostId,
    ) -> Result<(), ScheduleError> {
        check_request(request)?;
        let index = self.host_index.get(&host).copied();
        self.hold(
            request.id,
            index,
            (request.env, request.process.clone()),
            request.resources,
        )
    }

    /// Releases the resources of an instance; returns whether it was known.
    pub fn remove(&mut self, instance: InstanceId) -> bool {
        let Some(held) = self.instances.remove(&instance) else {
            return false;
        };
        let Some(index) = held.host else {
            return true;
        };

        let host = &mut self.hosts[index];
        host.memory_used_mib -= held.resources.memory_mib + self.config.vm_overhead_mib;
        host.vcpus_used -= u64::from(held.resources.vcpus);
        if let Some(counts) = self.groups.get_mut(&held.group) {
            counts[index] -= 1;
        }
        true
    }

    /// Free memory of a host in MiB, after its reserve and every instance on it.
    pub fn free_memory_mib(&self, host: HostId) -> Option<u64> {
        let index = *self.host_index.get(&host)?;
        Some(self.hosts[index].free_memory_mib())
    }

    /// Free vCPUs of a host under the oversubscription ratio.
    pub fn free_vcpus(&self, host: HostId) -> Option<u64> {
        let index = *self.host_index.get(&host)?;
        Some(self.hosts[index].free_vcpus())
    }

    /// Replicas of one env and process type on a host.
    pub fn replicas_on(&self, env: EnvId, process: &ProcessName, host: HostId) -> u32 {
        let Some(index) = self.host_index.get(&host) else {
            return 0;
        };
        self.groups
            .get(&(env, process.clone()))
            .map_or(0, |counts| counts[*index])
    }

    /// Host an instance is placed on, if the instance is known and its host is in the snapshot.
    pub fn host_of(&self, instance: InstanceId) -> Option<HostId> {
        let held = self.instances.get(&instance)?;
        held.host.map(|index| self.hosts[index].id)
    }

    fn place_one(
        &mut self,
        request: &InstanceRequest,
        placed: usize,
        requested: usize,
    ) -> Result<Placement, ScheduleError> {
        check_request(request)?;
        if self.instances.contains_key(&request.id) {
            return Err(ScheduleError::DuplicateInstance {
                instance: request.id,
            });
        }

        let group = (request.env, request.process.clone());
        let required_mib = request.resources.memory_mib + self.config.vm_overhead_mib;
        let vcpus = u64::from(request.resources.vcpus);
        let counts = self.groups.get(&group);

        // Lowest (replicas of the group, less free memory, index) wins; indexes follow host ids.
        let mut best: Option<(u32, u64, usize)> = None;
        for (index, host) in self.hosts.iter().enumerate() {
            if !host.state.accepts_instances() {
                continue;
            }
            let free_memory = host.free_memory_mib();
            if free_memory < required_mib || host.free_vcpus() < vcpus {
                continue;
            }
            let replicas = counts.map_or(0, |counts| counts[index]);
            let better = match best {
                None => true,
                Some((best_replicas, best_free, _)) => {
                    replicas < best_replicas
                        || (replicas == best_replicas && free_memory > best_free)
                }
            };
            if better {
                best = Some((replicas, free_memory, index));
            }
        }

        let Some((_, _, index)) = best else {
            return Err(self.explain_failure(request, placed, requested));
        };
        self.hold(request.id, Some(index), group, request.resources)?;
        Ok(Placement {
            instance: request.id,
            host: self.hosts[index].id,
        })
    }

    fn hold(
        &mut self,
        instance: InstanceId,
        host: Option<usize>,
        group: GroupKey,
        resources: Resources,
    ) -> Result<(), ScheduleError> {
        if self.instances.contains_key(&instance) {
            return Err(ScheduleError::DuplicateInstance { instance });
        }
        if let Some(index) = host {
            let slot = &mut self.hosts[index];
            slot.memory_used_mib += resources.memory_mib + self.config.vm_overhead_mib;
            slot.vcpus_used += u64::from(resources.vcpus);
            let host_count = self.hosts.len();
            self.groups
                .entry(group.clone())
                .or_insert_with(|| vec![0; host_count])[index] += 1;
        }
        self.instances.insert(
            instance,
            Held {
                host,
                group,
                resources,
            },
        );
        Ok(())
    }

    fn explain_failure(
        &self,
        request: &InstanceRequest,
        placed: usize,
        requested: usize,
    ) -> ScheduleError {
        let ready: Vec<&HostSlot> = self
            .hosts
            .iter()
            .filter(|host| host.state.accepts_instances())
            .collect();
        let count = |state| self.hosts.iter().filter(|host| host.state == state).count();

        if ready.is_empty() {
            return ScheduleError::NoReadyHost {
                instance: request.id,
                env: request.env,
                process: request.process.clone(),
                cordoned: count(HostState::Cordoned),
                draining: count(HostState::Draining),
                dead: count(HostState::Dead),
            };
        }

        let required_mib = request.resources.memory_mib + self.config.vm_overhead_mib;
        let roomy: Vec<&HostSlot> = ready
            .iter()
            .copied()
            .filter(|host| host.free_memory_mib() >= required_mib)
            .collect();
        if roomy.is_empty() {
            // `max_by_key` returns the last maximum; reversing keeps the lowest id on ties.
            let largest = ready
                .iter()
                .rev()
                .max_by_key(|host| host.free_memory_mib())
                .copied()
                .unwrap_or(ready[0]);
            return ScheduleError::InsufficientMemory(Box::new(MemoryShortfall {
                instance: request.id,
                env: request.env,
                process: request.process.clone(),
                required_mib,
                guest_mib: request.resources.memory_mib,
                overhead_mib: self.config.vm_overhead_mib,
                largest_free_mib: largest.free_memory_mib(),
                host: largest.name.clone(),
                placed,
                requested,
            }));
        }

        let most = roomy
            .iter()
            .rev()
            .max_by_key(|host| host.free_vcpus())
            .copied()
            .unwrap_or(roomy[0]);
        ScheduleError::InsufficientCpu(Box::new(CpuShortfall {
            instance: request.id,
            env: request.env,
            process: request.process.clone(),
            required_mib,
            vcpus: request.resources.vcpus,
            ratio: self.config.cpu_oversubscription,
            most_free_vcpus: most.free_vcpus(),
            host: most.name.clone(),
            placed,
            requested,
        }))
    }
}

fn check_request(request: &InstanceRequest) -> Result<(), ScheduleError> {
    if request.resources.memory_mib == 0 || request.resources.vcpus == 0 {
        return Err(ScheduleError::EmptyRequest {
            instance: request.id,
            memory_mib: request.resources.memory_mib,
            vcpus: request.resources.vcpus,
        });
    }
    Ok(())
}

/// Places every requested instance on the snapshot, or explains why not.
///
/// A pure function: the same snapshot, settings and requests always give the same placements.
pub fn schedule(
    snapshot: &ClusterSnapshot,
    config: SchedulerConfig,
    requests: &[InstanceRequest],
) -> Result<Vec<Placement>, ScheduleError> {
    Scheduler::new(snapshot, config)?.place(requests)
}
