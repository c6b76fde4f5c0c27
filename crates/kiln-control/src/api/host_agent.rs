//! Endpoints for host agents (host token). Every call acts on the token's own host: a host
//! token cannot name another host, and instance ids of other hosts are `not_found`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv6Addr;
use std::sync::{Arc, PoisonError};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use base64::Engine;
use kiln_api::types::{
    Assignment, AssignmentsQuery, DesiredState, Heartbeat, HostAssignments, HostLease, Instance,
    InstanceNetwork, InstanceSecrets, LogBatch, MAX_REPORTED_OUTPUT_LINE_BYTES,
    MAX_REPORTED_OUTPUT_LINES, MAX_STATE_REPORTS, OverlayPeer, RegisterHost, ReleaseSpec,
    ReportInstanceState, ReportInstanceStates, ReportedInstanceStates, ServicePort,
};
use kiln_api::{ErrorCode, Event};
use kiln_core::{
    AppId, AppName, EnvId, EnvName, HostId, InstanceId, OrgId, OrgName, ProcessName, ReleaseId,
};
use kiln_scheduler::plan::RELEASE_COMMAND_PROCESS;
use sqlx::Row;

use super::error::ApiError;
use super::events::wait_duration;
use super::extract::{JsonBody, LossyJsonBody, QueryParams};
use super::host_changes::{ChangeIndex, Changes, HostChanges, skips_assignments};
use super::{AppState, scope};
use crate::auth::Caller;
use crate::secrets::Sealed;
use crate::store::{ExpectedVersion, NewEvent, StoreError, StreamEvent, streams};

/// Maximum number of lines in one log batch.
pub const MAX_LOG_LINES: usize = 10_000;
/// Maximum length of a log line, in bytes.
pub const MAX_LOG_LINE_LEN: usize = 16 * 1024;
/// Maximum length of a state detail, in bytes.
pub const MAX_DETAIL_LEN: usize = kiln_api::types::MAX_REPORT_DETAIL_BYTES;

/// Key of the advisory lock that orders log inserts, so a follower's `after` cursor never
/// passes a line that commits later with a lower id.
const LOG_LOCK_KEY: i64 = 0x6b69_6c6e_0002;

/// Attempts at picking a free host prefix when registrations race.
const PREFIX_ATTEMPTS: usize = 5;

/// `POST /v1/host/register`.
pub async fn register(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<RegisterHost>,
) -> Result<Json<HostLease>, ApiError> {
    let host_id = scope::host(&caller)?;
    if request.capacity.vcpus == 0 || request.capacity.memory_mib < 256 {
        return Err(ApiError::invalid(
            "capacity",
            "capacity needs at least 1 vCPU and 256 MiB of memory",
        ));
    }
    let key = base64::engine::general_purpose::STANDARD.decode(&request.overlay_public_key);
    if key.map(|key| key.len()) != Ok(32) {
        return Err(ApiError::invalid(
            "overlay_public_key",
            "overlay_public_key must be the base64 of a 32-byte WireGuard public key",
        ));
    }

    let stream = streams::host(host_id);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let version = state.store.stream_version(&stream).await?;
        let host = super::hosts::load(state.store.pool(), host_id).await?;
        let prefix = match host.ipv6_prefix {
            Some(prefix) => prefix,
            None => free_prefix(state.store.pool(), state.settings.ula_prefix).await?,
        };
        let event = Event::HostRegistered {
            host_id,
            capacity: request.capacity,
            driver: request.driver,
            overlay_public_key: request.overlay_public_key.clone(),
            overlay_endpoint: request.overlay_endpoint,
            ipv6_prefix: prefix,
        };
        let result = state
            .store
            .append(
                &stream,
                ExpectedVersion::Exact(version),
                vec![NewEvent::cluster(event)],
                &caller.actor(),
            )
            .await;
        match result {
            Ok(_) => break,
            Err(StoreError::Duplicate { .. } | StoreError::Conflict { .. })
                if attempt < PREFIX_ATTEMPTS =>
            {
                continue;
            }
            Err(error) => return Err(error.into()),
        }
    }

    renew_lease(&state, host_id, 0).await?;
    lease(&state, host_id).await.map(Json)
}

/// `POST /v1/host/heartbeat`.
pub async fn heartbeat(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<Heartbeat>,
) -> Result<Json<HostLease>, ApiError> {
    let host_id = scope::host(&caller)?;
    let host = super::hosts::load(state.store.pool(), host_id).await?;
    if host.ipv6_prefix.is_none() {
        return Err(ApiError::new(
            ErrorCode::FailedPrecondition,
            "this host has not registered yet; call /v1/host/register first",
        ));
    }
    renew_lease(&state, host_id, request.running_instances).await?;
    lease(&state, host_id).await.map(Json)
}

/// `GET /v1/host/assignments`: the host's desired set, long-polling for changes after
/// `after`. With `changes=true` the response contains only what changed after `after` when
/// the host change feed covers that range (see [`HostChanges::changes`]).
pub async fn assignments(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(query): QueryParams<AssignmentsQuery>,
) -> Result<Json<HostAssignments>, ApiError> {
    let host_id = scope::host(&caller)?;
    let wait = wait_duration(query.wait)?;
    let after = query.after.unwrap_or(0);

    let feed = HostChanges::of(&state.store, &state.notifier).await?;
    let mut index = feed.subscribe();
    let covered = {
        let current = index.borrow_and_update();
        after != 0 && after >= current.from && after <= current.head
    };
    let changed = if covered {
        wait_for_change(&mut index, host_id, after, wait).await
    } else {
        wait_for_change_in_log(&state, host_id, after, wait).await?
    };
    let cursor = match changed {
        Some(head) => head,
        None => state.store.head().await?.max(after),
    };
    // The log head can be ahead of the feed's last read. The feed's head keeps the agent's
    // next long poll on the feed, which costs no query per append, where the log path queries
    // after every append. Either cursor is safe, because the assignments are read after it is
    // chosen. A feed that has not moved past `after` (stalled, or the cursor is its head)
    // leaves the cursor alone, so the agent still gets a newer one.
    let feed_head = index.borrow().head;
    let cursor = if feed_head > after {
        cursor.min(feed_head)
    } else {
        cursor
    };

    // Changes come from the feed's log, so only when the feed has read up to the cursor. A
    // feed behind the cursor (stalled, or not yet woken) gets the complete set, so the agent
    // still moves on. Every event up to the cursor is visible to the reads below, because
    // appends draw `seq` in commit order. A later event may show in the rows too. The next
    // call then lists its instances again, which is harmless.
    let changes = match query.changes {
        Some(true) if after != 0 && cursor <= feed_head => {
            let current = index.borrow().clone();
            feed.changes(&current, host_id, after, cursor)
        }
        _ => None,
    };
    let page = match changes {
        Some(changes) => {
            let assignments = load_assignments(&state, host_id, Some(&changes)).await?;
            let removed = removed_instances(&state, host_id, &changes, &assignments).await?;
            HostAssignments {
                host_id,
                cursor,
                complete: false,
                assignments,
                removed,
            }
        }
        None => HostAssignments {
            host_id,
            cursor,
            complete: true,
            assignments: load_assignments(&state, host_id, None).await?,
            removed: Vec::new(),
        },
    };
    Ok(Json(page))
}

/// Returns the instances of `changes` that are no longer assigned: removed ones, and those
/// whose environment was deleted, which leave the set while their rows remain.
async fn removed_instances(
    state: &AppState,
    host_id: HostId,
    changes: &Changes,
    assignments: &[Assignment],
) -> Result<Vec<InstanceId>, ApiError> {
    // This read and the assignments' are separate snapshots. An instance placed in between
    // shows here as removed, which is harmless because the agent never had it. Its event
    // comes after the cursor, so the next call lists it. An instance removed in between is
    // listed as removed by the next call.
    let mut candidates = changes.instances.clone();
    if !changes.envs.is_empty() {
        let of_envs: Vec<uuid::Uuid> =
            sqlx::query_scalar("SELECT id FROM instances WHERE host_id = $1 AND env_id = ANY($2)")
                .bind(host_id.as_uuid())
                .bind(&changes.envs)
                .fetch_all(state.store.pool())
                .await
                .map_err(ApiError::database("read instances of changed envs"))?;
        candidates.extend(of_envs);
        candidates.sort_unstable();
        candidates.dedup();
    }

    let listed: HashSet<InstanceId> = assignments.iter().map(|a| a.instance_id).collect();
    Ok(candidates
        .into_iter()
        .map(InstanceId::from_uuid)
        .filter(|id| !listed.contains(id))
        .collect())
}

/// Waits until the host change feed counts an event after `after` that concerns `host`, and
/// returns the feed's head then, or `None` after `wait`.
async fn wait_for_change(
    index: &mut tokio::sync::watch::Receiver<std::sync::Arc<ChangeIndex>>,
    host: HostId,
    after: u64,
    wait: std::time::Duration,
) -> Option<u64> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        {
            let current = index.borrow_and_update();
            if current.changed_after(host, after) {
                return Some(current.head);
            }
        }
        tokio::select! {
            changed = index.changed() => {
                if changed.is_err() {
                    tokio::time::sleep_until(deadline).await;
                    return None;
                }
            }
            () = tokio::time::sleep_until(deadline) => return None,
        }
    }
}

/// Waits like [`wait_for_change`] for a cursor the feed does not cover (0, older than the
/// feed's start or newer than its last read), checking the log after every notification.
async fn wait_for_change_in_log(
    state: &AppState,
    host_id: HostId,
    after: u64,
    wait: std::time::Duration,
) -> Result<Option<u64>, ApiError> {
    let changed = state
        .notifier
        .wait_for(wait, || {
            let pool = state.store.pool().clone();
            let store = state.store.clone();
            async move {
                let head = store.head().await?;
                if after == 0 || head < after {
                    return Ok(Some(head));
                }
                // An event that names another host (its instances' placements and reports)
                // never changes this host's assignments, so it does not end the long poll.
                let relevant: bool = sqlx::query_scalar(concat!(
                    "SELECT EXISTS (
                         SELECT 1 FROM events e
                         WHERE e.seq > $1 AND e.seq <= $2
                           AND (e.host_id = $3
                                OR (e.host_id IS NULL
                                    AND e.env_id IN (SELECT env_id FROM instances
                                                     WHERE host_id = $3)))
                           AND NOT ",
                    skips_assignments!(),
                    ")"
                ))
                .bind(after as i64)
                .bind(head as i64)
                .bind(host_id.as_uuid())
                .fetch_one(&pool)
                .await
                .map_err(StoreError::database("check host changes"))?;
                Ok(relevant.then_some(head))
            }
        })
        .await?;
    Ok(changed)
}

/// `POST /v1/host/instances/{instance}/state`.
pub async fn report_state(
    State(state): State<AppState>,
    caller: Caller,
    Path(instance): Path<String>,
    JsonBody(request): JsonBody<ReportInstanceState>,
) -> Result<Json<Instance>, ApiError> {
    let host_id = scope::host(&caller)?;
    let instance_id = parse_instance(&instance)?;
    check_report("", request.detail.as_deref(), &request.output)?;
    let placed = instance_on_host(&state, host_id, instance_id).await?;

    if placed.accepts(request.state) {
        let event = Event::InstanceStateChanged {
            instance_id,
            env_id: placed.env_id,
            host_id,
            state: request.state,
            detail: request.detail,
            exit_code: request.exit_code,
            output: request.output,
        };
        state
            .store
            .append(
                &streams::instance(instance_id),
                ExpectedVersion::Any,
                vec![NewEvent {
                    org_id: placed.org_id,
                    event,
                }],
                &caller.actor(),
            )
            .await?;
    } else {
        tracing::info!(instance = %instance_id, state = ?request.state, "ignored a live state of a finished release command");
    }

    let row = sqlx::query(
        "SELECT id, env_id, release_id, process, host_id, ipv6, ipv4, desired, state, detail, created_at, updated_at
         FROM instances WHERE id = $1",
    )
    .bind(instance_id.as_uuid())
    .fetch_one(state.store.pool())
    .await
    .map_err(ApiError::database("load instance"))?;
    Ok(Json(super::read::instance_from_row(&row)?))
}

/// `POST /v1/host/instances/states`: several reports in one append, in the order given.
///
/// A report on an instance that is not placed on the calling host is dropped, and its
/// instance is listed in `unknown` instead of failing the batch. An agent that reports the
/// exit of an instance the orchestrator has just removed must not retry its other reports
/// forever.
/// Another host's instance is indistinguishable from a removed one.
pub async fn report_states(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<ReportInstanceStates>,
) -> Result<Json<ReportedInstanceStates>, ApiError> {
    let host_id = scope::host(&caller)?;
    if request.reports.len() > MAX_STATE_REPORTS {
        return Err(ApiError::invalid(
            "reports",
            format!(
                "{} reports in one batch; send at most {MAX_STATE_REPORTS} per call",
                request.reports.len()
            ),
        ));
    }
    for (index, report) in request.reports.iter().enumerate() {
        let field = format!("reports[{index}].");
        check_report(&field, report.detail.as_deref(), &report.output)?;
    }

    let ids: Vec<uuid::Uuid> = request
        .reports
        .iter()
        .map(|report| report.instance_id.as_uuid())
        .collect();
    // An instance of a deleted environment still reports its stop, so its org comes from its
    // placement event when the env row is gone.
    let rows = sqlx::query(
        "SELECT i.id, i.env_id, i.process, i.state,
                COALESCE(e.org_id, kiln_instance_org_from_log(i.id)) AS org_id
         FROM instances i LEFT JOIN envs e ON e.id = i.env_id
         WHERE i.id = ANY($1) AND i.host_id = $2",
    )
    .bind(&ids)
    .bind(host_id.as_uuid())
    .fetch_all(state.store.pool())
    .await
    .map_err(ApiError::database("look up instances"))?;
    let mut placed: HashMap<InstanceId, PlacedInstance> = rows
        .iter()
        .map(|row| (InstanceId::from_uuid(row.get("id")), placed_instance(row)))
        .collect();

    let mut events = Vec::with_capacity(request.reports.len());
    let mut unknown = Vec::new();
    for report in request.reports {
        let Some(instance) = placed.get_mut(&report.instance_id) else {
            if !unknown.contains(&report.instance_id) {
                unknown.push(report.instance_id);
            }
            continue;
        };
        if !instance.accepts(report.state) {
            tracing::info!(instance = %report.instance_id, state = ?report.state, "ignored a live state of a finished release command");
            continue;
        }
        // An exit earlier in the batch finishes a release command for the reports after it.
        instance.finished |= instance.run_once && report.state.is_terminal();
        let event = Event::InstanceStateChanged {
            instance_id: report.instance_id,
            env_id: instance.env_id,
            host_id,
            state: report.state,
            detail: report.detail,
            exit_code: report.exit_code,
            output: report.output,
        };
        events.push(StreamEvent {
            stream: streams::instance(report.instance_id),
            expected: ExpectedVersion::Any,
            event: NewEvent {
                org_id: instance.org_id,
                event,
            },
        });
    }
    let recorded = u32::try_from(events.len()).unwrap_or(u32::MAX);
    state.store.append_each(events, &caller.actor()).await?;
    Ok(Json(ReportedInstanceStates { recorded, unknown }))
}

/// Checks the sizes of a state report's detail and output lines; `field` prefixes the names
/// of the fields in an error (`reports[2].` in a batch).
fn check_report(field: &str, detail: Option<&str>, output: &[String]) -> Result<(), ApiError> {
    if detail.is_some_and(|detail| detail.len() > MAX_DETAIL_LEN) {
        return Err(ApiError::invalid(
            &format!("{field}detail"),
            format!("detail is longer than {MAX_DETAIL_LEN} bytes"),
        ));
    }
    if output.len() > MAX_REPORTED_OUTPUT_LINES {
        return Err(ApiError::invalid(
            &format!("{field}output"),
            format!("output has more than {MAX_REPORTED_OUTPUT_LINES} lines; send the last ones"),
        ));
    }
    if output
        .iter()
        .any(|line| line.len() > MAX_REPORTED_OUTPUT_LINE_BYTES)
    {
        return Err(ApiError::invalid(
            &format!("{field}output"),
            format!("an output line is longer than {MAX_REPORTED_OUTPUT_LINE_BYTES} bytes; cut it"),
        ));
    }
    Ok(())
}

/// `GET /v1/host/instances/{instance}/secrets`: values only for a running instance placed
/// on the calling host.
///
/// An instance gets the secrets of its own release: the set as it was when the release was
/// created, or as a rollback restored it. A secret changed later reaches the next release,
/// not a restart or a scale-up of this one.
pub async fn secrets(
    State(state): State<AppState>,
    caller: Caller,
    Path(instance): Path<String>,
) -> Result<Json<InstanceSecrets>, ApiError> {
    let host_id = scope::host(&caller)?;
    let instance_id = parse_instance(&instance)?;
    let pool = state.store.pool();
    let row =
        sqlx::query("SELECT env_id, release_id FROM instances WHERE id = $1 AND host_id = $2")
            .bind(instance_id.as_uuid())
            .bind(host_id.as_uuid())
            .fetch_optional(pool)
            .await
            .map_err(ApiError::database("look up instance"))?
            .ok_or_else(|| ApiError::not_found("instance", instance_id))?;
    let env_id = EnvId::from_uuid(row.get("env_id"));
    let release_id = ReleaseId::from_uuid(row.get("release_id"));

    // Both are fixed once the release exists: the log is append-only and stored values are
    // never changed, only re-sealed by a key rotation.
    let secrets_version = super::targets::secrets_version_at(pool, env_id, release_id).await?;
    let pins = super::targets::secrets_at(pool, env_id, secrets_version).await?;
    let (names, versions): (Vec<String>, Vec<i64>) = pins
        .iter()
        .map(|(name, pin)| (name.clone(), pin.version as i64))
        .unzip();
    let rows = sqlx::query(
        "SELECT DISTINCT ON (v.name) v.name, v.version, v.key_id, v.nonce, v.ciphertext,
                v.version = p.version AS pinned
         FROM secret_values v
         JOIN unnest($2::text[], $3::bigint[]) AS p(name, version) ON p.name = v.name
         WHERE v.env_id = $1
         ORDER BY v.name, abs(v.version - p.version), v.version DESC",
    )
    .bind(env_id.as_uuid())
    .bind(&names)
    .bind(&versions)
    .fetch_all(pool)
    .await
    .map_err(ApiError::database("read secret values"))?;

    let mut values = BTreeMap::new();
    for row in &rows {
        let name: String = row.get("name");
        let version: i64 = row.get("version");
        if !row.get::<bool, _>("pinned") {
            // Stored before values were kept by version (migration `secret_versions`), when
            // a new value overwrote the old one: the closest version is all there is,
            // preferring the value that replaced the pinned one.
            tracing::warn!(%instance_id, secret = %name, version, "pinned secret version is gone; delivering the closest stored version");
        }
        let sealed = Sealed {
            key_id: row.get("key_id"),
            nonce: row.get("nonce"),
            ciphertext: row.get("ciphertext"),
        };
        let plain = state.keyring.open(env_id, &name, version as u64, &sealed)?;
        let value = String::from_utf8(plain)
            .map_err(|_| ApiError::internal("decrypted secret is not UTF-8"))?;
        values.insert(name, value);
    }
    if let Some(missing) = names.iter().find(|name| !values.contains_key(*name)) {
        return Err(ApiError::new(
            ErrorCode::FailedPrecondition,
            format!(
                "no stored value of secret {missing} for release {release_id}; set it again and deploy"
            ),
        ));
    }
    tracing::info!(%instance_id, %host_id, count = values.len(), "delivered secrets");
    Ok(Json(InstanceSecrets {
        instance_id,
        secrets_version,
        values,
    }))
}

/// `POST /v1/host/logs`.
pub async fn ship_logs(
    State(state): State<AppState>,
    caller: Caller,
    LossyJsonBody(batch): LossyJsonBody<LogBatch>,
) -> Result<StatusCode, ApiError> {
    let host_id = scope::host(&caller)?;
    if batch.lines.len() > MAX_LOG_LINES {
        return Err(ApiError::invalid(
            "lines",
            format!("a batch has at most {MAX_LOG_LINES} lines"),
        ));
    }
    if let Some(line) = batch
        .lines
        .iter()
        .find(|line| line.line.len() > MAX_LOG_LINE_LEN)
    {
        return Err(ApiError::invalid(
            "lines",
            format!(
                "a line of instance {} is longer than {MAX_LOG_LINE_LEN} bytes; split it",
                line.instance_id
            ),
        ));
    }

    let mut placement: HashMap<InstanceId, (EnvId, String)> = HashMap::new();
    for line in &batch.lines {
        if placement.contains_key(&line.instance_id) {
            continue;
        }
        let row =
            sqlx::query("SELECT env_id, process FROM instances WHERE id = $1 AND host_id = $2")
                .bind(line.instance_id.as_uuid())
                .bind(host_id.as_uuid())
                .fetch_optional(state.store.pool())
                .await
                .map_err(ApiError::database("look up instance"))?;
        let Some(row) = row else {
            return Err(ApiError::not_found("instance", line.instance_id));
        };
        placement.insert(
            line.instance_id,
            (EnvId::from_uuid(row.get("env_id")), row.get("process")),
        );
    }

    let mut tx = state.store.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOG_LOCK_KEY)
        .execute(&mut *tx)
        .await
        .map_err(ApiError::database("take log lock"))?;
    for line in &batch.lines {
        let (env_id, process) = &placement[&line.instance_id];
        let stream = crate::store::projections::enum_text(&line.stream, 0)?;
        sqlx::query(
            "INSERT INTO log_lines (env_id, instance_id, process, stream, time, line) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(env_id.as_uuid())
        .bind(line.instance_id.as_uuid())
        .bind(process)
        .bind(stream)
        .bind(line.time)
        .bind(&line.line)
        .execute(&mut *tx)
        .await
        .map_err(ApiError::database("insert log line"))?;
    }
    let envs: std::collections::HashSet<EnvId> =
        placement.values().map(|(env_id, _)| *env_id).collect();
    for env_id in envs {
        sqlx::query(
            "DELETE FROM log_lines WHERE env_id = $1 AND id <= (
                 SELECT id FROM log_lines WHERE env_id = $1 ORDER BY id DESC OFFSET $2 LIMIT 1)",
        )
        .bind(env_id.as_uuid())
        .bind(i64::from(state.limits.log_window_lines))
        .execute(&mut *tx)
        .await
        .map_err(ApiError::database("trim log window"))?;
    }
    tx.commit()
        .await
        .map_err(ApiError::database("commit log batch"))?;
    Ok(StatusCode::NO_CONTENT)
}

fn parse_instance(text: &str) -> Result<InstanceId, ApiError> {
    text.parse()
        .map_err(|error: kiln_core::ids::IdError| ApiError::invalid("instance", error.to_string()))
}

/// An instance placed on the calling host, as the report endpoints see it.
#[derive(Debug)]
struct PlacedInstance {
    env_id: EnvId,
    org_id: Option<OrgId>,
    /// True for a release command, which runs once.
    run_once: bool,
    /// True for a release command that has exited or failed.
    finished: bool,
}

impl PlacedInstance {
    /// Returns whether a report of `reported` is recorded. A release command never runs
    /// again after it exited or failed, so a live state reported after that is stale (a
    /// delayed or replayed report) and is dropped. Recording it would set the command's
    /// desired state back to running.
    fn accepts(&self, reported: kiln_api::InstanceState) -> bool {
        !self.finished || reported.is_terminal()
    }
}

fn placed_instance(row: &sqlx::postgres::PgRow) -> PlacedInstance {
    let org: Option<uuid::Uuid> = row.get("org_id");
    let run_once = row.get::<String, _>("process") == RELEASE_COMMAND_PROCESS;
    let state = serde_json::Value::String(row.get("state"));
    let terminal = serde_json::from_value::<kiln_api::InstanceState>(state)
        .is_ok_and(kiln_api::InstanceState::is_terminal);
    PlacedInstance {
        env_id: EnvId::from_uuid(row.get("env_id")),
        org_id: org.map(OrgId::from_uuid),
        run_once,
        finished: run_once && terminal,
    }
}

async fn instance_on_host(
    state: &AppState,
    host_id: HostId,
    instance_id: InstanceId,
) -> Result<PlacedInstance, ApiError> {
    // As in `report_states`, an instance of a deleted environment still reports its stop.
    let row = sqlx::query(
        "SELECT i.env_id, i.process, i.state,
                COALESCE(e.org_id, kiln_instance_org_from_log(i.id)) AS org_id
         FROM instances i LEFT JOIN envs e ON e.id = i.env_id
         WHERE i.id = $1 AND i.host_id = $2",
    )
    .bind(instance_id.as_uuid())
    .bind(host_id.as_uuid())
    .fetch_optional(state.store.pool())
    .await
    .map_err(ApiError::database("look up instance"))?;
    let row = row.ok_or_else(|| ApiError::not_found("instance", instance_id))?;
    Ok(placed_instance(&row))
}

async fn renew_lease(state: &AppState, host_id: HostId, running: u32) -> Result<(), ApiError> {
    let expires = crate::store::now() + state.limits.host_lease;
    sqlx::query(
        "INSERT INTO host_leases (host_id, expires_at, running) VALUES ($1, $2, $3)
         ON CONFLICT (host_id) DO UPDATE SET expires_at = EXCLUDED.expires_at, running = EXCLUDED.running",
    )
    .bind(host_id.as_uuid())
    .bind(expires)
    .bind(running as i32)
    .execute(state.store.pool())
    .await
    .map_err(ApiError::database("renew lease"))?;
    Ok(())
}

async fn lease(state: &AppState, host_id: HostId) -> Result<HostLease, ApiError> {
    let host = super::hosts::load(state.store.pool(), host_id).await?;
    let rows = sqlx::query(
        "SELECT id, overlay_public_key, overlay_endpoint, ipv6_prefix FROM hosts
         WHERE id <> $1 AND ipv6_prefix IS NOT NULL AND overlay_public_key IS NOT NULL ORDER BY name",
    )
    .bind(host_id.as_uuid())
    .fetch_all(state.store.pool())
    .await
    .map_err(ApiError::database("list peers"))?;
    let mut peers = Vec::with_capacity(rows.len());
    for row in &rows {
        let endpoint: String = row.get("overlay_endpoint");
        peers.push(OverlayPeer {
            host_id: HostId::from_uuid(row.get("id")),
            public_key: row.get("overlay_public_key"),
            endpoint: endpoint
                .parse()
                .map_err(|_| ApiError::internal("stored endpoint is invalid"))?,
            allowed_ips: vec![row.get("ipv6_prefix")],
        });
    }
    Ok(HostLease {
        host,
        lease_secs: state.limits.host_lease.as_secs(),
        cluster_prefix: format!("{}/48", state.settings.ula_prefix),
        peers,
    })
}

/// Picks the lowest free /64 of the cluster /48 for a host, from subnet 1 (subnet 0 holds
/// the environments' dedicated addresses).
async fn free_prefix(pool: &sqlx::PgPool, ula_prefix: Ipv6Addr) -> Result<String, ApiError> {
    let taken: Vec<String> =
        sqlx::query_scalar("SELECT ipv6_prefix FROM hosts WHERE ipv6_prefix IS NOT NULL")
            .fetch_all(pool)
            .await
            .map_err(ApiError::database("list host prefixes"))?;
    let base = u128::from(ula_prefix) & !((1u128 << 80) - 1);
    for subnet in 1u128..=0xffff {
        let prefix = format!("{}/64", Ipv6Addr::from(base | (subnet << 64)));
        if !taken.contains(&prefix) {
            return Ok(prefix);
        }
    }
    Err(ApiError::new(
        ErrorCode::FailedPrecondition,
        "every /64 of the cluster prefix is assigned; remove unused hosts",
    ))
}

/// Release specs by release, parsed once: many instances on a host share a release, and a
/// release never changes after it is created.
#[derive(Debug, Default)]
pub struct ReleaseSpecs {
    specs: std::sync::Mutex<HashMap<ReleaseId, Arc<ReleaseSpec>>>,
}

/// Specs kept at most; the cache starts over when it is full.
const RELEASE_SPECS_KEPT: usize = 4096;

impl ReleaseSpecs {
    /// Returns the spec of each release in `releases`, reading those not kept yet in one
    /// query.
    async fn get_all(
        &self,
        pool: &sqlx::PgPool,
        releases: &[ReleaseId],
    ) -> Result<HashMap<ReleaseId, Arc<ReleaseSpec>>, ApiError> {
        let mut found = HashMap::new();
        let mut missing = Vec::new();
        {
            let specs = self.specs.lock().unwrap_or_else(PoisonError::into_inner);
            for release in releases {
                match specs.get(release) {
                    Some(spec) => {
                        found.insert(*release, Arc::clone(spec));
                    }
                    None if !missing.contains(&release.as_uuid()) => {
                        missing.push(release.as_uuid());
                    }
                    None => {}
                }
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }

        let rows: Vec<(uuid::Uuid, serde_json::Value)> =
            sqlx::query_as("SELECT id, spec FROM releases WHERE id = ANY($1)")
                .bind(&missing)
                .fetch_all(pool)
                .await
                .map_err(ApiError::database("read release specs"))?;
        let mut specs = self.specs.lock().unwrap_or_else(PoisonError::into_inner);
        if specs.len() + rows.len() > RELEASE_SPECS_KEPT {
            specs.clear();
        }
        for (id, value) in rows {
            let spec: ReleaseSpec = serde_json::from_value(value)
                .map_err(|_| ApiError::internal("stored release spec is invalid"))?;
            let spec = Arc::new(spec);
            let release = ReleaseId::from_uuid(id);
            specs.insert(release, Arc::clone(&spec));
            found.insert(release, spec);
        }
        Ok(found)
    }
}

/// Builds the host's assignments: all of them, or those of `changes` (its instances and every
/// instance of its environments on the host).
async fn load_assignments(
    state: &AppState,
    host_id: HostId,
    changes: Option<&Changes>,
) -> Result<Vec<Assignment>, ApiError> {
    let pool = state.store.pool();
    let empty = Vec::new();
    let (filter, instances, envs) = match changes {
        Some(changes) if changes.instances.is_empty() && changes.envs.is_empty() => {
            return Ok(Vec::new());
        }
        Some(changes) => (
            "AND (i.id = ANY($2) OR i.env_id = ANY($3))",
            &changes.instances,
            &changes.envs,
        ),
        None => ("", &empty, &empty),
    };
    // Two fixed texts, so each keeps its own cached plan.
    let sql = format!(
        "SELECT i.id, i.process, i.ipv6, i.ipv4, i.desired, i.state, i.env_id, e.name AS env_name,
                e.hostname AS env_hostname, r.secrets_version,
                e.app_id, a.name AS app_name, e.org_id, o.name AS org_name,
                r.id AS release_id, r.version, r.image_ref, r.image_digest, h.ipv6_prefix
         FROM instances i
         JOIN envs e ON e.id = i.env_id
         JOIN apps a ON a.id = e.app_id
         JOIN orgs o ON o.id = e.org_id
         JOIN releases r ON r.id = i.release_id
         JOIN hosts h ON h.id = i.host_id
         WHERE i.host_id = $1 {filter}
         ORDER BY i.created_at, i.id"
    );
    let query = sqlx::query(&sql).bind(host_id.as_uuid());
    let query = if changes.is_some() {
        query.bind(instances).bind(envs)
    } else {
        query
    };
    let rows = query
        .fetch_all(pool)
        .await
        .map_err(ApiError::database("load assignments"))?;

    let corrupt = |what: &str| ApiError::internal(what);
    let mut env_ids: Vec<uuid::Uuid> = rows.iter().map(|row| row.get("env_id")).collect();
    env_ids.sort_unstable();
    env_ids.dedup();
    let config_rows =
        sqlx::query("SELECT env_id, name, value FROM config_vars WHERE env_id = ANY($1)")
            .bind(&env_ids)
            .fetch_all(pool)
            .await
            .map_err(ApiError::database("read config vars"))?;
    let mut config: HashMap<EnvId, BTreeMap<String, String>> = HashMap::new();
    for row in &config_rows {
        config
            .entry(EnvId::from_uuid(row.get("env_id")))
            .or_default()
            .insert(row.get("name"), row.get("value"));
    }

    let releases: Vec<ReleaseId> = rows
        .iter()
        .map(|row| ReleaseId::from_uuid(row.get("release_id")))
        .collect();
    let specs = state.release_specs.get_all(pool, &releases).await?;
    let mut assignments = Vec::with_capacity(rows.len());
    for row in &rows {
        let env_id = EnvId::from_uuid(row.get("env_id"));
        let release_id = ReleaseId::from_uuid(row.get("release_id"));
        let spec = specs
            .get(&release_id)
            .ok_or_else(|| corrupt("an instance's release has no spec"))?;
        let process = ProcessName::new(row.get::<String, _>("process"))
            .map_err(|_| corrupt("stored process name is invalid"))?;
        let mut kill_signal = spec.kill_signal.clone();
        let mut kill_timeout_secs = spec.kill_timeout_secs;
        let (command, vcpus, memory_mib, run_once) = match spec.processes.get(&process) {
            Some(process) => {
                kill_signal = process.kill_signal.clone().unwrap_or(kill_signal);
                kill_timeout_secs = process.kill_timeout_secs.unwrap_or(kill_timeout_secs);
                (
                    process.command.clone(),
                    process.vcpus,
                    process.memory_mib,
                    false,
                )
            }
            None if process.as_str() == RELEASE_COMMAND_PROCESS => {
                let Some(command) = &spec.release_command else {
                    return Err(corrupt("release command instance of a release without one"));
                };
                let limits = spec.release_command_limits.unwrap_or_default();
                (command.clone(), limits.vcpus, limits.memory_mib, true)
            }
            None => return Err(corrupt("instance names a process its release lacks")),
        };

        let mut env_vars = spec.env.clone();
        if let Some(vars) = config.get(&env_id) {
            env_vars.extend(
                vars.iter()
                    .map(|(name, value)| (name.clone(), value.clone())),
            );
        }

        let ports = spec
            .services
            .iter()
            .filter(|service| service.process == process)
            .map(|service| ServicePort {
                service: service.name.clone(),
                port: service.internal_port,
                protocol: service.protocol,
                health_check: service.health_check.clone(),
            })
            .collect();
        let mut desired: DesiredState =
            serde_json::from_value(serde_json::Value::String(row.get("desired")))
                .map_err(|_| corrupt("stored desired state is invalid"))?;
        let reported: kiln_api::InstanceState =
            serde_json::from_value(serde_json::Value::String(row.get("state")))
                .map_err(|_| corrupt("stored instance state is invalid"))?;
        if run_once && reported.is_terminal() {
            // A release command that has exited is done: an agent that restarts before the
            // orchestrator stops it must not run it again.
            desired = DesiredState::Stopped;
        }
        let version: i64 = row.get("version");
        let secrets_version: i64 = row.get("secrets_version");

        let startup_scripts = spec
            .startup_scripts
            .iter()
            .filter(|script| script.applies_to(&process))
            .cloned()
            .collect();
        assignments.push(Assignment {
            instance_id: InstanceId::from_uuid(row.get("id")),
            org_id: OrgId::from_uuid(row.get("org_id")),
            org: OrgName::new(row.get::<String, _>("org_name"))
                .map_err(|_| corrupt("stored org name is invalid"))?,
            app_id: AppId::from_uuid(row.get("app_id")),
            app: AppName::new(row.get::<String, _>("app_name"))
                .map_err(|_| corrupt("stored app name is invalid"))?,
            env_id,
            env: EnvName::new(row.get::<String, _>("env_name"))
                .map_err(|_| corrupt("stored environment name is invalid"))?,
            release_id,
            release_version: version as u64,
            process,
            image: kiln_api::types::ImageRef {
                reference: row.get("image_ref"),
                digest: row.get("image_digest"),
            },
            command,
            env_vars,
            secrets_version: secrets_version as u64,
            vcpus,
            memory_mib,
            network: InstanceNetwork {
                ipv6: row
                    .get::<String, _>("ipv6")
                    .parse()
                    .map_err(|_| corrupt("stored address is invalid"))?,
                ipv6_prefix: row
                    .get::<Option<String>, _>("ipv6_prefix")
                    .unwrap_or_default(),
                ipv4: row
                    .get::<String, _>("ipv4")
                    .parse()
                    .map_err(|_| corrupt("stored address is invalid"))?,
            },
            ports,
            volumes: spec.volumes.clone(),
            kill_signal,
            kill_timeout_secs,
            hostname: row.get("env_hostname"),
            startup_scripts,
            desired,
            run_once,
        });
    }
    Ok(assignments)
}
