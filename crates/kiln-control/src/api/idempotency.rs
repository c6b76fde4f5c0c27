//! Idempotency keys: a mutating call repeated with the same `Idempotency-Key` (per token)
//! returns the first call's response instead of acting twice.
//!
//! The key is claimed before the handler runs (so two concurrent calls with one key cannot
//! both act), and the response is stored afterwards. A 5xx releases the claim, so the
//! client can retry. Responses that carry a token secret are not stored: a replay of such a
//! call answers `failed_precondition` instead, because the secret is shown only once.

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kiln_api::{ErrorCode, routes as r};
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::AppState;
use super::error::ApiError;
use crate::auth::Caller;

/// Longest idempotency key accepted, in bytes.
const MAX_KEY_LEN: usize = 255;

/// Largest response body stored for replay, in bytes.
const MAX_STORED_BODY: usize = 1024 * 1024;

/// Runs `request` under idempotency key `key`.
pub async fn run(
    state: &AppState,
    caller: &Caller,
    key: &str,
    body: &Bytes,
    request: Request,
    next: Next,
) -> Response {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return ApiError::invalid(
            "idempotency-key",
            format!("the Idempotency-Key header must be 1 to {MAX_KEY_LEN} bytes"),
        )
        .into_response();
    }

    let request_hash = hash_request(request.method(), request.uri(), body);
    let pool = state.store.pool();
    let token_id = caller.token.id.as_uuid();

    let claimed = sqlx::query(
        "INSERT INTO idempotency_keys (token_id, key, request_hash) VALUES ($1, $2, $3)
         ON CONFLICT (token_id, key) DO NOTHING",
    )
    .bind(token_id)
    .bind(key)
    .bind(request_hash.as_slice())
    .execute(pool)
    .await;
    let claimed = match claimed {
        Ok(result) => result.rows_affected() == 1,
        Err(error) => return ApiError::database("claim idempotency key")(error).into_response(),
    };

    if !claimed {
        return replay(state, token_id, key, &request_hash).await;
    }

    let secret_bearing = carries_secret(request.method(), request.uri().path());
    let response = next.run(request).await;
    let status = response.status();

    if status.is_server_error() {
        let released = sqlx::query("DELETE FROM idempotency_keys WHERE token_id = $1 AND key = $2")
            .bind(token_id)
            .bind(key)
            .execute(pool)
            .await;
        if let Err(error) = released {
            tracing::warn!(%error, "failed to release idempotency key after a server error");
        }
        return response;
    }

    let (parts, response_body) = response.into_parts();
    let bytes = match axum::body::to_bytes(response_body, MAX_STORED_BODY).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return ApiError::internal("response body too large to store for idempotency")
                .into_response();
        }
    };
    let stored_body = (!secret_bearing).then(|| bytes.to_vec());
    let stored = sqlx::query(
        "UPDATE idempotency_keys SET status = $3, body = $4 WHERE token_id = $1 AND key = $2",
    )
    .bind(token_id)
    .bind(key)
    .bind(i32::from(status.as_u16()))
    .bind(stored_body)
    .execute(pool)
    .await;
    if let Err(error) = stored {
        tracing::warn!(%error, "failed to store idempotent response");
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

async fn replay(
    state: &AppState,
    token_id: uuid::Uuid,
    key: &str,
    request_hash: &[u8],
) -> Response {
    let row = sqlx::query(
        "SELECT request_hash, status, body FROM idempotency_keys WHERE token_id = $1 AND key = $2",
    )
    .bind(token_id)
    .bind(key)
    .fetch_optional(state.store.pool())
    .await;
    let row = match row {
        Ok(Some(row)) => row,
        Ok(None) => {
            return ApiError::new(
                ErrorCode::Conflict,
                "a request with this idempotency key just finished; retry it",
            )
            .into_response();
        }
        Err(error) => return ApiError::database("read idempotency key")(error).into_response(),
    };

    let stored_hash: Vec<u8> = row.get("request_hash");
    if stored_hash != request_hash {
        return ApiError::new(
            ErrorCode::IdempotencyKeyReused,
            "this idempotency key was used for a different request; use a new key",
        )
        .into_response();
    }
    let Some(status) = row.get::<Option<i32>, _>("status") else {
        return ApiError::new(
            ErrorCode::Conflict,
            "a request with this idempotency key is still in progress; retry later",
        )
        .into_response();
    };
    let Some(body) = row.get::<Option<Vec<u8>>, _>("body") else {
        return ApiError::new(
            ErrorCode::FailedPrecondition,
            "this request already succeeded and its response contained a secret that is shown \
             only once; list the resource to see it, or create a new one",
        )
        .into_response();
    };

    let status = u16::try_from(status)
        .ok()
        .and_then(|status| StatusCode::from_u16(status).ok())
        .unwrap_or(StatusCode::OK);
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    response.headers_mut().insert(
        "idempotent-replay",
        axum::http::HeaderValue::from_static("true"),
    );
    response
}

fn hash_request(method: &Method, uri: &axum::http::Uri, body: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(method.as_str().as_bytes());
    hasher.update([0]);
    hasher.update(uri.to_string().as_bytes());
    hasher.update([0]);
    hasher.update(body);
    hasher.finalize().into()
}

/// Returns true for calls whose success response carries a token secret.
fn carries_secret(method: &Method, path: &str) -> bool {
    if method != Method::POST {
        return false;
    }
    path == r::HOSTS
        || path == r::INGRESS_TOKENS
        || (path.starts_with("/v1/orgs/") && path.ends_with("/tokens"))
}
