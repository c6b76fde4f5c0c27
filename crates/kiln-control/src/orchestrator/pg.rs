//! The orchestrator over the event store: plans pending deploys, replaces instances of lost
//! hosts, scales envs to their desired counts, runs the engine, and removes instances that have
//! stopped.
//!
//! Every write happens in a transaction that first checks the leader's fencing term
//! ([`check_fence`]) and then appends events through [`Store::append_in`], so projections,
//! IPAM allocations and events change together or not at all, and a deposed leader writes
//! nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv6Addr;
use std::sync::{Arc, Mutex, PoisonError};

use ipnet::Ipv6Net;
use kiln_api::{
    DeployState, DeployStrategy, Event, Route, RouteBackend, RouteMatch, ServiceProtocol,
};
use kiln_core::{DeployId, EnvId, HostId, Hostname, InstanceId, OrgId, ProcessName, ReleaseId};
use kiln_scheduler::plan::{
    Action, Intent, Plan, PlanRequest, RELEASE_COMMAND_STEP, Strategy, Timeouts, plan,
};
use kiln_scheduler::progress::{Observed, StepRecord};
use kiln_scheduler::{Ipam, SchedulerConfig};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::convert;
use super::engine::{self, DeployProgress, Fence, Outcome, PassReport};
use crate::ipam::{self, IpamStoreError};
use crate::leader::{FenceError, LEADERSHIP, check_fence};
use crate::store::{ExpectedVersion, NewEvent, Store, StoreError, StreamEvent, streams};

/// Actor recorded on the orchestrator's events.
const ACTOR: &str = "system:orchestrator";

/// Errors of the orchestrator.
#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    /// The leader's term is stale.
    #[error("orchestrator write fenced off")]
    Fence(#[from] FenceError),
    /// The event store failed.
    #[error("orchestrator event store operation failed")]
    Store(#[from] StoreError),
    /// IPAM failed.
    #[error("orchestrator address allocation failed")]
    Ipam(#[from] IpamStoreError),
    /// A query failed.
    #[error("orchestrator query failed: {operation}")]
    Query {
        /// The purpose of the query.
        operation: &'static str,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
    /// The config vars and secrets of the release a failed rollback returns to could not be
    /// restored.
    #[error("failed to restore the config and secrets of release {release}: {message}")]
    Restore {
        /// The release returned to.
        release: ReleaseId,
        /// The API layer's message.
        message: String,
    },
    /// A stored value does not parse.
    #[error("invalid stored value in {what}: {value}")]
    Corrupt {
        /// The table and column of the value.
        what: &'static str,
        /// The value.
        value: String,
    },
}

pub(super) fn query(operation: &'static str) -> impl FnOnce(sqlx::Error) -> OrchestratorError {
    move |source| OrchestratorError::Query { operation, source }
}

pub(super) fn corrupt(what: &'static str, value: impl ToString) -> OrchestratorError {
    OrchestratorError::Corrupt {
        what,
        value: value.to_string(),
    }
}

/// The tasks one orchestrator pass covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassScope {
    /// Every task of a pass: removals, planning, lost-host replacement, scale reconciliation
    /// and the engine.
    Full,
    /// Removals, planning and the engine only: the passes that follow appends, which move
    /// deploys on as agents report.
    Deploys,
}

/// The orchestrator of one control plane replica.
#[derive(Debug, Clone)]
pub struct Orchestrator {
    pub(super) store: Store,
    ipam: Ipam,
    /// Instance addresses in use per host, so a placement reads no host's addresses again.
    addresses: Arc<ipam::AddressBook>,
    pub(super) config: SchedulerConfig,
    pub(super) timeouts: Timeouts,
    cache: Arc<Mutex<Cache>>,
    /// Maximum wait for ingresses to apply a route change before instances stop anyway.
    route_drain_deadline: std::time::Duration,
}

/// Maximum entries in the cache before it is emptied, so a long-lived leader's memory stays
/// bounded.
const CACHE_ENTRIES: usize = 65_536;

/// Values that never change once written, kept between passes so a pass does not read them
/// again for every action. They are an env's org, a deploy's env, a release's spec (releases
/// are immutable), a host's /64 (kept when the host registers again) and a deploy's plan.
#[derive(Debug, Default)]
struct Cache {
    orgs: HashMap<EnvId, OrgId>,
    deploy_envs: HashMap<DeployId, EnvId>,
    releases: HashMap<ReleaseId, Arc<kiln_api::ReleaseSpec>>,
    host_slots: HashMap<HostId, u32>,
    plans: HashMap<DeployId, Arc<Plan>>,
}

impl Cache {
    fn entries(&self) -> usize {
        self.orgs.len()
            + self.deploy_envs.len()
            + self.releases.len()
            + self.host_slots.len()
            + self.plans.len()
    }

    fn make_room(&mut self) {
        if self.entries() >= CACHE_ENTRIES {
            *self = Self::default();
        }
    }
}

impl Orchestrator {
    /// Creates an orchestrator over `store` for the cluster prefix `ula_prefix` (its /48).
    pub fn new(
        store: Store,
        ula_prefix: Ipv6Addr,
        timeouts: Timeouts,
    ) -> Result<Self, OrchestratorError> {
        let cluster = Ipv6Net::new(ula_prefix, 48)
            .map(|net| net.trunc())
            .map_err(|_| corrupt("cluster prefix", ula_prefix))?;
        let ipam = Ipam::new(cluster).map_err(IpamStoreError::Allocation)?;
        Ok(Self {
            store,
            ipam,
            addresses: Arc::default(),
            config: SchedulerConfig::default(),
            timeouts,
            cache: Arc::default(),
            route_drain_deadline: crate::ingress_acks::DEFAULT_DRAIN_DEADLINE,
        })
    }

    /// Sets how long instances wait for the ingresses to apply a route change before they
    /// stop anyway.
    pub fn with_route_drain_deadline(mut self, deadline: std::time::Duration) -> Self {
        self.route_drain_deadline = deadline;
        self
    }

    /// Returns how many deploys (or removals, or plan writes) a pass runs at once: half the
    /// connection pool, so the API's requests, agents' state reports among them, keep the
    /// other half. Each deploy's actions are short transactions that mostly wait on round
    /// trips, so overlapping them keeps the database busy. Placements of different deploys
    /// overlap too: the address book hands each address out once, and the UNIQUE constraints
    /// on addresses hold however they interleave.
    fn concurrency(&self) -> usize {
        usize::try_from(self.store.pool().options().get_max_connections() / 2)
            .unwrap_or(1)
            .max(1)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one pass as the leader of `term`. With `PassScope::Deploys` the pass skips the
    /// replacement of lost instances and the scale reconciliation, which read every env.
    // TODO(performance): bench/deploys reaches about a third of its 3,750 placements per second
    // target on 2 shared cores. Each placement still costs two projected events, a share of
    // its host's assignment reloads, and the HTTP and JSON around them.
    pub async fn run_once(
        &self,
        term: i64,
        scope: PassScope,
    ) -> Result<PassReport, OrchestratorError> {
        self.remove_stopped(term).await?;
        self.plan_pending(term).await?;
        if scope == PassScope::Full {
            self.replace_lost(term).await?;
            self.reconcile_scale(term).await?;
        }
        let fenced = Fenced {
            inner: self,
            term,
            observed: Mutex::default(),
        };
        engine::run_pass(&fenced, Fence(term), self.concurrency())
            .await
            .map_err(|error| match error {
                engine::EngineError::Store(error) => error,
                engine::EngineError::Records { deploy, source } => {
                    corrupt("deploy step records", format!("{deploy}: {source}"))
                }
            })
    }

    async fn begin(&self, term: i64) -> Result<Transaction<'static, Postgres>, OrchestratorError> {
        let mut tx = self.store.begin().await?;
        check_fence(&mut tx, term).await?;
        Ok(tx)
    }

    /// Removes instances that were asked to stop and have exited, failed or lost their host,
    /// and frees their addresses.
    async fn remove_stopped(&self, term: i64) -> Result<(), OrchestratorError> {
        let rows = sqlx::query(
            // An instance outlives its deleted environment until its host has stopped it, so
            // its org comes from its placement event when the env row is gone.
            "SELECT i.id, i.env_id, i.host_id, i.ipv6, i.ipv4,
                    COALESCE(e.org_id, kiln_instance_org_from_log(i.id)) AS org_id
             FROM instances i
             LEFT JOIN envs e ON e.id = i.env_id JOIN hosts h ON h.id = i.host_id
             WHERE i.desired = 'stopped' AND (i.state IN ('exited', 'failed') OR h.state = 'lost')",
        )
        .fetch_all(self.store.pool())
        .await
        .map_err(query("list stopped instances"))?;

        for chunk in rows.chunks(REMOVALS_PER_APPEND) {
            let mut removed = Vec::with_capacity(chunk.len());
            let mut freed = Vec::with_capacity(chunk.len());
            let mut events = Vec::with_capacity(chunk.len());
            for row in chunk {
                let instance = InstanceId::from_uuid(row.get("id"));
                removed.push(instance);
                let (ipv6, ipv4): (String, String) = (row.get("ipv6"), row.get("ipv4"));
                if let (Ok(ipv6), Ok(ipv4)) = (ipv6.parse(), ipv4.parse()) {
                    let host = HostId::from_uuid(row.get("host_id"));
                    freed.push((host, kiln_scheduler::InstanceAddresses { ipv6, ipv4 }));
                }
                let event = Event::InstanceRemoved {
                    instance_id: instance,
                    env_id: EnvId::from_uuid(row.get("env_id")),
                    host_id: HostId::from_uuid(row.get("host_id")),
                };
                let org: Option<Uuid> = row.get("org_id");
                events.push(StreamEvent {
                    stream: streams::instance(instance),
                    expected: ExpectedVersion::Any,
                    event: match org {
                        Some(org) => NewEvent::org(OrgId::from_uuid(org), event),
                        None => NewEvent::cluster(event),
                    },
                });
            }
            self.remove_instances(term, &removed, events).await?;
            self.addresses.free(&freed);
        }
        Ok(())
    }

    /// Removes stopped instances in one transaction: frees their addresses, unroutes them and
    /// appends their `InstanceRemoved` events.
    async fn remove_instances(
        &self,
        term: i64,
        instances: &[InstanceId],
        events: Vec<StreamEvent>,
    ) -> Result<(), OrchestratorError> {
        let mut tx = self.begin(term).await?;
        ipam::release_instances(&mut tx, instances).await?;
        let ids: Vec<Uuid> = instances.iter().map(|id| id.as_uuid()).collect();
        sqlx::query("DELETE FROM routed_instances WHERE instance_id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(query("unroute removed instances"))?;
        Store::append_each_in(&mut tx, events, ACTOR).await?;
        tx.commit()
            .await
            .map_err(query("commit instance removals"))?;
        for instance in instances {
            tracing::info!(%instance, "instance removed");
        }
        Ok(())
    }

    /// Plans every pending deploy of an env with no deploy in progress.
    ///
    /// Every deploy is planned against one snapshot of the cluster read at the start. Each
    /// plan's new instances are reserved in it before the next deploy is planned, so two plans
    /// of one pass never count the same free memory. The plans are then stored concurrently,
    /// each with its own transaction.
    async fn plan_pending(&self, term: i64) -> Result<(), OrchestratorError> {
        let rows = sqlx::query(
            "SELECT d.id, d.env_id, d.release_id, d.previous_release_id, d.strategy FROM deploys d
             LEFT JOIN deploy_plans p ON p.deploy_id = d.id
             WHERE d.state = 'pending' AND p.deploy_id IS NULL
               AND NOT EXISTS (SELECT 1 FROM deploys o WHERE o.env_id = d.env_id
                               AND o.state = 'in_progress')
             ORDER BY d.created_at",
        )
        .fetch_all(self.store.pool())
        .await
        .map_err(query("list pending deploys"))?;
        if rows.is_empty() {
            return Ok(());
        }

        let mut cluster = self.cluster().await?;
        let mut planned_envs = BTreeSet::new();
        let mut planned = Vec::new();
        for row in rows {
            let deploy = DeployId::from_uuid(row.get("id"));
            let env = EnvId::from_uuid(row.get("env_id"));
            if !planned_envs.insert(env) {
                continue;
            }
            let release = ReleaseId::from_uuid(row.get("release_id"));
            let previous: Option<Uuid> = row.get("previous_release_id");
            let strategy: String = row.get("strategy");

            let target = self.load_release(release).await?;
            let env_row = self.env_row(env).await?;
            let strategy = match strategy.as_str() {
                "immediate" => Strategy::Immediate,
                _ => convert::planner_strategy(DeployStrategy::Rolling, target.max_surge.max(1)),
            };
            let mut release_spec = convert::planner_release(release, &target, &env_row.scale);
            if release_spec.release_command.is_some()
                && self.release_command_succeeded(release).await?
            {
                // The command runs once per release: a later deploy of the same release (after
                // a failed rollout, or a rollback to it) goes straight to the rollout.
                release_spec.release_command = None;
            }
            let intent = Intent::Deploy {
                release: release_spec,
                strategy,
            };
            let previous = previous.map(ReleaseId::from_uuid);
            let state = self
                .env_state(env, env_row, Some(previous), &cluster)
                .await?;
            let request = PlanRequest {
                deploy,
                intent,
                timeouts: self.timeouts,
            };
            let result = plan(&cluster.snapshot, self.config, &state, &request);
            if let Ok(plan) = &result {
                cluster.reserve(plan);
            }
            planned.push((deploy, env, result));
        }

        let mut stores = Vec::with_capacity(planned.len());
        for (deploy, env, result) in planned {
            stores.push(self.store_plan(term, deploy, env, result));
        }
        engine::run_concurrently(stores, self.concurrency()).await
    }

    /// Starts a replacement deploy for each env with running instances on lost hosts.
    async fn replace_lost(&self, term: i64) -> Result<(), OrchestratorError> {
        let envs: Vec<(Uuid, Uuid)> = sqlx::query_as(
            "SELECT DISTINCT e.id, e.current_release_id FROM instances i
             JOIN hosts h ON h.id = i.host_id JOIN envs e ON e.id = i.env_id
             WHERE h.state = 'lost' AND i.desired = 'running' AND e.current_release_id IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM deploys d WHERE d.env_id = e.id
                               AND d.state IN ('pending', 'in_progress'))",
        )
        .fetch_all(self.store.pool())
        .await
        .map_err(query("list envs with lost instances"))?;

        for (env, release) in envs {
            let env = EnvId::from_uuid(env);
            let release = ReleaseId::from_uuid(release);
            let deploy = DeployId::new();
            let org = self.env_org(env).await?;

            let mut tx = self.begin(term).await?;
            let event = Event::DeployRequested {
                deploy_id: deploy,
                env_id: env,
                release_id: release,
                previous_release_id: Some(release),
                strategy: DeployStrategy::Rolling,
            };
            Store::append_in(
                &mut tx,
                &streams::deploy(deploy),
                ExpectedVersion::NoStream,
                vec![NewEvent::org(org, event)],
                ACTOR,
            )
            .await?;
            tx.commit()
                .await
                .map_err(query("commit replacement deploy"))?;
            tracing::warn!(%env, %deploy, "replacing instances of lost hosts");

            self.record_plan(term, deploy, env, Intent::ReplaceLost, None)
                .await?;
        }
        Ok(())
    }

    /// Starts a scale deploy for each env whose instances of the current release differ in
    /// number from its desired scale, so `PUT .../scale` takes effect without a new release.
    ///
    /// Envs with a deploy pending or in progress are skipped: that deploy reads the scale when
    /// it is planned. A scale deploy that could not be planned or failed is not retried until
    /// the env is scaled again, so a scale the cluster cannot hold does not fail once a pass.
    async fn reconcile_scale(&self, term: i64) -> Result<(), OrchestratorError> {
        // One query reads every candidate env with its desired scale and its running counts,
        // so a pass over many settled envs costs one round trip, not several per env.
        let rows = sqlx::query(
            "SELECT e.id, e.current_release_id, e.scale,
                    COALESCE((SELECT jsonb_object_agg(c.process, c.count) FROM (
                                  SELECT i.process, count(*) AS count FROM instances i
                                  WHERE i.env_id = e.id AND i.release_id = e.current_release_id
                                    AND i.desired = 'running'
                                  GROUP BY i.process) c),
                             '{}'::jsonb) AS running
             FROM envs e
             WHERE e.current_release_id IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM deploys d WHERE d.env_id = e.id
                               AND d.state IN ('pending', 'in_progress'))
               AND NOT EXISTS (
                   SELECT 1 FROM deploys d WHERE d.env_id = e.id AND d.state = 'failed'
                     AND d.release_id = e.current_release_id
                     AND d.previous_release_id = e.current_release_id
                     AND d.created_at > COALESCE(
                         (SELECT max(v.time) FROM events v
                          WHERE v.stream = 'env:' || e.id::text AND v.type = 'EnvScaled'
                            AND v.actor <> $1),
                         '-infinity'))
             ORDER BY e.id",
        )
        .bind(ACTOR)
        .fetch_all(self.store.pool())
        .await
        .map_err(query("list envs to reconcile scale"))?;

        for row in rows {
            let env = EnvId::from_uuid(row.get("id"));
            let release = ReleaseId::from_uuid(row.get("current_release_id"));
            let scale: BTreeMap<ProcessName, u32> = serde_json::from_value(row.get("scale"))
                .map_err(|error| corrupt("envs.scale", error))?;
            let running: BTreeMap<String, i64> = serde_json::from_value(row.get("running"))
                .map_err(|error| corrupt("instances.process", error))?;
            let counts = self.scale_difference(release, &scale, &running).await?;
            if counts.is_empty() {
                continue;
            }
            let deploy = DeployId::new();
            let org = self.env_org(env).await?;

            let mut tx = self.begin(term).await?;
            let event = Event::DeployRequested {
                deploy_id: deploy,
                env_id: env,
                release_id: release,
                previous_release_id: Some(release),
                strategy: DeployStrategy::Rolling,
            };
            Store::append_in(
                &mut tx,
                &streams::deploy(deploy),
                ExpectedVersion::NoStream,
                vec![NewEvent::org(org, event)],
                ACTOR,
            )
            .await?;
            tx.commit().await.map_err(query("commit a scale deploy"))?;
            tracing::info!(%env, %deploy, ?counts, "scaling env");

            self.record_plan(term, deploy, env, Intent::Scale { counts }, None)
                .await?;
        }
        Ok(())
    }

    /// The desired count of each process type of `release` whose number of instances
    /// (`running`, of that release, wanted running) differs from it.
    async fn scale_difference(
        &self,
        release: ReleaseId,
        scale: &BTreeMap<ProcessName, u32>,
        running: &BTreeMap<String, i64>,
    ) -> Result<BTreeMap<ProcessName, u32>, OrchestratorError> {
        let spec = self.load_release(release).await?;
        let desired = convert::planner_release(release, &spec, scale);
        Ok(desired
            .processes
            .into_iter()
            .filter(|(process, spec)| {
                running.get(process.as_str()).copied().unwrap_or(0) != i64::from(spec.count)
            })
            .map(|(process, spec)| (process, spec.count))
            .collect())
    }

    /// Plans a deploy and records the plan, or fails the deploy with the planner's reason.
    /// `previous` is the release the env ran before the deploy was requested, when the env's
    /// current release already names the deploy's target.
    async fn record_plan(
        &self,
        term: i64,
        deploy: DeployId,
        env: EnvId,
        intent: Intent,
        previous: Option<Option<ReleaseId>>,
    ) -> Result<(), OrchestratorError> {
        let (cluster, state) = self.snapshot(env, previous).await?;
        let request = PlanRequest {
            deploy,
            intent,
            timeouts: self.timeouts,
        };
        let result = plan(&cluster, self.config, &state, &request);
        self.store_plan(term, deploy, env, result).await
    }

    /// Stores a deploy's plan and marks the deploy in progress, or fails the deploy with the
    /// planner's reason.
    async fn store_plan(
        &self,
        term: i64,
        deploy: DeployId,
        env: EnvId,
        result: Result<Plan, kiln_scheduler::plan::PlanError>,
    ) -> Result<(), OrchestratorError> {
        let org = self.env_org(env).await?;
        let mut tx = self.begin(term).await?;

        let (state_event, failure) = match result {
            Ok(plan) => {
                let json = serde_json::to_value(&plan).map_err(|error| corrupt("plan", error))?;
                sqlx::query(
                    "INSERT INTO deploy_plans (deploy_id, plan, base_version) VALUES ($1, $2, $3)
                     ON CONFLICT (deploy_id) DO NOTHING",
                )
                .bind(deploy.as_uuid())
                .bind(json)
                .bind(i64::try_from(plan.base_version).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await
                .map_err(query("store a plan"))?;
                (DeployState::InProgress, None)
            }
            Err(error) => (DeployState::Failed, Some(error_chain(&error))),
        };

        let event = Event::DeployStateChanged {
            deploy_id: deploy,
            env_id: env,
            state: state_event,
            failure: failure.clone(),
        };
        Store::append_in(
            &mut tx,
            &streams::deploy(deploy),
            ExpectedVersion::Any,
            vec![NewEvent::org(org, event)],
            ACTOR,
        )
        .await?;
        tx.commit().await.map_err(query("commit a plan"))?;
        match failure {
            Some(failure) => tracing::warn!(%deploy, %env, failure, "deploy could not be planned"),
            None => tracing::info!(%deploy, %env, "deploy planned"),
        }
        Ok(())
    }

    /// Returns whether the release command of `release` already exited 0 in some deploy.
    async fn release_command_succeeded(
        &self,
        release: ReleaseId,
    ) -> Result<bool, OrchestratorError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM deploy_steps s JOIN deploys d ON d.id = s.deploy_id
                            WHERE d.release_id = $1 AND s.step = $2)",
        )
        .bind(release.as_uuid())
        .bind(record_text(&StepRecord::Completed(
            RELEASE_COMMAND_STEP.to_owned(),
        )))
        .fetch_one(self.store.pool())
        .await
        .map_err(query("check a release command's result"))
    }

    pub(super) async fn load_release(
        &self,
        id: ReleaseId,
    ) -> Result<Arc<kiln_api::ReleaseSpec>, OrchestratorError> {
        if let Some(spec) = self.cache().releases.get(&id) {
            return Ok(Arc::clone(spec));
        }
        let spec: serde_json::Value = sqlx::query_scalar("SELECT spec FROM releases WHERE id = $1")
            .bind(id.as_uuid())
            .fetch_optional(self.store.pool())
            .await
            .map_err(query("read a release"))?
            .ok_or_else(|| corrupt("releases", format!("release {id} not found")))?;
        let spec: Arc<kiln_api::ReleaseSpec> = Arc::new(
            serde_json::from_value(spec).map_err(|error| corrupt("releases.spec", error))?,
        );
        let mut cache = self.cache();
        cache.make_room();
        cache.releases.insert(id, Arc::clone(&spec));
        Ok(spec)
    }

    pub(super) async fn env_scale(
        &self,
        env: EnvId,
    ) -> Result<BTreeMap<ProcessName, u32>, OrchestratorError> {
        let scale: serde_json::Value = sqlx::query_scalar("SELECT scale FROM envs WHERE id = $1")
            .bind(env.as_uuid())
            .fetch_one(self.store.pool())
            .await
            .map_err(query("read an env's scale"))?;
        serde_json::from_value(scale).map_err(|error| corrupt("envs.scale", error))
    }

    pub(super) async fn env_org(&self, env: EnvId) -> Result<OrgId, OrchestratorError> {
        if let Some(org) = self.cache().orgs.get(&env) {
            return Ok(*org);
        }
        let org: Uuid = sqlx::query_scalar("SELECT org_id FROM envs WHERE id = $1")
            .bind(env.as_uuid())
            .fetch_one(self.store.pool())
            .await
            .map_err(query("read an env's org"))?;
        let org = OrgId::from_uuid(org);
        let mut cache = self.cache();
        cache.make_room();
        cache.orgs.insert(env, org);
        Ok(org)
    }

    /// Places `instances` of `env` in one transaction: addresses from IPAM and an
    /// `InstancePlaced` event each.
    async fn start_instances(
        &self,
        term: i64,
        env: EnvId,
        instances: &[&kiln_scheduler::plan::PlannedInstance],
    ) -> Result<(), OrchestratorError> {
        // An instance is placed at most once: its stream outlives its removal, so a step run
        // again after a restart never starts a release command (or any instance) twice.
        let names: Vec<String> = instances
            .iter()
            .map(|instance| streams::instance(instance.id))
            .collect();
        let placed: Vec<String> = sqlx::query_scalar("SELECT id FROM streams WHERE id = ANY($1)")
            .bind(&names)
            .fetch_all(self.store.pool())
            .await
            .map_err(query("check instance placements"))?;
        let placed: BTreeSet<String> = placed.into_iter().collect();
        let new: Vec<_> = instances
            .iter()
            .zip(&names)
            .filter(|(_, name)| !placed.contains(*name))
            .map(|(instance, _)| *instance)
            .collect();
        if new.is_empty() {
            return Ok(());
        }

        let org = self.env_org(env).await?;
        let mut placements = Vec::with_capacity(new.len());
        for instance in &new {
            placements.push((
                instance.host,
                self.host_slot(instance.host).await?,
                instance.id,
            ));
        }

        // One statement appends every placement, last in the transaction, so the append lock
        // is held only for the commit.
        self.place(term, env, org, &new, &placements).await?;
        for instance in &new {
            tracing::info!(instance = %instance.id, host = %instance.host, "instance placed");
        }
        Ok(())
    }

    /// Allocates the addresses of `new` and appends their `InstancePlaced` events in one
    /// transaction.
    async fn place(
        &self,
        term: i64,
        env: EnvId,
        org: OrgId,
        new: &[&kiln_scheduler::plan::PlannedInstance],
        placements: &[(HostId, u32, InstanceId)],
    ) -> Result<(), OrchestratorError> {
        let mut tx = self.begin(term).await?;
        let placed =
            ipam::place_instances(&mut tx, &self.ipam, &self.addresses, env, placements).await?;
        let events = new
            .iter()
            .zip(&placed.pairs)
            .map(|(instance, pair)| StreamEvent {
                stream: streams::instance(instance.id),
                expected: ExpectedVersion::NoStream,
                event: NewEvent::org(
                    org,
                    Event::InstancePlaced {
                        instance_id: instance.id,
                        env_id: env,
                        release_id: instance.release,
                        process: instance.process.clone(),
                        host_id: instance.host,
                        ipv6: pair.ipv6,
                        ipv4: pair.ipv4,
                    },
                ),
            })
            .collect();
        let appended = Store::append_each_in(&mut tx, events, ACTOR).await;
        let committed = match appended {
            Ok(_) => tx
                .commit()
                .await
                .map_err(query("commit instance placements")),
            Err(error) => Err(error.into()),
        };
        if committed.is_err() {
            // Nothing was stored, so the addresses are free again.
            self.addresses.free(&placed.allocated);
        }
        committed
    }

    /// Asks the hosts of `instances` to stop them, in one transaction: each leaves the route
    /// table's backends and gets `InstanceStopRequested`. Instances already asked, or gone,
    /// are skipped.
    async fn stop_instances(
        &self,
        term: i64,
        instances: &[InstanceId],
    ) -> Result<(), OrchestratorError> {
        let ids: Vec<Uuid> = instances.iter().map(|id| id.as_uuid()).collect();
        let rows = sqlx::query(
            "SELECT i.id, i.env_id, i.host_id, e.org_id FROM instances i
             JOIN envs e ON e.id = i.env_id
             WHERE i.id = ANY($1) AND i.desired <> 'stopped'",
        )
        .bind(&ids)
        .fetch_all(self.store.pool())
        .await
        .map_err(query("read instances to stop"))?;

        let mut found = HashMap::new();
        for row in &rows {
            let id = InstanceId::from_uuid(row.get("id"));
            let env = EnvId::from_uuid(row.get("env_id"));
            let host = HostId::from_uuid(row.get("host_id"));
            found.insert(id, (env, host, OrgId::from_uuid(row.get("org_id"))));
        }

        // Kept in the order the plan names them, which is the order their events get.
        let mut stopping = Vec::with_capacity(found.len());
        let mut events = Vec::with_capacity(found.len());
        for instance in instances {
            let Some((env, host, org)) = found.remove(instance) else {
                continue;
            };
            stopping.push(instance.as_uuid());
            events.push(StreamEvent {
                stream: streams::instance(*instance),
                expected: ExpectedVersion::Any,
                event: NewEvent::org(
                    org,
                    Event::InstanceStopRequested {
                        instance_id: *instance,
                        env_id: env,
                        host_id: host,
                        reason: "deploy".to_owned(),
                    },
                ),
            });
        }
        if events.is_empty() {
            return Ok(());
        }

        let mut tx = self.begin(term).await?;
        sqlx::query("DELETE FROM routed_instances WHERE instance_id = ANY($1)")
            .bind(&stopping)
            .execute(&mut *tx)
            .await
            .map_err(query("unroute stopping instances"))?;
        Store::append_each_in(&mut tx, events, ACTOR).await?;
        tx.commit().await.map_err(query("commit instance stops"))?;
        Ok(())
    }

    async fn update_routes(
        &self,
        term: i64,
        plan: &Plan,
        add: &[InstanceId],
        remove: &[InstanceId],
    ) -> Result<(), OrchestratorError> {
        let env = plan.env;
        let org = self.env_org(env).await?;
        let spec = self.load_release(plan.to_release).await?;
        let mut tx = self.begin(term).await?;

        if !remove.is_empty() {
            let remove: Vec<Uuid> = remove.iter().map(|id| id.as_uuid()).collect();
            sqlx::query("DELETE FROM routed_instances WHERE env_id = $1 AND instance_id = ANY($2)")
                .bind(env.as_uuid())
                .bind(&remove)
                .execute(&mut *tx)
                .await
                .map_err(query("unroute instances"))?;
        }
        if !add.is_empty() {
            let add: Vec<Uuid> = add.iter().map(|id| id.as_uuid()).collect();
            sqlx::query(
                "INSERT INTO routed_instances (env_id, instance_id)
                 SELECT $1, unnest($2::uuid[]) ON CONFLICT DO NOTHING",
            )
            .bind(env.as_uuid())
            .bind(&add)
            .execute(&mut *tx)
            .await
            .map_err(query("route instances"))?;
        }

        let env_row = sqlx::query("SELECT hostname, ipv6_address FROM envs WHERE id = $1")
            .bind(env.as_uuid())
            .fetch_one(&mut *tx)
            .await
            .map_err(query("read an env"))?;
        let hostname: String = env_row.get("hostname");
        let hostname = Hostname::new(&hostname).map_err(|_| corrupt("envs.hostname", &hostname))?;
        let address: String = env_row.get("ipv6_address");
        let address: Ipv6Addr = address
            .parse()
            .map_err(|_| corrupt("envs.ipv6_address", &address))?;

        let backends = sqlx::query(
            "SELECT i.id, i.process, i.ipv6 FROM routed_instances r
             JOIN instances i ON i.id = r.instance_id WHERE r.env_id = $1 ORDER BY i.id",
        )
        .bind(env.as_uuid())
        .fetch_all(&mut *tx)
        .await
        .map_err(query("list routed instances"))?;

        let mut routes = Vec::new();
        for service in &spec.services {
            let mut service_backends = Vec::new();
            for row in &backends {
                let process: String = row.get("process");
                if process != service.process.as_str() {
                    continue;
                }
                let ipv6: String = row.get("ipv6");
                service_backends.push(RouteBackend {
                    instance_id: InstanceId::from_uuid(row.get("id")),
                    address: ipv6.parse().map_err(|_| corrupt("instances.ipv6", &ipv6))?,
                    port: service.internal_port,
                });
            }
            let matchers: Vec<RouteMatch> = match service.protocol {
                ServiceProtocol::Tls => std::iter::once(hostname.clone())
                    .chain(service.hostnames.iter().cloned())
                    .map(|hostname| RouteMatch::Sni { hostname })
                    .collect(),
                ServiceProtocol::Tcp => vec![RouteMatch::Tcp {
                    address: address.into(),
                    port: service.internal_port,
                }],
            };
            for matcher in matchers {
                routes.push(Route {
                    env_id: env,
                    service: service.name.clone(),
                    matcher,
                    protocol: service.protocol,
                    proxy_protocol: service.proxy_protocol,
                    backends: service_backends.clone(),
                });
            }
        }

        // A step that waits for the ingresses before it stops instances runs its route update
        // again on every pass. An unchanged table must append no event, because the ingresses
        // would otherwise never catch up with the latest one.
        if current_routes(&mut tx, env).await?.as_ref() == Some(&routes) {
            tx.commit().await.map_err(query("commit a route change"))?;
            return Ok(());
        }
        let event = Event::RoutesChanged {
            env_id: env,
            routes,
        };
        Store::append_in(
            &mut tx,
            &streams::env(env),
            ExpectedVersion::Any,
            vec![NewEvent::org(org, event)],
            ACTOR,
        )
        .await?;
        tx.commit().await.map_err(query("commit a route change"))?;
        Ok(())
    }

    async fn append_env_event(
        &self,
        term: i64,
        env: EnvId,
        event: Event,
    ) -> Result<(), OrchestratorError> {
        self.append_fenced(term, env, &streams::env(env), event)
            .await
    }

    async fn append_deploy_event(
        &self,
        term: i64,
        deploy: DeployId,
        env: EnvId,
        event: Event,
    ) -> Result<(), OrchestratorError> {
        self.append_fenced(term, env, &streams::deploy(deploy), event)
            .await
    }

    /// Appends one event of `env`'s org to `stream` as the leader of `term`, in one statement.
    async fn append_fenced(
        &self,
        term: i64,
        env: EnvId,
        stream: &str,
        event: Event,
    ) -> Result<(), OrchestratorError> {
        let org = self.env_org(env).await?;
        let appended = self
            .store
            .append_fenced(
                LEADERSHIP,
                term,
                stream,
                ExpectedVersion::Any,
                vec![NewEvent::org(org, event)],
                ACTOR,
            )
            .await;
        match appended {
            Ok(_) => Ok(()),
            Err(StoreError::StaleFence { held, current }) => {
                Err(FenceError::Stale { held, current }.into())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Reads the reported state of each instance in `instances` that has not stopped, from the
    /// projection.
    async fn running_states(
        &self,
        instances: &[InstanceId],
    ) -> Result<BTreeMap<InstanceId, Observed>, OrchestratorError> {
        if instances.is_empty() {
            return Ok(BTreeMap::new());
        }
        let ids: Vec<Uuid> = instances.iter().map(|id| id.as_uuid()).collect();
        let rows = sqlx::query("SELECT id, state, detail FROM instances WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(self.store.pool())
            .await
            .map_err(query("read instance states"))?;
        let mut observed = BTreeMap::new();
        for row in rows {
            let state: String = row.get("state");
            let state: kiln_api::InstanceState =
                serde_json::from_value(serde_json::Value::String(state.clone()))
                    .map_err(|_| corrupt("instances.state", &state))?;
            if state.is_terminal() {
                continue;
            }
            observed.insert(
                InstanceId::from_uuid(row.get("id")),
                convert::observed(state, None, row.get("detail")),
            );
        }
        Ok(observed)
    }

    /// Reads the last state report of each instance that has one from the instance's stream.
    /// Unlike the projection it keeps the exit code and output lines, and it outlives the
    /// instance's removal.
    async fn last_reports(
        &self,
        instances: &[InstanceId],
    ) -> Result<BTreeMap<InstanceId, LastReport>, OrchestratorError> {
        if instances.is_empty() {
            return Ok(BTreeMap::new());
        }
        let streams: Vec<String> = instances.iter().map(|id| streams::instance(*id)).collect();
        let payloads: Vec<serde_json::Value> = sqlx::query_scalar(
            "SELECT DISTINCT ON (stream) payload FROM events
             WHERE stream = ANY($1) AND type = 'InstanceStateChanged'
             ORDER BY stream, stream_version DESC",
        )
        .bind(streams)
        .fetch_all(self.store.pool())
        .await
        .map_err(query("read instance reports"))?;

        let mut reports = BTreeMap::new();
        for payload in payloads {
            let event: Event = serde_json::from_value(payload)
                .map_err(|error| corrupt("events.payload", error))?;
            if let Event::InstanceStateChanged {
                instance_id,
                state,
                detail,
                exit_code,
                output,
                ..
            } = event
            {
                let report = LastReport {
                    state,
                    detail,
                    exit_code,
                    output,
                };
                reports.insert(instance_id, report);
            }
        }
        Ok(reports)
    }

    /// Reads the last output lines of a deploy's release command: those its agent reported
    /// with the exit, or else (after a timeout) the last lines it shipped as logs.
    async fn release_command_output(
        &self,
        deploy: DeployId,
        env: EnvId,
    ) -> Result<Vec<String>, OrchestratorError> {
        let plan: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT plan FROM deploy_plans WHERE deploy_id = $1")
                .bind(deploy.as_uuid())
                .fetch_optional(self.store.pool())
                .await
                .map_err(query("read a deploy's plan"))?;
        let Some(plan) = plan else {
            return Ok(Vec::new());
        };
        let plan: Plan =
            serde_json::from_value(plan).map_err(|error| corrupt("deploy_plans.plan", error))?;
        let instance = plan
            .steps
            .iter()
            .flat_map(|step| &step.actions)
            .find_map(|action| match action {
                Action::RunReleaseCommand { instance, .. } => Some(instance.id),
                _ => None,
            });
        let Some(instance) = instance else {
            return Ok(Vec::new());
        };

        let reported = self
            .last_reports(&[instance])
            .await?
            .remove(&instance)
            .map(|report| report.output)
            .unwrap_or_default();
        if !reported.is_empty() {
            return Ok(reported);
        }
        let shipped: Vec<String> = sqlx::query_scalar(
            "SELECT line FROM (
                 SELECT id, line FROM log_lines
                 WHERE env_id = $1 AND instance_id = $2 AND stream IN ('stdout', 'stderr')
                 ORDER BY id DESC LIMIT $3) AS last
             ORDER BY id",
        )
        .bind(env.as_uuid())
        .bind(instance.as_uuid())
        .bind(RELEASE_COMMAND_OUTPUT_LINES)
        .fetch_all(self.store.pool())
        .await
        .map_err(query("read a release command's logs"))?;
        Ok(shipped)
    }

    async fn deploy_env(&self, deploy: DeployId) -> Result<EnvId, OrchestratorError> {
        if let Some(env) = self.cache().deploy_envs.get(&deploy) {
            return Ok(*env);
        }
        let env: Uuid = sqlx::query_scalar("SELECT env_id FROM deploys WHERE id = $1")
            .bind(deploy.as_uuid())
            .fetch_one(self.store.pool())
            .await
            .map_err(query("read a deploy"))?;
        let env = EnvId::from_uuid(env);
        let mut cache = self.cache();
        cache.make_room();
        cache.deploy_envs.insert(deploy, env);
        Ok(env)
    }

    /// Reads the subnet number of a host's /64 (the fourth group of its prefix).
    async fn host_slot(&self, host: HostId) -> Result<u32, OrchestratorError> {
        if let Some(slot) = self.cache().host_slots.get(&host) {
            return Ok(*slot);
        }
        let prefix: Option<String> =
            sqlx::query_scalar("SELECT ipv6_prefix FROM hosts WHERE id = $1")
                .bind(host.as_uuid())
                .fetch_one(self.store.pool())
                .await
                .map_err(query("read a host's prefix"))?;
        let prefix =
            prefix.ok_or_else(|| corrupt("hosts.ipv6_prefix", format!("host {host} has none")))?;
        let net: Ipv6Net = prefix
            .parse()
            .map_err(|_| corrupt("hosts.ipv6_prefix", &prefix))?;
        let slot = u32::from(net.network().segments()[3]);
        let mut cache = self.cache();
        cache.make_room();
        cache.host_slots.insert(host, slot);
        Ok(slot)
    }
}

/// Instances removed in one transaction at most, so one pass after a large scale-down does not
/// hold the append lock for long.
const REMOVALS_PER_APPEND: usize = 500;

/// Output lines of a release command kept in its deploy's events when the agent reported
/// none (after a timeout), taken from the shipped logs.
const RELEASE_COMMAND_OUTPUT_LINES: i64 = 20;

/// An instance's last state report, as appended to its stream.
#[derive(Debug, Clone)]
struct LastReport {
    state: kiln_api::InstanceState,
    detail: Option<String>,
    exit_code: Option<i32>,
    output: Vec<String>,
}

/// The orchestrator bound to one leadership term, as the engine's store.
struct Fenced<'a> {
    inner: &'a Orchestrator,
    term: i64,
    /// States of the instances that unfinished plans wait on, read once when the pass starts,
    /// without stopped instances (those are read from their last report when asked for).
    /// A state a little older than the pass only delays a step to the next pass, which the
    /// report that changed it triggers.
    observed: Mutex<HashMap<InstanceId, Observed>>,
}

impl Fenced<'_> {
    /// Reads the states of every instance the unfinished plans wait on, in one query.
    async fn prefetch_observations(
        &self,
        unfinished: &[DeployProgress],
    ) -> Result<(), OrchestratorError> {
        let mut watched = Vec::new();
        for progress in unfinished {
            for step in &progress.plan.steps {
                for action in step.actions.iter().chain(&step.undo) {
                    match action {
                        Action::WaitHealthy { instances, .. } => watched.extend(instances),
                        Action::RunReleaseCommand { instance, .. } => watched.push(instance.id),
                        _ => {}
                    }
                }
            }
        }
        let observed = self.inner.running_states(&watched).await?;
        *self.observed.lock().unwrap_or_else(PoisonError::into_inner) =
            observed.into_iter().collect();
        Ok(())
    }
}

/// Reads the routes of `env` as its latest `RoutesChanged` event set them, if it has one.
async fn current_routes(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    env: EnvId,
) -> Result<Option<Vec<Route>>, OrchestratorError> {
    let payload: Option<serde_json::Value> = sqlx::query_scalar(
        "SELECT payload FROM events WHERE stream = $1 AND type = 'RoutesChanged'
         ORDER BY stream_version DESC LIMIT 1",
    )
    .bind(streams::env(env))
    .fetch_optional(&mut **tx)
    .await
    .map_err(query("read the current routes"))?;
    Ok(match payload.map(serde_json::from_value) {
        Some(Ok(Event::RoutesChanged { routes, .. })) => Some(routes),
        _ => None,
    })
}

fn parse_record(text: &str) -> Option<StepRecord> {
    let (kind, name) = text.split_once(':')?;
    match kind {
        "completed" => Some(StepRecord::Completed(name.to_owned())),
        "failed" => Some(StepRecord::Failed(name.to_owned())),
        "undone" => Some(StepRecord::Undone(name.to_owned())),
        _ => None,
    }
}

fn record_text(record: &StepRecord) -> String {
    match record {
        StepRecord::Completed(name) => format!("completed:{name}"),
        StepRecord::Failed(name) => format!("failed:{name}"),
        StepRecord::Undone(name) => format!("undone:{name}"),
    }
}

impl Fenced<'_> {
    /// Puts the release that ran before failed deploy `deploy` back as the env's release.
    /// When the deploy was a rollback, which set the env's config vars and secrets to the old
    /// release's before it made its release, they are set back to the previous release's in
    /// the same append. The events are computed from the current state and appended at the
    /// stream version they were computed from (retried on a conflict with a user's change),
    /// so a retried end appends nothing twice and never interleaves with a config change.
    // NOTE: config or secret changes saved but not deployed before the rollback are lost,
    // because the env gets the values of the release it returns to.
    async fn return_to_previous(
        &self,
        deploy: DeployId,
        env: EnvId,
    ) -> Result<(), OrchestratorError> {
        let pool = self.inner.store.pool();
        let row = sqlx::query(
            "SELECT d.previous_release_id, d.release_id, r.rollback_of
             FROM deploys d JOIN releases r ON r.id = d.release_id WHERE d.id = $1",
        )
        .bind(deploy.as_uuid())
        .fetch_one(pool)
        .await
        .map_err(query("read a deploy's releases"))?;
        let Some(previous) = row.get::<Option<Uuid>, _>("previous_release_id") else {
            return Ok(());
        };
        let previous = ReleaseId::from_uuid(previous);
        // A scale, restart or host replacement targets the release that runs; only a deploy
        // that made a rollback release changed the config and secrets.
        let rollback = row.get::<Uuid, _>("release_id") != previous.as_uuid()
            && row.get::<Option<Uuid>, _>("rollback_of").is_some();

        let stream = streams::env(env);
        let org = self.inner.env_org(env).await?;
        for _ in 0..RESTORE_ATTEMPTS {
            let version = self.inner.store.stream_version(&stream).await?;
            let mut events = if rollback {
                self.restore_events(deploy, env, previous).await?
            } else {
                Vec::new()
            };
            events.push(Event::EnvReleaseChanged {
                env_id: env,
                release_id: previous,
            });

            let mut tx = self.inner.begin(self.term).await?;
            let events = events
                .into_iter()
                .map(|event| NewEvent::org(org, event))
                .collect();
            match Store::append_in(
                &mut tx,
                &stream,
                ExpectedVersion::Exact(version),
                events,
                ACTOR,
            )
            .await
            {
                Ok(_) => {
                    tx.commit()
                        .await
                        .map_err(query("commit a failed deploy's release"))?;
                    return Ok(());
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(OrchestratorError::Restore {
            release: previous,
            message: format!("the environment kept changing in {RESTORE_ATTEMPTS} attempts"),
        })
    }

    /// Computes the events that set the env's config vars and secrets back to those of
    /// `previous`.
    async fn restore_events(
        &self,
        deploy: DeployId,
        env: EnvId,
        previous: ReleaseId,
    ) -> Result<Vec<Event>, OrchestratorError> {
        let pool = self.inner.store.pool();
        let restore_failed = |error: crate::api::error::ApiError| OrchestratorError::Restore {
            release: previous,
            message: error.message().to_owned(),
        };
        let Some(release) = crate::api::releases::by_id(pool, previous)
            .await
            .map_err(restore_failed)?
        else {
            return Err(corrupt("deploys.previous_release_id", previous));
        };
        match crate::api::targets::restore(pool, env, &release).await {
            Ok((events, _)) => Ok(events),
            // A value the release pinned is gone: there is nothing to restore it from, and
            // the deploy must still end.
            Err(error) if error.code() == kiln_api::ErrorCode::FailedPrecondition => {
                tracing::warn!(%deploy, %env, release = %previous, error = error.message(), "config and secrets of the release returned to were not restored");
                Ok(Vec::new())
            }
            Err(error) => Err(restore_failed(error)),
        }
    }
}

/// Attempts at appending a failed deploy's return to its previous release while users change
/// the env's config at the same time.
const RESTORE_ATTEMPTS: usize = 5;

impl engine::Store for Fenced<'_> {
    type Error = OrchestratorError;

    async fn unfinished(&self) -> Result<Vec<DeployProgress>, OrchestratorError> {
        // Plans never change once stored, so only those not cached yet are read and parsed.
        let cached: Vec<Uuid> = self
            .inner
            .cache()
            .plans
            .keys()
            .map(|deploy| deploy.as_uuid())
            .collect();
        let rows = sqlx::query(
            "SELECT d.id, d.env_id,
                    CASE WHEN d.id = ANY($1) THEN NULL ELSE p.plan END AS plan,
                    EXTRACT(EPOCH FROM now() - COALESCE(s.last, p.created_at))::bigint AS elapsed,
                    COALESCE(s.steps, ARRAY[]::text[]) AS steps
             FROM deploys d JOIN deploy_plans p ON p.deploy_id = d.id
             LEFT JOIN LATERAL (
                 SELECT array_agg(step ORDER BY position) AS steps, max(time) AS last
                 FROM deploy_steps WHERE deploy_id = d.id) s ON true
             WHERE d.state IN ('pending', 'in_progress') ORDER BY d.created_at",
        )
        .bind(&cached)
        .fetch_all(self.inner.store.pool())
        .await
        .map_err(query("list unfinished deploys"))?;

        let mut unfinished = Vec::with_capacity(rows.len());
        for row in rows {
            let deploy = DeployId::from_uuid(row.get("id"));
            let env = EnvId::from_uuid(row.get("env_id"));
            let value: Option<serde_json::Value> = row.get("plan");
            let plan = match value {
                Some(value) => {
                    let plan: Arc<Plan> = Arc::new(
                        serde_json::from_value(value)
                            .map_err(|error| corrupt("deploy_plans.plan", error))?,
                    );
                    let mut cache = self.inner.cache();
                    cache.make_room();
                    cache.plans.insert(deploy, Arc::clone(&plan));
                    cache.deploy_envs.insert(deploy, env);
                    plan
                }
                None => {
                    let cached = self.inner.cache().plans.get(&deploy).cloned();
                    cached.ok_or_else(|| corrupt("deploy_plans.plan", "a cached plan vanished"))?
                }
            };
            let steps: Vec<String> = row.get("steps");
            let elapsed: i64 = row.get("elapsed");
            unfinished.push(DeployProgress {
                deploy,
                plan,
                records: steps.iter().filter_map(|step| parse_record(step)).collect(),
                step_elapsed_secs: u64::try_from(elapsed).unwrap_or(0),
            });
        }
        self.prefetch_observations(&unfinished).await?;
        Ok(unfinished)
    }

    async fn apply(
        &self,
        _fence: Fence,
        plan: &Plan,
        action: &Action,
    ) -> Result<(), OrchestratorError> {
        let (inner, term) = (self.inner, self.term);
        match action {
            Action::RunReleaseCommand { instance, .. } => {
                inner.start_instances(term, plan.env, &[instance]).await
            }
            Action::StartInstances { instances } => {
                let instances: Vec<_> = instances.iter().collect();
                inner.start_instances(term, plan.env, &instances).await
            }
            Action::WaitHealthy { .. } => Ok(()),
            Action::UpdateRoutes { add, remove, .. } => {
                inner.update_routes(term, plan, add, remove).await
            }
            Action::StopInstances { instances, .. } => inner.stop_instances(term, instances).await,
            Action::SetRelease { release } => {
                let Some(release) = release else {
                    return Ok(());
                };
                let event = Event::EnvReleaseChanged {
                    env_id: plan.env,
                    release_id: *release,
                };
                inner.append_env_event(term, plan.env, event).await
            }
            Action::SetScale { counts } => {
                let event = Event::EnvScaled {
                    env_id: plan.env,
                    counts: counts.clone(),
                };
                inner.append_env_event(term, plan.env, event).await
            }
        }
    }

    async fn observe(
        &self,
        instances: &[InstanceId],
    ) -> Result<BTreeMap<InstanceId, Observed>, OrchestratorError> {
        {
            let prefetched = self.observed.lock().unwrap_or_else(PoisonError::into_inner);
            let found: BTreeMap<InstanceId, Observed> = instances
                .iter()
                .filter_map(|id| Some((*id, prefetched.get(id)?.clone())))
                .collect();
            if found.len() == instances.len() {
                return Ok(found);
            }
        }
        let mut observed = self.inner.running_states(instances).await?;

        // The projection keeps no exit code and drops removed instances, so stopped ones are
        // read from their last report in the log.
        let stopped: Vec<InstanceId> = instances
            .iter()
            .filter(|id| !observed.contains_key(id))
            .copied()
            .collect();
        for (id, report) in self.inner.last_reports(&stopped).await? {
            observed.insert(
                id,
                convert::observed(report.state, report.exit_code, report.detail),
            );
        }
        Ok(observed)
    }

    async fn record(
        &self,
        _fence: Fence,
        deploy: DeployId,
        record: StepRecord,
        reason: Option<String>,
    ) -> Result<(), OrchestratorError> {
        let env = self.inner.deploy_env(deploy).await?;
        let output = match &record {
            StepRecord::Completed(step) | StepRecord::Failed(step)
                if step == RELEASE_COMMAND_STEP =>
            {
                self.inner.release_command_output(deploy, env).await?
            }
            _ => Vec::new(),
        };
        let event = Event::DeployStepCompleted {
            deploy_id: deploy,
            env_id: env,
            step: record_text(&record),
            detail: reason.unwrap_or_default(),
            output,
        };
        self.inner
            .append_deploy_event(self.term, deploy, env, event)
            .await
    }

    async fn routes_drained(
        &self,
        plan: &Plan,
        step_elapsed_secs: u64,
    ) -> Result<bool, OrchestratorError> {
        if crate::ingress_acks::routes_applied(self.inner.store.pool(), plan.env).await? {
            return Ok(true);
        }
        let deadline = self.inner.route_drain_deadline;
        if step_elapsed_secs < deadline.as_secs() {
            return Ok(false);
        }
        tracing::warn!(
            deploy = %plan.deploy,
            env = %plan.env,
            ?deadline,
            "an ingress has not applied the route change in time; stopping instances anyway"
        );
        Ok(true)
    }

    async fn finish(
        &self,
        _fence: Fence,
        deploy: DeployId,
        outcome: Outcome,
    ) -> Result<(), OrchestratorError> {
        let env = self.inner.deploy_env(deploy).await?;
        let (state, failure) = match outcome {
            Outcome::Succeeded => (DeployState::Succeeded, None),
            Outcome::Failed { reason } => {
                let failed: Option<(String, String)> = sqlx::query_as(
                    "SELECT step, detail FROM deploy_steps
                     WHERE deploy_id = $1 AND step LIKE 'failed:%'
                     ORDER BY position LIMIT 1",
                )
                .bind(deploy.as_uuid())
                .fetch_optional(self.inner.store.pool())
                .await
                .map_err(query("read a deploy's failure"))?;
                let failure = match failed {
                    Some((step, detail)) if !detail.is_empty() => {
                        let aftermath = if step
                            == record_text(&StepRecord::Failed(RELEASE_COMMAND_STEP.to_owned()))
                        {
                            "no instance was replaced"
                        } else {
                            "the deploy was rolled back"
                        };
                        format!("{detail}; {aftermath}")
                    }
                    _ => reason,
                };
                (DeployState::Failed, Some(failure))
            }
        };
        // The API names the target as the env's release when the deploy is requested, so a
        // failed deploy puts the previous release back.
        if state == DeployState::Failed {
            self.return_to_previous(deploy, env).await?;
        }

        let event = Event::DeployStateChanged {
            deploy_id: deploy,
            env_id: env,
            state,
            failure,
        };
        self.inner
            .append_deploy_event(self.term, deploy, env, event)
            .await?;
        tracing::info!(%deploy, ?state, "deploy finished");
        Ok(())
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
