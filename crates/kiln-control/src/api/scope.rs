//! Authorization scopes: resolving path names to resources the caller may reach.
//!
//! Every org-scoped lookup first checks the caller's token. A token that is not an org token
//! (operator, host, ingress) gets `forbidden` for every org path, whether or not the org exists.
//! An org token of another org gets `not_found`, with the same message whether or not the org
//! exists, so it learns nothing about other orgs.

use kiln_api::ErrorCode;
use kiln_api::types::TokenKind;
use kiln_core::{AppId, AppName, EnvId, EnvName, OrgId, OrgName};
use sqlx::{PgPool, Row};

use super::error::ApiError;
use super::extract::name;
use crate::auth::Caller;

/// The org of an org-scoped path, after authorization.
#[derive(Debug, Clone)]
pub struct OrgScope {
    /// Org id.
    pub id: OrgId,
    /// Org name.
    pub name: OrgName,
}

/// An app of an org-scoped path.
#[derive(Debug, Clone)]
pub struct AppScope {
    /// The org.
    pub org: OrgScope,
    /// App id.
    pub id: AppId,
    /// App name.
    pub name: AppName,
}

/// An environment of an org-scoped path.
#[derive(Debug, Clone)]
pub struct EnvScope {
    /// The app.
    pub app: AppScope,
    /// Environment id.
    pub id: EnvId,
    /// Environment name.
    pub name: EnvName,
}

impl EnvScope {
    /// Returns the org id.
    pub fn org_id(&self) -> OrgId {
        self.app.org.id
    }
}

/// Requires an org token of the org named `org`.
pub fn org(caller: &Caller, org: &str) -> Result<OrgScope, ApiError> {
    let org_name = name("org", org, OrgName::new)?;
    if caller.token.kind != TokenKind::Org {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "this endpoint needs an org token of org {org_name}, not a {} token",
                token_kind_name(caller.token.kind)
            ),
        ));
    }
    match &caller.org {
        Some((id, caller_org))
            if caller.token.kind == TokenKind::Org && *caller_org == org_name =>
        {
            Ok(OrgScope {
                id: *id,
                name: org_name,
            })
        }
        _ => Err(ApiError::not_found("org", &org_name)),
    }
}

/// Resolves any org by name for an operator token. The operator may see every org, so a
/// missing org is reported as such.
pub async fn any_org(pool: &PgPool, caller: &Caller, org: &str) -> Result<OrgScope, ApiError> {
    operator(caller)?;
    let org_name = name("org", org, OrgName::new)?;
    let id: Option<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM orgs WHERE name = $1")
        .bind(org_name.as_str())
        .fetch_optional(pool)
        .await
        .map_err(ApiError::database("look up org"))?;
    match id {
        Some(id) => Ok(OrgScope {
            id: OrgId::from_uuid(id),
            name: org_name,
        }),
        None => Err(ApiError::not_found("org", &org_name)),
    }
}

fn token_kind_name(kind: TokenKind) -> &'static str {
    match kind {
        TokenKind::Operator => "operator",
        TokenKind::Org => "org",
        TokenKind::Host => "host",
        TokenKind::Ingress => "ingress",
    }
}

/// Requires an operator token.
pub fn operator(caller: &Caller) -> Result<(), ApiError> {
    if caller.token.kind == TokenKind::Operator {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::Forbidden,
        "this endpoint needs an operator token",
    ))
}

/// Requires a host token and returns its host.
pub fn host(caller: &Caller) -> Result<kiln_core::HostId, ApiError> {
    caller
        .host_id()
        .ok_or_else(|| ApiError::new(ErrorCode::Forbidden, "this endpoint needs a host token"))
}

/// Requires an ingress token.
pub fn ingress(caller: &Caller) -> Result<(), ApiError> {
    if caller.token.kind == TokenKind::Ingress {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::Forbidden,
        "this endpoint needs an ingress token",
    ))
}

/// Resolves an app of the caller's org.
pub async fn app(
    pool: &PgPool,
    caller: &Caller,
    org_name: &str,
    app: &str,
) -> Result<AppScope, ApiError> {
    let org = org(caller, org_name)?;
    let app_name = name("app", app, AppName::new)?;
    let id: Option<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM apps WHERE org_id = $1 AND name = $2")
            .bind(org.id.as_uuid())
            .bind(app_name.as_str())
            .fetch_optional(pool)
            .await
            .map_err(ApiError::database("look up app"))?;
    let Some(id) = id else {
        return Err(ApiError::not_found("app", &app_name));
    };
    Ok(AppScope {
        org,
        id: AppId::from_uuid(id),
        name: app_name,
    })
}

/// Resolves an environment of the caller's org, with its app, in one query.
pub async fn env(
    pool: &PgPool,
    caller: &Caller,
    org_name: &str,
    app_name: &str,
    env: &str,
) -> Result<EnvScope, ApiError> {
    let org = org(caller, org_name)?;
    let app_name = name("app", app_name, AppName::new)?;
    let env_name = name("env", env, EnvName::new)?;
    let row = sqlx::query(
        "SELECT a.id AS app_id, e.id AS env_id
         FROM apps a LEFT JOIN envs e ON e.app_id = a.id AND e.name = $3
         WHERE a.org_id = $1 AND a.name = $2",
    )
    .bind(org.id.as_uuid())
    .bind(app_name.as_str())
    .bind(env_name.as_str())
    .fetch_optional(pool)
    .await
    .map_err(ApiError::database("look up environment"))?;
    env_scope(org, app_name, env_name, row.as_ref())
}

/// Builds an [`EnvScope`] from a row with the columns `app_id` and `env_id` (NULL when the
/// environment does not exist), or `None` when the app does not exist.
pub fn env_scope(
    org: OrgScope,
    app_name: AppName,
    env_name: EnvName,
    row: Option<&sqlx::postgres::PgRow>,
) -> Result<EnvScope, ApiError> {
    let Some(row) = row else {
        return Err(ApiError::not_found("app", &app_name));
    };
    let Some(env_id) = row.get::<Option<uuid::Uuid>, _>("env_id") else {
        return Err(ApiError::not_found("environment", &env_name));
    };
    Ok(EnvScope {
        app: AppScope {
            org,
            id: AppId::from_uuid(row.get("app_id")),
            name: app_name,
        },
        id: EnvId::from_uuid(env_id),
        name: env_name,
    })
}
