//! The `/v1` HTTP API (axum). Routes come from [`kiln_api::routes`], one handler module per
//! resource. A middleware authenticates every call except the OpenAPI document, enforces the
//! body size limit, and implements idempotency keys for mutating calls.

pub mod apps;
pub mod config;
pub mod deploys;
pub mod envs;
pub mod error;
pub mod events;
pub mod extract;
pub mod host_agent;
pub mod host_changes;
pub mod hosts;
pub mod idempotency;
pub mod ingress;
pub mod ips;
pub mod logs;
pub mod openapi;
pub mod orgs;
pub mod plans;
pub mod read;
pub mod releases;
pub mod scope;
pub mod secrets;
pub mod targets;
pub mod tokens;

use std::net::Ipv6Addr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use kiln_api::{ErrorCode, routes as r};

use self::error::ApiError;
use crate::secrets::Keyring;
use crate::store::Store;
use crate::store::watch::Notifier;

/// Cluster-wide settings chosen at bootstrap.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// The cluster's ULA /48, as its first address.
    pub ula_prefix: Ipv6Addr,
    /// Domain under which every environment gets its platform hostname.
    pub apps_domain: String,
}

/// Limits and timings of the API.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Seconds a host lease lasts without a heartbeat.
    pub host_lease: Duration,
    /// Log lines kept per environment.
    pub log_window_lines: u32,
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The event store.
    pub store: Store,
    /// Master keys of the secrets.
    pub keyring: Arc<Keyring>,
    /// Wakes long-polls on appends.
    pub notifier: Notifier,
    /// Cluster settings.
    pub settings: Arc<ClusterSettings>,
    /// Limits.
    pub limits: Arc<ApiLimits>,
    /// Specs of releases read for assignments, kept because a release never changes.
    pub release_specs: Arc<host_agent::ReleaseSpecs>,
}

/// Builds the router with every route of [`kiln_api::routes::ROUTES`].
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route(r::OPENAPI, get(openapi::get_openapi))
        .route(r::WHOAMI, get(tokens::whoami))
        .route(r::ORGS, get(orgs::list).post(orgs::create))
        .route(r::ORG, get(orgs::show))
        .route(r::TOKENS, get(tokens::list).post(tokens::create))
        .route(r::TOKEN, delete(tokens::revoke))
        .route(r::ORG_EVENTS, get(events::org_events))
        .route(r::APPS, get(apps::list).post(apps::create))
        .route(r::APP, get(apps::show).delete(apps::remove))
        .route(r::ENVS, get(envs::list).post(envs::create))
        .route(r::ENV, get(envs::show).delete(envs::remove))
        .route(r::ENV_SCALE, put(envs::scale))
        .route(r::CONFIG, get(config::show).patch(config::update))
        .route(r::SECRETS, get(secrets::list))
        .route(r::SECRET, put(secrets::set).delete(secrets::unset))
        .route(r::RELEASES, get(releases::list).post(releases::create))
        .route(r::RELEASE, get(releases::show))
        .route(r::DEPLOYS, get(deploys::list).post(deploys::create))
        .route(r::DEPLOY, get(deploys::show))
        .route(r::PLANS, post(plans::create))
        .route(r::PLAN, get(plans::show))
        .route(r::PLAN_APPLY, post(plans::apply))
        .route(r::ENV_RESTART, post(plans::restart))
        .route(r::INSTANCES, get(read::instances))
        .route(r::ENV_ROUTES, get(read::routes))
        .route(r::ADDRESSES, get(read::addresses))
        .route(r::IPS, get(ips::list).post(ips::allocate))
        .route(r::IP, delete(ips::release))
        .route(r::LOGS, get(logs::query))
        .route(r::HOSTS, get(hosts::list).post(hosts::create))
        .route(r::HOST, get(hosts::show))
        .route(r::HOST_CORDON, post(hosts::cordon))
        .route(r::HOST_UNCORDON, post(hosts::uncordon))
        .route(r::HOST_DRAIN, post(hosts::drain))
        .route(r::INGRESS_TOKENS, post(tokens::create_ingress))
        .route(r::EVENTS, get(events::all_events))
        .route(r::HOST_SELF_REGISTER, post(host_agent::register))
        .route(r::HOST_SELF_HEARTBEAT, post(host_agent::heartbeat))
        .route(r::HOST_SELF_ASSIGNMENTS, get(host_agent::assignments))
        .route(r::HOST_SELF_INSTANCE_STATE, post(host_agent::report_state))
        .route(
            r::HOST_SELF_INSTANCE_STATES,
            post(host_agent::report_states),
        )
        .route(r::HOST_SELF_INSTANCE_SECRETS, get(host_agent::secrets))
        .route(r::HOST_SELF_LOGS, post(host_agent::ship_logs))
        .route(r::INGRESS_ROUTES, get(ingress::routes))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);

    api.layer(axum::middleware::from_fn_with_state(state.clone(), gate))
        .layer(DefaultBodyLimit::max(kiln_api::MAX_LOG_BATCH_BYTES))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        "no such endpoint; see /v1/openapi.json",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this path; see /v1/openapi.json",
    )
}

/// Authenticates the caller, enforces the body limit and applies idempotency keys.
async fn gate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    if path == r::OPENAPI {
        return next.run(request).await;
    }

    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let caller = match crate::auth::authenticate(state.store.pool(), header.as_deref()).await {
        Ok(caller) => caller,
        Err(error) => return error.into_response(),
    };

    let limit = if path == r::HOST_SELF_LOGS || path == r::HOST_SELF_INSTANCE_STATES {
        kiln_api::MAX_LOG_BATCH_BYTES
    } else {
        kiln_api::MAX_BODY_BYTES
    };
    let (mut parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return ApiError::new(
                ErrorCode::BodyTooLarge,
                format!("request body exceeds the limit of {limit} bytes for this endpoint"),
            )
            .with_details(serde_json::json!({ "limit_bytes": limit }))
            .into_response();
        }
    };
    parts.extensions.insert(caller.clone());

    let key = parts
        .headers
        .get(kiln_api::IDEMPOTENCY_KEY_HEADER)
        .map(|value| value.to_str().map(str::to_owned));
    let request = Request::from_parts(parts, axum::body::Body::from(bytes.clone()));
    match key {
        None => next.run(request).await,
        Some(Err(_)) => ApiError::invalid(
            "idempotency-key",
            "the Idempotency-Key header is not valid text",
        )
        .into_response(),
        Some(Ok(key)) if request.method() == axum::http::Method::GET => {
            let _ = key;
            next.run(request).await
        }
        Some(Ok(key)) => idempotency::run(&state, &caller, &key, &bytes, request, next).await,
    }
}

/// Attempts of a read-modify-append before a conflict is returned to the client.
const MAX_CONFLICT_ATTEMPTS: usize = 5;

/// Runs a read-modify-append closure, retrying it when the append loses an optimistic
/// concurrency race (the closure re-reads the stream version each time).
pub async fn retry_on_conflict<T, F, Fut>(mut attempt: F) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    let mut tries = 1;
    loop {
        match attempt().await {
            Err(error) if error.code() == ErrorCode::Conflict && tries < MAX_CONFLICT_ATTEMPTS => {
                tries += 1;
            }
            result => return result,
        }
    }
}
