//! API errors: a stable code, a message for the user, optional details, and one function
//! ([`ApiError::status`]) mapping codes to HTTP status. Internal causes are logged with an
//! error id and never reach the response body.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_api::{ErrorBody, ErrorCode};

use crate::secrets::SecretsError;
use crate::store::StoreError;

/// An error returned by a handler.
#[derive(Debug)]
pub struct ApiError {
    body: ErrorBody,
}

impl ApiError {
    /// Creates an error with a code and a user-facing message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            body: ErrorBody::new(code, message),
        }
    }

    /// Returns the user-facing message.
    pub fn message(&self) -> &str {
        &self.body.message
    }

    /// Attaches structured details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.body = self.body.with_details(details);
        self
    }

    /// Creates an `invalid_value` error naming the field.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidValue, message)
            .with_details(serde_json::json!({ "field": field }))
    }

    /// Creates a `not_found` error for a resource named `name` of `kind`.
    pub fn not_found(kind: &str, name: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::NotFound, format!("{kind} {name} not found"))
    }

    /// Creates an `internal` error, logging `what` under a fresh error id.
    pub fn internal(what: &str) -> Self {
        let error_id = uuid::Uuid::new_v4();
        tracing::error!(%error_id, what, "internal error");
        Self::new(
            ErrorCode::Internal,
            format!("internal error {error_id}; the server log has the details"),
        )
    }

    /// Returns a mapper from a database error to an API error.
    pub fn database(operation: &'static str) -> impl FnOnce(sqlx::Error) -> ApiError {
        move |source| ApiError::from(StoreError::database(operation)(source))
    }

    /// Returns the error code.
    pub fn code(&self) -> ErrorCode {
        self.body.code
    }

    /// Returns the HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.body.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict { stream, actual, .. } => ApiError::new(
                ErrorCode::Conflict,
                "the resource changed concurrently; retry the request",
            )
            .with_details(serde_json::json!({ "stream": stream, "version": actual })),
            StoreError::Duplicate { constraint } => duplicate(&constraint),
            other => {
                let error_id = uuid::Uuid::new_v4();
                tracing::error!(%error_id, error = %error_chain(&other), "store operation failed");
                ApiError::new(
                    ErrorCode::Internal,
                    format!("internal error {error_id}; the server log has the details"),
                )
            }
        }
    }
}

impl From<SecretsError> for ApiError {
    fn from(error: SecretsError) -> Self {
        let error_id = uuid::Uuid::new_v4();
        tracing::error!(%error_id, error = %error_chain(&error), "secret operation failed");
        ApiError::new(
            ErrorCode::Internal,
            format!("internal error {error_id}; the server log has the details"),
        )
    }
}

fn duplicate(constraint: &str) -> ApiError {
    let (what, field) = match constraint {
        "orgs_name_key" => ("an org with this name already exists", "name"),
        "apps_org_name" => ("an app with this name already exists in the org", "name"),
        "envs_app_name" => (
            "an environment with this name already exists in the app",
            "name",
        ),
        "envs_hostname" => ("this platform hostname is already in use", "name"),
        "hosts_name_key" => ("a host with this name already exists", "name"),
        "releases_env_version" => (
            "a release with this version was created concurrently; retry",
            "version",
        ),
        _ => ("the resource already exists", "name"),
    };
    ApiError::new(kiln_api::ErrorCode::AlreadyExists, what)
        .with_details(serde_json::json!({ "field": field }))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.body)).into_response()
    }
}

/// Joins an error and its sources into one line, for logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
