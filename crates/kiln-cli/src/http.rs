//! The CLI's HTTP transport to kiln-control: bearer auth, idempotency keys, error mapping and
//! `--verbose` request logs.
//!
//! Request and response bodies are the `kiln_api` types. Every mutating request carries a
//! fresh idempotency key, so a retry after a timeout cannot apply twice. With `--verbose`,
//! each request and response is logged on stderr after [`crate::redact`] has removed tokens
//! and secret values.

use std::time::{Duration, Instant};

use kiln_api::{ErrorBody, ErrorCode, IDEMPOTENCY_KEY_HEADER};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{CliError, CliResult};
use crate::exit::ExitKind;
use crate::redact;

/// How long one request may take before it fails, except long polls, which add their wait.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// An authenticated connection to one control plane.
#[derive(Debug, Clone)]
pub(crate) struct Http {
    client: reqwest::Client,
    base_url: String,
    token: Option<String>,
    verbose: bool,
}

/// A request body, already encoded, with what is needed to log it safely.
struct Body {
    bytes: Vec<u8>,
}

impl Http {
    /// Creates a transport for `base_url`; `token` is sent as `Authorization: Bearer`.
    pub(crate) fn new(base_url: &str, token: Option<String>, verbose: bool) -> CliResult<Self> {
        crate::config::check_api_url(base_url).map_err(|reason| {
            CliError::usage(format!("invalid API URL {base_url:?}: {reason}"))
                .with_hint("fix the context's api_url with `kiln login --api-url URL`")
        })?;
        let client = reqwest::Client::builder()
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| {
                CliError::failure("cannot set up the HTTP client").with_source(error)
            })?;
        Ok(Self {
            client,
            base_url: base_url.trim_end_matches('/').to_owned(),
            token,
            verbose,
        })
    }

    /// The plain client, for requests to other servers such as image registries.
    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The API base URL.
    pub(crate) fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `GET path` and decodes the response.
    pub(crate) async fn get<R: DeserializeOwned>(&self, path: &str) -> CliResult<R> {
        self.send(Method::GET, path, None::<&()>, REQUEST_TIMEOUT)
            .await
    }

    /// `GET path?query`, for a long poll that may wait up to `wait` on the server.
    pub(crate) async fn get_query<R: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        wait: Duration,
    ) -> CliResult<R> {
        self.send_query(
            Method::GET,
            path,
            query,
            None::<&()>,
            REQUEST_TIMEOUT + wait,
        )
        .await
    }

    /// `POST path` with a JSON body and decodes the response.
    pub(crate) async fn post<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> CliResult<R> {
        self.send(Method::POST, path, Some(body), REQUEST_TIMEOUT)
            .await
    }

    /// `PUT path` with a JSON body and decodes the response.
    pub(crate) async fn put<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> CliResult<R> {
        self.send(Method::PUT, path, Some(body), REQUEST_TIMEOUT)
            .await
    }

    /// `PATCH path` with a JSON body and decodes the response.
    pub(crate) async fn patch<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> CliResult<R> {
        self.send(Method::PATCH, path, Some(body), REQUEST_TIMEOUT)
            .await
    }

    /// `DELETE path` and decodes the response.
    pub(crate) async fn delete_json<R: DeserializeOwned>(&self, path: &str) -> CliResult<R> {
        self.send(Method::DELETE, path, None::<&()>, REQUEST_TIMEOUT)
            .await
    }

    /// `POST path` without a body and decodes the response.
    pub(crate) async fn post_empty<R: DeserializeOwned>(&self, path: &str) -> CliResult<R> {
        self.send(Method::POST, path, None::<&()>, REQUEST_TIMEOUT)
            .await
    }

    /// `DELETE path`; the response body, if any, is ignored.
    pub(crate) async fn delete(&self, path: &str) -> CliResult {
        self.send::<(), serde_json::Value>(Method::DELETE, path, None, REQUEST_TIMEOUT)
            .await
            .map(|_| ())
    }

    async fn send<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> CliResult<R> {
        self.send_query(method, path, &[], body, timeout).await
    }

    async fn send_query<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
        timeout: Duration,
    ) -> CliResult<R> {
        let url = format!("{}{path}", self.base_url);
        let secrets_endpoint = path.contains("/secrets");
        let what = format!("{method} {path}");

        let body = match body {
            Some(body) => Some(Body {
                bytes: serde_json::to_vec(body).map_err(|error| {
                    CliError::failure(format!("cannot encode the body of {what}"))
                        .with_source(error)
                })?,
            }),
            None => None,
        };

        let mut request = self
            .client
            .request(method.clone(), &url)
            .query(query)
            .timeout(timeout);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if method != Method::GET {
            request = request.header(IDEMPOTENCY_KEY_HEADER, uuid::Uuid::new_v4().to_string());
        }
        if let Some(body) = &body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.bytes.clone());
        }
        let request = request.build().map_err(|error| {
            CliError::failure(format!("invalid request {what}"))
                .with_source(error)
                .with_hint("check --api-url or the context's api_url")
        })?;

        if self.verbose {
            log_request(&request, body.as_ref(), secrets_endpoint);
        }

        let started = Instant::now();
        let response = self.client.execute(request).await.map_err(|error| {
            let hint = if error.is_timeout() {
                "the control plane did not answer in time; retry, or check its health"
            } else {
                "check that kiln-control is reachable at the context's api_url (see `kiln whoami`)"
            };
            CliError::failure(format!("request {what} to {} failed", self.base_url))
                .with_source(error)
                .with_hint(hint)
        })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|error| {
            CliError::failure(format!("reading the response to {what} failed")).with_source(error)
        })?;

        if self.verbose {
            eprintln!(
                "< {} {} ({} ms)\n< {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or(""),
                started.elapsed().as_millis(),
                redact::body(&bytes, secrets_endpoint)
            );
        }

        if !status.is_success() {
            return Err(api_error(&what, &self.base_url, status, &bytes));
        }
        let bytes = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(bytes).map_err(|error| {
            CliError::failure(format!("the response to {what} is not what kiln expects"))
                .with_source(error)
                .with_hint("kiln and kiln-control may be different versions; update kiln")
        })
    }
}

fn log_request(request: &reqwest::Request, body: Option<&Body>, secrets_endpoint: bool) {
    eprintln!("> {} {}", request.method(), request.url());
    for (name, value) in request.headers() {
        let value = value.to_str().unwrap_or("<binary>");
        eprintln!("> {name}: {}", redact::header_value(name.as_str(), value));
    }
    if let Some(body) = body {
        eprintln!("> {}", redact::body(&body.bytes, secrets_endpoint));
    }
}

/// Hint for a response that shows the request did not reach kiln-control's API routes.
fn wrong_url_hint(base_url: &str) -> String {
    format!(
        "the API URL {base_url} looks wrong: kiln-control did not answer there; pass \
         --api-url http(s)://HOST[:PORT] without a path (`kiln whoami` shows the context's)"
    )
}

/// Maps an error response to a CLI error with an exit kind and a hint.
fn api_error(what: &str, base_url: &str, status: StatusCode, bytes: &[u8]) -> CliError {
    let Ok(body) = serde_json::from_slice::<ErrorBody>(bytes) else {
        let kind = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ExitKind::Auth,
            StatusCode::NOT_FOUND => ExitKind::NotFound,
            StatusCode::CONFLICT => ExitKind::Conflict,
            _ => ExitKind::Failure,
        };
        return CliError::new(kind, format!("{what} failed with HTTP {status}"))
            .with_hint(wrong_url_hint(base_url));
    };

    // kiln-control returns this message for a path outside its API. It means the API URL has
    // a path it should not have, not that a named resource is missing.
    if body.code == ErrorCode::NotFound && body.message.starts_with("no such endpoint") {
        return CliError::new(
            ExitKind::NotFound,
            format!("{what} failed: {}", body.message),
        )
        .with_hint(wrong_url_hint(base_url));
    }

    let (kind, hint) = match body.code {
        ErrorCode::Unauthenticated => (
            ExitKind::Auth,
            "run `kiln login`, or set KILN_TOKEN to a valid token".to_owned(),
        ),
        ErrorCode::TokenExpired | ErrorCode::TokenRevoked => (
            ExitKind::Auth,
            "create a new token with `kiln tokens create` from a working login, then run \
             `kiln login`"
                .to_owned(),
        ),
        ErrorCode::Forbidden => (
            ExitKind::Auth,
            "this token may not do that; use a token with the needed role (`kiln whoami` shows \
             yours)"
                .to_owned(),
        ),
        ErrorCode::InvalidValue | ErrorCode::InvalidBody => (
            ExitKind::Usage,
            "fix the value named above and retry".to_owned(),
        ),
        ErrorCode::NotFound => (
            ExitKind::NotFound,
            "check the names with `kiln apps list` and `kiln envs list`".to_owned(),
        ),
        ErrorCode::AlreadyExists => (
            ExitKind::Conflict,
            "choose another name, or use the existing one".to_owned(),
        ),
        ErrorCode::Conflict => (
            ExitKind::Conflict,
            "the resource changed meanwhile; look at it again and retry".to_owned(),
        ),
        ErrorCode::PlanConflict => (
            ExitKind::Conflict,
            "the environment changed since the plan was made; make a new one with `kiln plan`"
                .to_owned(),
        ),
        ErrorCode::FailedPrecondition => (
            ExitKind::Conflict,
            "the resource is not in a state that allows this; see `kiln status`".to_owned(),
        ),
        ErrorCode::NotImplemented => (
            ExitKind::Failure,
            "this control plane does not support the operation yet".to_owned(),
        ),
        ErrorCode::Unavailable => (
            ExitKind::Failure,
            "the control plane is busy or restarting; retry in a moment".to_owned(),
        ),
        ErrorCode::Internal => (
            ExitKind::Failure,
            "this is a bug in kiln-control; report it with the message above".to_owned(),
        ),
        _ => (
            ExitKind::Failure,
            "fix the value named above and retry".to_owned(),
        ),
    };

    CliError::new(kind, format!("{what} failed: {}", body.message)).with_hint(hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE_URL: &str = "http://127.0.0.1:9";

    fn error_for(status: StatusCode, body: &str) -> CliError {
        api_error("GET /v1/apps", BASE_URL, status, body.as_bytes())
    }

    #[test]
    fn validation_errors_are_usage() {
        for code in ["invalid_value", "invalid_body"] {
            let body = format!(r#"{{"code":"{code}","message":"count 500 is above 100"}}"#);

            let error = error_for(StatusCode::BAD_REQUEST, &body);

            assert_eq!(error.kind(), ExitKind::Usage, "{code}");
        }
    }

    #[test]
    fn unknown_endpoint_blames_url() {
        let kiln_body =
            r#"{"code":"not_found","message":"no such endpoint; see /v1/openapi.json"}"#;

        let from_kiln = error_for(StatusCode::NOT_FOUND, kiln_body).to_string();
        let from_other = error_for(StatusCode::NOT_FOUND, "<html>404</html>").to_string();

        assert!(
            from_kiln.contains("API URL http://127.0.0.1:9 looks wrong"),
            "{from_kiln}"
        );
        assert!(!from_kiln.contains("kiln apps list"), "{from_kiln}");
        assert!(
            from_other.contains("API URL http://127.0.0.1:9 looks wrong"),
            "{from_other}"
        );
    }
}
