//! Deploy plans and restarts: deploys whose scheduler plan is fixed by the API, not by the
//! orchestrator.
//!
//! `POST .../plans` resolves what a deploy would roll out, runs the planner over the same
//! snapshot the orchestrator reads, and stores the result bound to the environment's
//! event-stream version. The plan id, the deploy id and the ids of every new instance are
//! derived from the environment, that version and the request, so the same request against
//! the same state returns the same plan. `POST .../plans/{plan}/apply` appends the deploy's
//! events with that version as the expected one, so any change to the environment in between
//! (config, secrets, scale, another deploy) makes the append fail with `plan_conflict`. It
//! stores the scheduler's plan for the deploy in the same transaction, and the orchestrator
//! runs a deploy with a stored plan as it is.
//!
//! `POST .../restart` plans a restart of the current release the same way and records it as a
//! deploy at once.

use std::collections::BTreeSet;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kiln_api::types::{
    ApplyPlan, CreatePlan, CreatedDeploy, DeployState, DeployStrategy, Plan, PlanId, PlanRelease,
    Release, ReleaseChange, RestartEnv,
};
use kiln_api::{ErrorCode, Event};
use kiln_core::{DeployId, EnvId, ReleaseId};
use kiln_scheduler::plan::{Plan as SchedulerPlan, Timeouts};
use sha2::{Digest, Sha256};
use sqlx::{Postgres, Row, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use super::error::{ApiError, error_chain};
use super::extract::JsonBody;
use super::releases::validate_release;
use super::scope::EnvScope;
use super::{AppState, retry_on_conflict, scope, targets};
use crate::auth::Caller;
use crate::orchestrator::convert;
use crate::orchestrator::pg::Orchestrator;
use crate::orchestrator::preview::{Preview, PreviewTarget};
use crate::store::{ExpectedVersion, NewEvent, Store, StoreError, streams};

/// How long a plan can be applied after it was made. A plan made again with the same request
/// against the same state gets the same id and a new expiry.
pub const PLAN_TTL: time::Duration = time::Duration::hours(1);

/// `POST .../plans`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
    JsonBody(request): JsonBody<CreatePlan>,
) -> Result<(StatusCode, Json<Plan>), ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    if let kiln_api::DeployTarget::NewRelease(release) = &request.target {
        validate_release(release)?;
    }
    let request_json = serde_json::to_vec(&request)
        .map_err(|_| ApiError::internal("plan request does not serialize"))?;

    let plan = retry_on_conflict(|| async {
        let pool = state.store.pool();
        let version = state.store.stream_version(&streams::env(env.id)).await?;
        reject_unfinished(pool, env.id, ErrorCode::FailedPrecondition).await?;

        let deploy = DeployId::from_uuid(derive_uuid(&[
            b"deploy",
            env.id.as_uuid().as_bytes(),
            &version.to_be_bytes(),
            &request_json,
        ]));
        let new_release =
            ReleaseId::from_uuid(derive_uuid(&[b"release", deploy.as_uuid().as_bytes()]));
        let prepared = targets::prepare(pool, env.id, &request.target, new_release).await?;
        let strategy = request.strategy.unwrap_or(prepared.release.spec.strategy);

        let preview = orchestrator(&state)?
            .preview(
                deploy,
                env.id,
                PreviewTarget::Deploy {
                    release: prepared.release.id,
                    spec: &prepared.release.spec,
                    strategy,
                },
            )
            .await
            .map_err(orchestrator_error)?;
        let scheduled = planned(&preview, version)?;

        let change = release_change(pool, env.id, &prepared, scheduled.from_release).await?;
        let id = PlanId::from_uuid(derive_uuid(&[
            b"plan",
            deploy.as_uuid().as_bytes(),
            scheduled.digest().as_bytes(),
        ]));
        let now = crate::store::now();
        let summary = Plan {
            id,
            env_id: env.id,
            deploy_id: deploy,
            base_version: version,
            strategy,
            release: change,
            steps: convert::api_steps(scheduled, &preview.host_names, &preview.old_hosts),
            created_at: now,
            expires_at: now + PLAN_TTL,
        };
        store_plan(pool, &summary, scheduled, &prepared.events).await
    })
    .await?;
    tracing::info!(plan = %plan.id, env = %env.id, version = plan.base_version, "deploy planned");
    Ok((StatusCode::CREATED, Json(plan)))
}

/// `GET .../plans/{plan}`.
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env, plan)): Path<(String, String, String, String)>,
) -> Result<Json<Plan>, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    let id = parse_plan_id(&plan)?;
    let stored = load(state.store.pool(), env.id, id).await?;
    Ok(Json(stored.summary))
}

/// `POST .../plans/{plan}/apply`.
pub async fn apply(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env, plan)): Path<(String, String, String, String)>,
    JsonBody(_request): JsonBody<ApplyPlan>,
) -> Result<(StatusCode, Json<CreatedDeploy>), ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    let id = parse_plan_id(&plan)?;
    let pool = state.store.pool();
    let stored = load(pool, env.id, id).await?;
    let summary = &stored.summary;

    let mut tx = state.store.begin().await?;
    let applied: Option<OffsetDateTime> =
        sqlx::query_scalar("SELECT applied_at FROM plans WHERE id = $1 FOR UPDATE")
            .bind(id.as_uuid())
            .fetch_one(&mut *tx)
            .await
            .map_err(ApiError::database("lock plan"))?;
    if applied.is_some() {
        return Err(ApiError::new(
            ErrorCode::FailedPrecondition,
            format!(
                "plan {id} was already applied as deploy {}; make a new plan to deploy again",
                summary.deploy_id
            ),
        )
        .with_details(serde_json::json!({
            "plan_id": id, "deploy_id": summary.deploy_id, "reason": "applied",
        })));
    }
    if summary.expires_at <= crate::store::now() {
        return Err(ApiError::new(
            ErrorCode::FailedPrecondition,
            format!(
                "plan {id} expired at {}; make a new plan",
                summary
                    .expires_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            ),
        )
        .with_details(serde_json::json!({ "plan_id": id, "reason": "expired" })));
    }
    check_hosts(&mut tx, &stored.plan, summary).await?;
    reject_unfinished_in(&mut tx, env.id).await?;

    let mut events = stored.events;
    for event in &mut events {
        // The release is created now, not when the plan was made.
        if let Event::ReleaseCreated { release } = event {
            release.created_at = crate::store::now();
        }
    }
    events.push(Event::DeployRequested {
        deploy_id: summary.deploy_id,
        env_id: env.id,
        release_id: summary.release.to.id,
        previous_release_id: stored.plan.from_release,
        strategy: summary.strategy,
    });
    events.push(Event::EnvReleaseChanged {
        env_id: env.id,
        release_id: summary.release.to.id,
    });
    let cursor = record_deploy(&mut tx, &env, &caller, &stored.plan, events).await?;
    sqlx::query("UPDATE plans SET applied_at = now() WHERE id = $1")
        .bind(id.as_uuid())
        .execute(&mut *tx)
        .await
        .map_err(ApiError::database("mark plan applied"))?;
    tx.commit()
        .await
        .map_err(ApiError::database("commit plan apply"))?;
    tracing::info!(plan = %id, deploy = %summary.deploy_id, env = %env.id, "plan applied");

    let created = created_deploy(pool, summary.deploy_id, cursor).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// `POST .../restart`.
pub async fn restart(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
    JsonBody(request): JsonBody<RestartEnv>,
) -> Result<(StatusCode, Json<CreatedDeploy>), ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    let pool = state.store.pool();

    let created = retry_on_conflict(|| async {
        let version = state.store.stream_version(&streams::env(env.id)).await?;
        let current = current_release(pool, env.id).await?;
        if let Some(process) = &request.process
            && !current.spec.processes.contains_key(process)
        {
            let known: Vec<&str> = current.spec.processes.keys().map(|p| p.as_str()).collect();
            return Err(ApiError::invalid(
                "process",
                format!(
                    "release v{} has no process type {process}; restart one of: {}",
                    current.version,
                    known.join(", ")
                ),
            ));
        }
        reject_unfinished(pool, env.id, ErrorCode::FailedPrecondition).await?;

        let deploy = DeployId::new();
        let preview = orchestrator(&state)?
            .preview(
                deploy,
                env.id,
                PreviewTarget::Restart {
                    process: request.process.as_ref(),
                    spec: &current.spec,
                },
            )
            .await
            .map_err(orchestrator_error)?;
        let scheduled = planned(&preview, version)?;

        let mut tx = state.store.begin().await?;
        reject_unfinished_in(&mut tx, env.id).await?;
        let event = Event::DeployRequested {
            deploy_id: deploy,
            env_id: env.id,
            release_id: current.id,
            previous_release_id: Some(current.id),
            strategy: current.spec.strategy,
        };
        let cursor = record_deploy(&mut tx, &env, &caller, scheduled, vec![event])
            .await
            .map_err(|error| match error.code() {
                // A restart has no plan of the user's to conflict with: read again and retry.
                ErrorCode::PlanConflict => ApiError::new(ErrorCode::Conflict, "env changed"),
                _ => error,
            })?;
        tx.commit()
            .await
            .map_err(ApiError::database("commit restart"))?;
        tracing::info!(%deploy, env = %env.id, process = ?request.process, "restart requested");
        created_deploy(pool, deploy, cursor).await
    })
    .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// A stored plan.
struct Stored {
    summary: Plan,
    plan: SchedulerPlan,
    events: Vec<Event>,
}

fn parse_plan_id(text: &str) -> Result<PlanId, ApiError> {
    text.parse()
        .map_err(|error: kiln_api::PlanIdError| ApiError::invalid("plan", error.to_string()))
}

/// Loads a plan of `env`; a plan of another environment is not found.
async fn load(pool: &sqlx::PgPool, env: EnvId, id: PlanId) -> Result<Stored, ApiError> {
    let row = sqlx::query(
        "SELECT plan, summary, events, expires_at FROM plans WHERE id = $1 AND env_id = $2",
    )
    .bind(id.as_uuid())
    .bind(env.as_uuid())
    .fetch_optional(pool)
    .await
    .map_err(ApiError::database("load plan"))?
    .ok_or_else(|| ApiError::not_found("plan", id))?;

    let corrupt = |_| ApiError::internal("stored plan is invalid");
    let mut summary: Plan = serde_json::from_value(row.get("summary")).map_err(corrupt)?;
    summary.expires_at = row.get("expires_at");
    Ok(Stored {
        summary,
        plan: serde_json::from_value(row.get("plan")).map_err(corrupt)?,
        events: serde_json::from_value(row.get("events")).map_err(corrupt)?,
    })
}

/// Stores a plan, or renews the expiry of the same plan made before, and returns it as stored.
async fn store_plan(
    pool: &sqlx::PgPool,
    summary: &Plan,
    scheduled: &SchedulerPlan,
    events: &[Event],
) -> Result<Plan, ApiError> {
    // Plans are not events, so deleting them loses no history. A plan expired for a day can no
    // longer be applied by anyone.
    sqlx::query("DELETE FROM plans WHERE expires_at < now() - interval '1 day'")
        .execute(pool)
        .await
        .map_err(ApiError::database("prune plans"))?;

    let encode = |_| ApiError::internal("plan does not serialize");
    let row = sqlx::query(
        "INSERT INTO plans (id, env_id, deploy_id, base_version, events, release_id, strategy,
                            plan, summary, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (id) DO UPDATE SET expires_at = EXCLUDED.expires_at
         RETURNING summary, created_at, expires_at",
    )
    .bind(summary.id.as_uuid())
    .bind(summary.env_id.as_uuid())
    .bind(summary.deploy_id.as_uuid())
    .bind(i64::try_from(summary.base_version).unwrap_or(i64::MAX))
    .bind(serde_json::to_value(events).map_err(encode)?)
    .bind(summary.release.to.id.as_uuid())
    .bind(strategy_text(summary.strategy))
    .bind(serde_json::to_value(scheduled).map_err(encode)?)
    .bind(serde_json::to_value(summary).map_err(encode)?)
    .bind(summary.created_at)
    .bind(summary.expires_at)
    .fetch_one(pool)
    .await
    .map_err(ApiError::database("store plan"))?;

    let mut stored: Plan = serde_json::from_value(row.get("summary"))
        .map_err(|_| ApiError::internal("stored plan is invalid"))?;
    stored.created_at = row.get("created_at");
    stored.expires_at = row.get("expires_at");
    Ok(stored)
}

fn strategy_text(strategy: DeployStrategy) -> &'static str {
    match strategy {
        DeployStrategy::Rolling => "rolling",
        DeployStrategy::Immediate => "immediate",
    }
}

/// Appends a deploy's events to the env stream at the plan's base version, stores its plan
/// for the orchestrator and marks it in progress. Returns the event cursor just before the
/// deploy's first event.
async fn record_deploy(
    tx: &mut Transaction<'static, Postgres>,
    env: &EnvScope,
    caller: &Caller,
    scheduled: &SchedulerPlan,
    events: Vec<Event>,
) -> Result<u64, ApiError> {
    let events = events
        .into_iter()
        .map(|event| NewEvent::org(env.org_id(), event))
        .collect();
    let envelopes = Store::append_in(
        tx,
        &streams::env(env.id),
        ExpectedVersion::Exact(scheduled.base_version),
        events,
        &caller.actor(),
    )
    .await
    .map_err(|error| match error {
        StoreError::Conflict { actual, .. } => ApiError::new(
            ErrorCode::PlanConflict,
            format!(
                "the environment changed since the plan was made: its event stream is at \
                 version {actual}, the plan was made at version {}; make a new plan",
                scheduled.base_version
            ),
        )
        .with_details(serde_json::json!({
            "base_version": scheduled.base_version, "current_version": actual,
        })),
        other => ApiError::from(other),
    })?;
    let cursor = envelopes.first().map_or(0, |first| first.seq - 1);

    let plan = serde_json::to_value(scheduled)
        .map_err(|_| ApiError::internal("plan does not serialize"))?;
    sqlx::query("INSERT INTO deploy_plans (deploy_id, plan, base_version) VALUES ($1, $2, $3)")
        .bind(scheduled.deploy.as_uuid())
        .bind(plan)
        .bind(i64::try_from(scheduled.base_version).unwrap_or(i64::MAX))
        .execute(&mut **tx)
        .await
        .map_err(ApiError::database("store deploy plan"))?;

    let event = Event::DeployStateChanged {
        deploy_id: scheduled.deploy,
        env_id: env.id,
        state: DeployState::InProgress,
        failure: None,
    };
    Store::append_in(
        tx,
        &streams::deploy(scheduled.deploy),
        ExpectedVersion::Any,
        vec![NewEvent::org(env.org_id(), event)],
        &caller.actor(),
    )
    .await?;
    Ok(cursor)
}

/// Fails with `plan_conflict` when a host the plan places an instance on is no longer ready.
async fn check_hosts(
    tx: &mut Transaction<'static, Postgres>,
    scheduled: &SchedulerPlan,
    summary: &Plan,
) -> Result<(), ApiError> {
    let hosts: BTreeSet<Uuid> = scheduled
        .started_instances()
        .map(|instance| instance.host.as_uuid())
        .collect();
    let hosts: Vec<Uuid> = hosts.into_iter().collect();
    let rows = sqlx::query("SELECT name, state FROM hosts WHERE id = ANY($1) ORDER BY name")
        .bind(&hosts)
        .fetch_all(&mut **tx)
        .await
        .map_err(ApiError::database("read plan hosts"))?;
    let not_ready = rows
        .iter()
        .map(|row| (row.get::<String, _>("name"), row.get::<String, _>("state")))
        .find(|(_, state)| state != "ready");
    if rows.len() < hosts.len() {
        return Err(ApiError::new(
            ErrorCode::PlanConflict,
            format!("a host of plan {} was removed; make a new plan", summary.id),
        ));
    }
    if let Some((name, host_state)) = not_ready {
        return Err(ApiError::new(
            ErrorCode::PlanConflict,
            format!(
                "host {name} of plan {} is {host_state} now; make a new plan",
                summary.id
            ),
        )
        .with_details(serde_json::json!({ "host": name, "state": host_state })));
    }
    Ok(())
}

/// Fails with `code` when the environment has a deploy that has not finished.
async fn reject_unfinished(
    pool: &sqlx::PgPool,
    env: EnvId,
    code: ErrorCode,
) -> Result<(), ApiError> {
    let unfinished: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM deploys WHERE env_id = $1 AND state IN ('pending', 'in_progress')
         ORDER BY created_at LIMIT 1",
    )
    .bind(env.as_uuid())
    .fetch_optional(pool)
    .await
    .map_err(ApiError::database("find unfinished deploys"))?;
    match unfinished {
        None => Ok(()),
        Some(deploy) => Err(unfinished_error(code, DeployId::from_uuid(deploy))),
    }
}

/// [`reject_unfinished`] inside a transaction, with `plan_conflict`.
async fn reject_unfinished_in(
    tx: &mut Transaction<'static, Postgres>,
    env: EnvId,
) -> Result<(), ApiError> {
    let unfinished: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM deploys WHERE env_id = $1 AND state IN ('pending', 'in_progress')
         ORDER BY created_at LIMIT 1",
    )
    .bind(env.as_uuid())
    .fetch_optional(&mut **tx)
    .await
    .map_err(ApiError::database("find unfinished deploys"))?;
    match unfinished {
        None => Ok(()),
        Some(deploy) => Err(unfinished_error(
            ErrorCode::PlanConflict,
            DeployId::from_uuid(deploy),
        )),
    }
}

fn unfinished_error(code: ErrorCode, deploy: DeployId) -> ApiError {
    ApiError::new(
        code,
        format!("deploy {deploy} of this environment has not finished; wait for it (`kiln status`) and try again"),
    )
    .with_details(serde_json::json!({ "deploy_id": deploy }))
}

/// The orchestrator's planner for the API. It uses the default deadlines, as the leader's
/// orchestrator does.
fn orchestrator(state: &AppState) -> Result<Orchestrator, ApiError> {
    Orchestrator::new(
        state.store.clone(),
        state.settings.ula_prefix,
        Timeouts::default(),
    )
    .map_err(orchestrator_error)
}

fn orchestrator_error(error: crate::orchestrator::pg::OrchestratorError) -> ApiError {
    tracing::error!(error = %error_chain(&error), "planning failed");
    ApiError::internal("planning failed")
}

/// The plan of a preview, or why there is none. A plan read at another version than
/// `version` is a conflict, which the caller retries.
fn planned(preview: &Preview, version: u64) -> Result<&SchedulerPlan, ApiError> {
    let plan = preview.plan.as_ref().map_err(|error| {
        ApiError::new(
            ErrorCode::FailedPrecondition,
            format!("the deploy cannot be planned: {}", error_chain(error)),
        )
    })?;
    if plan.base_version != version {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "the environment changed while the plan was made; retry",
        ));
    }
    Ok(plan)
}

/// Describes the change from the env's current release to the prepared one.
async fn release_change(
    pool: &sqlx::PgPool,
    env: EnvId,
    prepared: &targets::Prepared,
    from: Option<ReleaseId>,
) -> Result<ReleaseChange, ApiError> {
    let secrets_now: i64 = sqlx::query_scalar("SELECT secrets_version FROM envs WHERE id = $1")
        .bind(env.as_uuid())
        .fetch_one(pool)
        .await
        .map_err(ApiError::database("read secrets version"))?;
    // A release that exists keeps the secrets it was made with. A new one gets the current
    // set, which a rollback's restore events move on before the release is created.
    let secrets_to = if prepared.creates_release {
        prepared
            .events
            .iter()
            .filter_map(|event| match event {
                Event::SecretSet {
                    secrets_version, ..
                }
                | Event::SecretUnset {
                    secrets_version, ..
                } => Some(*secrets_version),
                _ => None,
            })
            .max()
            .unwrap_or(secrets_now as u64)
    } else {
        targets::secrets_version_at(pool, env, prepared.release.id).await?
    };
    let to = plan_release(&prepared.release, secrets_to);

    let from = match from {
        Some(id) => {
            let release = super::releases::by_id(pool, id)
                .await?
                .ok_or_else(|| ApiError::internal("current release is missing"))?;
            let secrets = targets::secrets_version_at(pool, env, id).await?;
            Some(plan_release(&release, secrets))
        }
        None => None,
    };

    let to_vars = match prepared.events.iter().find_map(|event| match event {
        Event::ConfigChanged { set, unset, .. } => Some((set, unset)),
        _ => None,
    }) {
        // A rollback restores old values: the change is that event.
        Some((set, unset)) => (set.keys().cloned().collect(), unset.clone()),
        None => {
            let before = match &from {
                Some(from) => targets::config_at(pool, env, from.config_version).await?,
                None => Default::default(),
            };
            let after = targets::config_at(pool, env, to.config_version).await?;
            let set = after
                .iter()
                .filter(|(name, value)| before.get(*name) != Some(*value))
                .map(|(name, _)| name.clone())
                .collect();
            let unset = before
                .keys()
                .filter(|name| !after.contains_key(*name))
                .cloned()
                .collect();
            (set, unset)
        }
    };

    Ok(ReleaseChange {
        image_changed: from
            .as_ref()
            .is_none_or(|from| from.image.digest != to.image.digest),
        secrets_changed: from
            .as_ref()
            .is_none_or(|from| from.secrets_version != to.secrets_version),
        config_set: to_vars.0,
        config_unset: to_vars.1,
        creates_release: prepared.creates_release,
        from,
        to,
    })
}

fn plan_release(release: &Release, secrets_version: u64) -> PlanRelease {
    PlanRelease {
        id: release.id,
        version: release.version,
        image: release.image.clone(),
        config_version: release.config_version,
        secrets_version,
        rollback_of: release.rollback_of,
    }
}

async fn current_release(pool: &sqlx::PgPool, env: EnvId) -> Result<Release, ApiError> {
    let id = super::deploys::current_release(pool, env)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::FailedPrecondition,
                "the environment has no release yet; deploy one first (`kiln deploy`)",
            )
        })?;
    super::releases::by_id(pool, id)
        .await?
        .ok_or_else(|| ApiError::internal("current release is missing"))
}

async fn created_deploy(
    pool: &sqlx::PgPool,
    deploy: DeployId,
    cursor: u64,
) -> Result<CreatedDeploy, ApiError> {
    let deploy = super::deploys::load(pool, deploy)
        .await?
        .ok_or_else(|| ApiError::internal("deploy missing right after it was appended"))?;
    let release = super::releases::by_id(pool, deploy.release_id)
        .await?
        .ok_or_else(|| ApiError::internal("release missing right after it was appended"))?;
    Ok(CreatedDeploy {
        deploy,
        release,
        cursor,
    })
}

/// A UUID from the SHA-256 of `parts`, each length-prefixed so different splits differ.
fn derive_uuid(parts: &[&[u8]]) -> Uuid {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let hash = hasher.finalize();
    let mut bytes = [0_u8; 16];
    bytes.copy_from_slice(&hash[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}
