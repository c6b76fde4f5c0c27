//! Projections: plain tables derived from the event log, updated in the append's transaction.
//!
//! The projections are defined once, as the server function `kiln_project` (migration
//! `append_function`). Live appends run it inside `kiln_append`, and [`apply`] runs it for
//! one event, which is how a rebuild replays the log (see [`super::rebuild`]). Every write to
//! a projection table happens there, so the replay rebuilds them exactly.
//!
//! Table names inside `kiln_project` are unqualified on purpose: a rebuild points
//! `search_path` at a scratch schema holding empty copies of these tables and replays into it.

use kiln_api::EventEnvelope;
use sqlx::{Postgres, Transaction};

use super::StoreError;

/// The projection tables, in the order a rebuild compares them.
pub const TABLES: &[&str] = &[
    "orgs",
    "tokens",
    "apps",
    "envs",
    "config_vars",
    "secrets",
    "releases",
    "deploys",
    "deploy_steps",
    "hosts",
    "instances",
    "routes",
    "addresses",
];

/// Applies one event to the projections by calling `kiln_project`. The function is called
/// schema-qualified, so it is found while `search_path` points at a rebuild's scratch schema.
pub async fn apply(
    tx: &mut Transaction<'static, Postgres>,
    envelope: &EventEnvelope,
) -> Result<(), StoreError> {
    let payload = serde_json::to_value(&envelope.event).map_err(|source| StoreError::Codec {
        seq: envelope.seq,
        source,
    })?;
    sqlx::query("SELECT public.kiln_project($1, $2)")
        .bind(payload)
        .bind(envelope.time)
        .execute(&mut **tx)
        .await
        .map_err(StoreError::database("project event"))?;
    Ok(())
}

/// Returns the serde name of a unit enum variant, such as `"rolling"`.
pub fn enum_text<T: serde::Serialize>(value: &T, seq: u64) -> Result<String, StoreError> {
    match serde_json::to_value(value).map_err(|source| StoreError::Codec { seq, source })? {
        serde_json::Value::String(text) => Ok(text),
        other => Ok(other.to_string()),
    }
}
