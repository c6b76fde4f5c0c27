//! API tokens: create (the secret is returned once), list, revoke; ingress tokens; whoami.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kiln_api::Event;
use kiln_api::types::{
    CreateIngressToken, CreateToken, CreatedToken, List, Token, TokenKind, WhoAmI,
};
use kiln_core::{HostId, OrgId, TokenId};
use sqlx::{Postgres, Row, Transaction};
use time::OffsetDateTime;

use super::AppState;
use super::error::ApiError;
use super::extract::JsonBody;
use super::scope;
use crate::auth::{self, Caller};
use crate::store::{ExpectedVersion, NewEvent, Store, streams};

/// Longest token lifetime accepted, in seconds (ten years).
const MAX_TOKEN_LIFETIME_SECS: u64 = 10 * 365 * 24 * 3600;

/// Longest token label, in characters.
const MAX_TOKEN_NAME_LEN: usize = 100;

/// `GET /v1/whoami`.
pub async fn whoami(caller: Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        org_name: caller.org.as_ref().map(|(_, name)| name.to_string()),
        token: caller.token,
    })
}

/// `GET /v1/orgs/{org}/tokens`.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
) -> Result<Json<List<Token>>, ApiError> {
    let org = scope::org(&caller, &org)?;
    let rows = sqlx::query(
        "SELECT id, kind, org_id, host_id, name, created_at, expires_at, revoked_at
         FROM tokens WHERE org_id = $1 ORDER BY created_at",
    )
    .bind(org.id.as_uuid())
    .fetch_all(state.store.pool())
    .await
    .map_err(ApiError::database("list tokens"))?;
    let items = rows.iter().map(token_from_row).collect::<Result<_, _>>()?;
    Ok(Json(List { items }))
}

/// `POST /v1/orgs/{org}/tokens`. An org token creates tokens of its own org. The operator
/// token creates tokens of any org, which is how an org created with `POST /v1/orgs` gets
/// its first admin token.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    JsonBody(request): JsonBody<CreateToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let org = if caller.token.kind == TokenKind::Operator {
        scope::any_org(state.store.pool(), &caller, &org).await?
    } else {
        scope::org(&caller, &org)?
    };
    validate_token_name(&request.name)?;
    let expires_at = match request.expires_in_secs {
        None => None,
        Some(0) => {
            return Err(ApiError::invalid(
                "expires_in_secs",
                "expires_in_secs must be at least 1",
            ));
        }
        Some(secs) if secs > MAX_TOKEN_LIFETIME_SECS => {
            return Err(ApiError::invalid(
                "expires_in_secs",
                format!(
                    "expires_in_secs {secs} is above the maximum of {MAX_TOKEN_LIFETIME_SECS} (ten years)"
                ),
            ));
        }
        Some(secs) => Some(crate::store::now() + time::Duration::seconds(secs as i64)),
    };

    let mut tx = state.store.begin().await?;
    let created = issue(
        &mut tx,
        &streams::org(org.id),
        TokenKind::Org,
        Some(org.id),
        None,
        &request.name,
        expires_at,
        &caller.actor(),
    )
    .await?;
    tx.commit()
        .await
        .map_err(ApiError::database("commit token"))?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// `POST /v1/ingress-tokens`.
pub async fn create_ingress(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<CreateIngressToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    scope::operator(&caller)?;
    validate_token_name(&request.name)?;
    let mut tx = state.store.begin().await?;
    let created = issue(
        &mut tx,
        streams::CLUSTER,
        TokenKind::Ingress,
        None,
        None,
        &request.name,
        None,
        &caller.actor(),
    )
    .await?;
    tx.commit()
        .await
        .map_err(ApiError::database("commit token"))?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// `DELETE /v1/orgs/{org}/tokens/{token}`.
pub async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, token)): Path<(String, String)>,
) -> Result<Json<Token>, ApiError> {
    let org = scope::org(&caller, &org)?;
    let token_id: TokenId = token
        .parse()
        .map_err(|error: kiln_core::ids::IdError| ApiError::invalid("token", error.to_string()))?;
    let found = load(state.store.pool(), token_id).await?;
    let Some(found) = found.filter(|found| found.org_id == Some(org.id)) else {
        return Err(ApiError::not_found("token", token_id));
    };
    if found.revoked_at.is_none() {
        state
            .store
            .append(
                &streams::org(org.id),
                ExpectedVersion::Any,
                vec![NewEvent::org(org.id, Event::TokenRevoked { token_id })],
                &caller.actor(),
            )
            .await?;
    }
    let revoked = load(state.store.pool(), token_id)
        .await?
        .ok_or_else(|| ApiError::not_found("token", token_id))?;
    Ok(Json(revoked))
}

/// Creates a token of `kind` inside `tx`: appends `TokenCreated` to `stream` and stores the
/// hash of its secret.
#[allow(clippy::too_many_arguments)] // Each argument is one field of the token.
pub async fn issue(
    tx: &mut Transaction<'static, Postgres>,
    stream: &str,
    kind: TokenKind,
    org_id: Option<OrgId>,
    host_id: Option<HostId>,
    name: &str,
    expires_at: Option<OffsetDateTime>,
    actor: &str,
) -> Result<CreatedToken, ApiError> {
    let id = TokenId::new();
    let generated = auth::generate(id);
    let event = Event::TokenCreated {
        token_id: id,
        kind,
        org_id,
        host_id,
        name: name.to_owned(),
        expires_at,
    };
    let new = NewEvent { org_id, event };
    let envelopes = Store::append_in(tx, stream, ExpectedVersion::Any, vec![new], actor).await?;
    sqlx::query("INSERT INTO token_hashes (token_id, hash) VALUES ($1, $2)")
        .bind(id.as_uuid())
        .bind(generated.hash.as_slice())
        .execute(&mut **tx)
        .await
        .map_err(ApiError::database("store token hash"))?;

    let created_at = envelopes
        .first()
        .map(|e| e.time)
        .unwrap_or_else(crate::store::now);
    Ok(CreatedToken {
        token: Token {
            id,
            kind,
            org_id,
            host_id,
            name: name.to_owned(),
            created_at,
            expires_at,
            revoked_at: None,
        },
        secret: generated.text,
    })
}

fn validate_token_name(name: &str) -> Result<(), ApiError> {
    let length = name.chars().count();
    if length == 0 || length > MAX_TOKEN_NAME_LEN || name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "name",
            format!(
                "invalid token name {name:?}: use 1 to {MAX_TOKEN_NAME_LEN} printable characters"
            ),
        ));
    }
    Ok(())
}

async fn load(pool: &sqlx::PgPool, id: TokenId) -> Result<Option<Token>, ApiError> {
    let row = sqlx::query(
        "SELECT id, kind, org_id, host_id, name, created_at, expires_at, revoked_at FROM tokens WHERE id = $1",
    )
    .bind(id.as_uuid())
    .fetch_optional(pool)
    .await
    .map_err(ApiError::database("load token"))?;
    row.as_ref().map(token_from_row).transpose()
}

/// Decodes a row of `tokens`.
pub fn token_from_row(row: &sqlx::postgres::PgRow) -> Result<Token, ApiError> {
    let kind: String = row.get("kind");
    let kind: TokenKind = serde_json::from_value(serde_json::Value::String(kind))
        .map_err(|_| ApiError::internal("token row has an unknown kind"))?;
    Ok(Token {
        id: TokenId::from_uuid(row.get("id")),
        kind,
        org_id: row
            .get::<Option<uuid::Uuid>, _>("org_id")
            .map(OrgId::from_uuid),
        host_id: row
            .get::<Option<uuid::Uuid>, _>("host_id")
            .map(HostId::from_uuid),
        name: row.get("name"),
        created_at: row.get("created_at"),
        expires_at: row.get("expires_at"),
        revoked_at: row.get("revoked_at"),
    })
}
