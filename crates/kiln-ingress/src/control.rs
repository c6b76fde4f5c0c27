//! Control-plane mode: follows the control plane's route watch and applies each route table
//! to the running ingress.
//!
//! The watch (`GET /v1/ingress/routes`, ingress token) returns the whole route table with a
//! cursor, and long-polls until the table changes after the cursor passed in. Each new table
//! replaces the old one atomically through [`Ingress::apply_routes`]. A failed request is
//! retried with capped exponential backoff from the same cursor, so nothing is lost; the
//! ingress keeps serving the last table it applied meanwhile.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kiln_api::{Client, ClientError, RouteMatch, RouteTable, WatchQuery};
use thiserror::Error;

use crate::Ingress;
use crate::routes::{Route, RouteSet, TcpService};

/// Seconds each watch request waits for a change.
const WATCH_WAIT_SECS: u64 = 30;
/// First delay after a failed request.
const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Maximum delay between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Error that stops following the control plane.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The control plane rejected the request in a way a retry cannot fix, such as an
    /// invalid or revoked token.
    #[error("route watch rejected by the control plane")]
    Rejected(#[source] ClientError),
}

/// Converts the control plane's route table into a route set for the proxy.
///
/// SNI routes become hostname routes and TCP routes become TCP services on their dedicated
/// address. Backends are the instances' overlay addresses. The control plane guarantees
/// that a hostname belongs to one env; if a table still repeats a hostname or a TCP
/// address, the first entry wins and the others are logged and skipped, so one bad entry
/// cannot block every other route update.
pub fn route_set_from_table(table: &RouteTable) -> RouteSet {
    let mut set = RouteSet::default();
    let mut hostnames = HashSet::new();
    let mut listens = HashSet::new();

    for route in &table.routes {
        let backends: Vec<SocketAddr> = route
            .backends
            .iter()
            .map(|backend| SocketAddr::new(IpAddr::V6(backend.address), backend.port))
            .collect();
        match &route.matcher {
            RouteMatch::Sni { hostname } => {
                if !hostnames.insert(hostname.clone()) {
                    tracing::warn!(%hostname, env_id = %route.env_id, "hostname routed twice, keeping the first");
                    continue;
                }
                set.routes.push(Route {
                    hostname: hostname.clone(),
                    backends,
                    proxy_protocol: route.proxy_protocol,
                });
            }
            RouteMatch::Tcp { address, port } => {
                let listen = SocketAddr::new(*address, *port);
                if !listens.insert(listen) {
                    tracing::warn!(%listen, env_id = %route.env_id, "TCP address routed twice, keeping the first");
                    continue;
                }
                set.tcp_services.push(TcpService {
                    listen,
                    backends,
                    proxy_protocol: route.proxy_protocol,
                });
            }
        }
    }
    set
}

/// Fetches the current route table, retrying transient failures until one succeeds.
pub async fn fetch_initial_routes(client: &Client) -> Result<RouteTable, ControlError> {
    let query = WatchQuery {
        after: None,
        wait: None,
    };
    let mut backoff = INITIAL_BACKOFF;
    loop {
        match client.watch_routes(&query).await {
            Ok(table) => return Ok(table),
            Err(error) if error.is_retryable() => {
                tracing::warn!(error = %error_chain(&error), retry_in = ?backoff, "route fetch failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(error) => return Err(ControlError::Rejected(error)),
        }
    }
}

/// Follows the route watch from `cursor`, applying each new table, until a request fails
/// in a way a retry cannot fix. Runs until dropped otherwise.
pub async fn follow_routes(
    client: &Client,
    ingress: &Ingress,
    mut cursor: u64,
) -> Result<(), ControlError> {
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let query = WatchQuery {
            after: Some(cursor),
            wait: Some(WATCH_WAIT_SECS),
        };
        let table = match client.watch_routes(&query).await {
            Ok(table) => table,
            Err(error) if error.is_retryable() => {
                tracing::warn!(error = %error_chain(&error), cursor, retry_in = ?backoff, "route watch failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            Err(error) => return Err(ControlError::Rejected(error)),
        };
        backoff = INITIAL_BACKOFF;

        // A long poll that saw no change returns the table at the same cursor.
        if table.cursor == cursor {
            continue;
        }
        let set = route_set_from_table(&table);
        match ingress.apply_routes(&set) {
            Ok(()) => tracing::info!(
                cursor = table.cursor,
                "applied routes from the control plane"
            ),
            Err(error) => {
                // The cursor stays, because asking for the table after a cursor acknowledges
                // that table to the control plane, which then stops instances it no longer
                // routes to. The table is fetched again after a pause.
                tracing::error!(error = %error_chain(&error), cursor = table.cursor, retry_in = ?backoff, "route table from the control plane not applied, keeping the old routes");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        }
        cursor = table.cursor;
    }
}

/// Formats an error with its sources on one line.
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
