//! Dedicated IP addresses of an environment: list them, allocate a billed IPv4 address from
//! the operator's pool, and release one.
//!
//! Allocation and release are billing events (`Ipv4AddressAllocated`,
//! `Ipv4AddressReleased`), and the `addresses` projection contains what is allocated.
//! Allocations take a transaction-scoped advisory lock, so two requests (on any replica)
//! never pick the same free address. The ingress serves an environment's `tcp` services on every dedicated
//! address: [`add_ipv4_routes`] copies each TCP route onto the environment's IPv4 addresses
//! when the route table is read.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use ipnet::Ipv4Net;
use kiln_api::types::{AddressKind, AllocateIp, DedicatedIp, IpVersion, List, Route, RouteMatch};
use kiln_api::{ErrorCode, Event};
use kiln_core::{EnvId, OrgId};
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::error::ApiError;
use super::extract::JsonBody;
use super::{AppState, scope};
use crate::auth::Caller;
use crate::store::{ExpectedVersion, NewEvent, Store, StoreError, streams};

/// Advisory lock key that serializes dedicated IPv4 allocations cluster-wide.
const ALLOCATION_LOCK: i64 = 0x6b69_6c6e_6970_7634;

/// Replaces the stored pool with `prefixes`, in order. Addresses already allocated stay
/// allocated even when their prefix leaves the pool.
pub async fn configure_pool(pool: &PgPool, prefixes: &[Ipv4Net]) -> Result<(), StoreError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(StoreError::database("begin the IPv4 pool update"))?;
    sqlx::query("DELETE FROM dedicated_ipv4_pool")
        .execute(&mut *tx)
        .await
        .map_err(StoreError::database("clear the IPv4 pool"))?;
    for (position, prefix) in prefixes.iter().enumerate() {
        sqlx::query("INSERT INTO dedicated_ipv4_pool (position, prefix) VALUES ($1, $2)")
            .bind(i32::try_from(position).unwrap_or(i32::MAX))
            .bind(prefix.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::database("store the IPv4 pool"))?;
    }
    tx.commit()
        .await
        .map_err(StoreError::database("commit the IPv4 pool"))
}

/// `GET .../ips`: the free dedicated IPv6 address, then the IPv4 addresses.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
) -> Result<Json<List<DedicatedIp>>, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    let items = load(state.store.pool(), env.id).await?;
    Ok(Json(List { items }))
}

/// `POST .../ips`: allocates the first free address of the pool.
pub async fn allocate(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env)): Path<(String, String, String)>,
    JsonBody(request): JsonBody<AllocateIp>,
) -> Result<(StatusCode, Json<DedicatedIp>), ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    if request.version == IpVersion::Ipv6 {
        return Err(ApiError::invalid(
            "version",
            format!(
                "version ipv6 cannot be allocated: environment {} already has its free dedicated IPv6 address; allocate version ipv4",
                env.name
            ),
        ));
    }

    let mut tx = state.store.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ALLOCATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(ApiError::database("lock the IPv4 pool"))?;
    let prefixes = load_pool(&mut tx).await?;
    let allocated = allocated_ipv4(&mut tx).await?;
    let Some((address, prefix)) = first_free(&prefixes, &allocated) else {
        return Err(pool_exhausted(&prefixes, allocated.len()));
    };

    let event = Event::Ipv4AddressAllocated {
        env_id: env.id,
        address,
        pool: prefix.to_string(),
    };
    Store::append_in(
        &mut tx,
        &streams::env(env.id),
        ExpectedVersion::Any,
        vec![NewEvent::org(env.org_id(), event)],
        &caller.actor(),
    )
    .await?;
    tx.commit()
        .await
        .map_err(ApiError::database("commit the IPv4 allocation"))?;
    tracing::info!(env_id = %env.id, %address, pool = %prefix, "dedicated IPv4 address allocated");

    let allocated = DedicatedIp {
        env_id: env.id,
        address: IpAddr::V4(address),
        version: IpVersion::Ipv4,
        billed: true,
        pool: Some(prefix.to_string()),
    };
    Ok((StatusCode::CREATED, Json(allocated)))
}

/// `DELETE .../ips/{address}`: releases a dedicated IPv4 address of the environment.
pub async fn release(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, app, env, address)): Path<(String, String, String, String)>,
) -> Result<StatusCode, ApiError> {
    let env = scope::env(state.store.pool(), &caller, &org, &app, &env).await?;
    let address: IpAddr = address.parse().map_err(|_| {
        ApiError::invalid(
            "address",
            format!("{address:?} is not an IP address; use the form 203.0.113.7"),
        )
    })?;
    let IpAddr::V4(address) = address else {
        return Err(ApiError::new(
            ErrorCode::FailedPrecondition,
            format!(
                "{address} is an IPv6 address; the dedicated IPv6 address is free and is released only with its environment"
            ),
        )
        .with_details(serde_json::json!({ "field": "address" })));
    };

    let mut tx = state.store.begin().await?;
    let row = sqlx::query(
        "SELECT pool FROM addresses WHERE address = $1 AND env_id = $2 AND kind = 'dedicated_ipv4'
         FOR UPDATE",
    )
    .bind(address.to_string())
    .bind(env.id.as_uuid())
    .fetch_optional(&mut *tx)
    .await
    .map_err(ApiError::database("look up a dedicated IPv4 address"))?;
    let Some(row) = row else {
        return Err(ApiError::not_found(
            "dedicated IPv4 address",
            format!("{address} of environment {}", env.name),
        ));
    };
    let pool: Option<String> = row.get("pool");

    release_in(
        &mut tx,
        env.org_id(),
        env.id,
        address,
        pool.unwrap_or_default(),
        &caller.actor(),
    )
    .await?;
    tx.commit()
        .await
        .map_err(ApiError::database("commit the IPv4 release"))?;
    tracing::info!(env_id = %env.id, %address, "dedicated IPv4 address released");
    Ok(StatusCode::NO_CONTENT)
}

/// Returns a release event for every dedicated IPv4 address of `env`, read in the caller's
/// transaction, for the deletion of the environment to append, so billing of its addresses
/// ends with it.
pub async fn release_all_events(
    tx: &mut Transaction<'static, Postgres>,
    env: EnvId,
) -> Result<Vec<Event>, ApiError> {
    let rows = sqlx::query(
        "SELECT address, pool FROM addresses WHERE env_id = $1 AND kind = 'dedicated_ipv4'
         ORDER BY address",
    )
    .bind(env.as_uuid())
    .fetch_all(&mut **tx)
    .await
    .map_err(ApiError::database("list dedicated IPv4 addresses"))?;
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let pool: Option<String> = row.get("pool");
        events.push(Event::Ipv4AddressReleased {
            env_id: env,
            address: parse_ipv4(row.get("address"))?,
            pool: pool.unwrap_or_default(),
        });
    }
    Ok(events)
}

async fn release_in(
    tx: &mut Transaction<'static, Postgres>,
    org: OrgId,
    env: EnvId,
    address: Ipv4Addr,
    pool: String,
    actor: &str,
) -> Result<(), ApiError> {
    let event = Event::Ipv4AddressReleased {
        env_id: env,
        address,
        pool,
    };
    Store::append_in(
        tx,
        &streams::env(env),
        ExpectedVersion::Any,
        vec![NewEvent::org(org, event)],
        actor,
    )
    .await?;
    Ok(())
}

/// Loads the dedicated addresses of an environment: IPv6 first, then IPv4 in address order.
pub async fn load(pool: &PgPool, env: EnvId) -> Result<Vec<DedicatedIp>, ApiError> {
    let rows = sqlx::query(
        "SELECT address, kind, pool FROM addresses
         WHERE env_id = $1 AND kind IN ('dedicated', 'dedicated_ipv4')",
    )
    .bind(env.as_uuid())
    .fetch_all(pool)
    .await
    .map_err(ApiError::database("list dedicated addresses"))?;

    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        let address: IpAddr = row
            .get::<String, _>("address")
            .parse()
            .map_err(|_| ApiError::internal("stored dedicated address is invalid"))?;
        let billed = row.get::<String, _>("kind") == "dedicated_ipv4";
        let version = match address {
            IpAddr::V4(_) => IpVersion::Ipv4,
            IpAddr::V6(_) => IpVersion::Ipv6,
        };
        items.push(DedicatedIp {
            env_id: env,
            address,
            version,
            billed,
            pool: row.get("pool"),
        });
    }
    items.sort_by_key(|ip| (ip.version == IpVersion::Ipv4, ip.address));
    Ok(items)
}

/// Adds, for every TCP route, a copy on each dedicated IPv4 address of its environment
/// (same port, backends and PROXY protocol setting). The stored routes name only the
/// environment's IPv6 address.
pub async fn add_ipv4_routes(pool: &PgPool, routes: Vec<Route>) -> Result<Vec<Route>, ApiError> {
    let tcp_envs: HashSet<EnvId> = routes
        .iter()
        .filter(|route| matches!(route.matcher, RouteMatch::Tcp { .. }))
        .map(|route| route.env_id)
        .collect();
    if tcp_envs.is_empty() {
        return Ok(routes);
    }
    let env_ids: Vec<uuid::Uuid> = tcp_envs.iter().map(|env| env.as_uuid()).collect();
    let rows = sqlx::query(
        "SELECT env_id, address FROM addresses
         WHERE kind = 'dedicated_ipv4' AND env_id = ANY($1) ORDER BY address",
    )
    .bind(&env_ids)
    .fetch_all(pool)
    .await
    .map_err(ApiError::database(
        "list dedicated IPv4 addresses for routes",
    ))?;
    let mut ipv4_by_env: HashMap<EnvId, Vec<Ipv4Addr>> = HashMap::new();
    for row in &rows {
        let env = EnvId::from_uuid(row.get("env_id"));
        ipv4_by_env
            .entry(env)
            .or_default()
            .push(parse_ipv4(row.get("address"))?);
    }

    let mut expanded = Vec::with_capacity(routes.len() + rows.len());
    for route in routes {
        let copies: Vec<Route> = match (&route.matcher, ipv4_by_env.get(&route.env_id)) {
            (RouteMatch::Tcp { port, .. }, Some(addresses)) => addresses
                .iter()
                .map(|address| Route {
                    matcher: RouteMatch::Tcp {
                        address: IpAddr::V4(*address),
                        port: *port,
                    },
                    ..route.clone()
                })
                .collect(),
            _ => Vec::new(),
        };
        expanded.push(route);
        expanded.extend(copies);
    }
    Ok(expanded)
}

async fn load_pool(tx: &mut Transaction<'static, Postgres>) -> Result<Vec<Ipv4Net>, ApiError> {
    let rows = sqlx::query("SELECT prefix FROM dedicated_ipv4_pool ORDER BY position")
        .fetch_all(&mut **tx)
        .await
        .map_err(ApiError::database("read the IPv4 pool"))?;
    rows.iter()
        .map(|row| {
            row.get::<String, _>("prefix")
                .parse()
                .map_err(|_| ApiError::internal("stored IPv4 pool prefix is invalid"))
        })
        .collect()
}

async fn allocated_ipv4(
    tx: &mut Transaction<'static, Postgres>,
) -> Result<HashSet<Ipv4Addr>, ApiError> {
    let rows = sqlx::query("SELECT address FROM addresses WHERE kind = $1")
        .bind(kind_text(AddressKind::DedicatedIpv4))
        .fetch_all(&mut **tx)
        .await
        .map_err(ApiError::database("list allocated IPv4 addresses"))?;
    rows.iter()
        .map(|row| parse_ipv4(row.get("address")))
        .collect()
}

/// Returns the first address of the pool, in prefix order, that is not allocated. The
/// search visits at most `allocated.len() + 1` addresses of a large prefix.
pub fn first_free(
    prefixes: &[Ipv4Net],
    allocated: &HashSet<Ipv4Addr>,
) -> Option<(Ipv4Addr, Ipv4Net)> {
    prefixes.iter().find_map(|prefix| {
        prefix
            .hosts()
            .find(|address| !allocated.contains(address))
            .map(|address| (address, *prefix))
    })
}

fn pool_exhausted(prefixes: &[Ipv4Net], allocated: usize) -> ApiError {
    let names: Vec<String> = prefixes.iter().map(ToString::to_string).collect();
    let message = if names.is_empty() {
        "no dedicated IPv4 pool is configured on this cluster; ask the operator to set \
         dedicated_ipv4_pool in the kiln-control config"
            .to_owned()
    } else {
        format!(
            "dedicated IPv4 pool {} is exhausted ({allocated} addresses allocated); release an \
             address with `kiln ips release` or ask the operator to extend dedicated_ipv4_pool",
            names.join(", ")
        )
    };
    ApiError::new(ErrorCode::FailedPrecondition, message)
        .with_details(serde_json::json!({ "pool": names, "allocated": allocated }))
}

fn parse_ipv4(text: String) -> Result<Ipv4Addr, ApiError> {
    text.parse()
        .map_err(|_| ApiError::internal("stored dedicated IPv4 address is invalid"))
}

fn kind_text(kind: AddressKind) -> String {
    match serde_json::to_value(kind) {
        Ok(serde_json::Value::String(text)) => text,
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_free_skips_allocated_and_reserved() {
        let prefixes: Vec<Ipv4Net> = vec![
            "203.0.113.0/30".parse().unwrap(),
            "198.51.100.8/31".parse().unwrap(),
        ];
        let mut allocated = HashSet::new();
        let mut order = Vec::new();
        while let Some((address, _)) = first_free(&prefixes, &allocated) {
            order.push(address.to_string());
            allocated.insert(address);
        }
        // A /30 loses its network and broadcast addresses; a /31 keeps both.
        assert_eq!(
            order,
            ["203.0.113.1", "203.0.113.2", "198.51.100.8", "198.51.100.9"]
        );
    }

    #[test]
    fn first_free_reuses_released() {
        let prefixes: Vec<Ipv4Net> = vec!["203.0.113.0/29".parse().unwrap()];
        let allocated: HashSet<Ipv4Addr> = ["203.0.113.1", "203.0.113.3"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let (address, prefix) = first_free(&prefixes, &allocated).unwrap();
        assert_eq!(address.to_string(), "203.0.113.2");
        assert_eq!(prefix, prefixes[0]);
    }

    #[test]
    fn first_free_empty_pool() {
        assert_eq!(first_free(&[], &HashSet::new()), None);
    }
}
