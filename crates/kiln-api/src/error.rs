//! The error body every endpoint returns on failure, `{code, message, details}`.
//!
//! The code is stable and machine-readable: clients branch on it, never on the message. The
//! message is for people and carries no internal detail (no SQL, no stack, no file paths).
//! `details` holds structured context such as the offending field.

use serde::{Deserialize, Serialize};

/// Stable error codes. Adding a code is compatible; renaming or removing one is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not valid JSON.
    MalformedJson,
    /// The body is JSON but does not match the request type (unknown field, wrong type,
    /// missing field).
    InvalidBody,
    /// A field or path value is out of range or badly formed (names, numbers, digests).
    InvalidValue,
    /// The body is larger than the endpoint accepts.
    BodyTooLarge,
    /// The request has no token, or the token is unknown or malformed.
    Unauthenticated,
    /// The token has expired.
    TokenExpired,
    /// The token was revoked.
    TokenRevoked,
    /// The token is valid but may not perform this call.
    Forbidden,
    /// The resource does not exist or the token may not see it.
    NotFound,
    /// A resource with this name already exists.
    AlreadyExists,
    /// The stream changed since the caller read it; re-read and retry.
    Conflict,
    /// The environment changed since the deploy plan was made; make a new plan.
    PlanConflict,
    /// The idempotency key was used before with a different request.
    IdempotencyKeyReused,
    /// The operation is not valid in the resource's current state.
    FailedPrecondition,
    /// The method is not allowed on this path.
    MethodNotAllowed,
    /// The endpoint is declared but not implemented by this server.
    NotImplemented,
    /// The server is overloaded or shutting down; retry later.
    Unavailable,
    /// A bug in the server. The message carries an id to find the log entry.
    Internal,
}

impl ErrorCode {
    /// Returns the HTTP status that goes with this code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::MalformedJson | Self::InvalidBody | Self::InvalidValue => 400,
            Self::Unauthenticated | Self::TokenExpired | Self::TokenRevoked => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::AlreadyExists
            | Self::Conflict
            | Self::PlanConflict
            | Self::FailedPrecondition => 409,
            Self::IdempotencyKeyReused => 422,
            Self::BodyTooLarge => 413,
            Self::Internal => 500,
            Self::NotImplemented => 501,
            Self::Unavailable => 503,
        }
    }

    /// Returns true when retrying the same request later can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Conflict | Self::Unavailable)
    }

    /// Returns the code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedJson => "malformed_json",
            Self::InvalidBody => "invalid_body",
            Self::InvalidValue => "invalid_value",
            Self::BodyTooLarge => "body_too_large",
            Self::Unauthenticated => "unauthenticated",
            Self::TokenExpired => "token_expired",
            Self::TokenRevoked => "token_revoked",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::Conflict => "conflict",
            Self::PlanConflict => "plan_conflict",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::FailedPrecondition => "failed_precondition",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::NotImplemented => "not_implemented",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 18] = [
        Self::MalformedJson,
        Self::InvalidBody,
        Self::InvalidValue,
        Self::BodyTooLarge,
        Self::Unauthenticated,
        Self::TokenExpired,
        Self::TokenRevoked,
        Self::Forbidden,
        Self::NotFound,
        Self::AlreadyExists,
        Self::Conflict,
        Self::PlanConflict,
        Self::IdempotencyKeyReused,
        Self::FailedPrecondition,
        Self::MethodNotAllowed,
        Self::NotImplemented,
        Self::Unavailable,
        Self::Internal,
    ];
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ErrorBody {
    /// Stable machine-readable code.
    pub code: ErrorCode,
    /// Human-readable message naming the offending value and, where possible, the fix.
    pub message: String,
    /// Structured context, such as `{"field": "name"}`; `null` when there is none.
    #[serde(default)]
    pub details: serde_json::Value,
}

impl ErrorBody {
    /// Creates an error body without details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: serde_json::Value::Null,
        }
    }

    /// Attaches structured details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_their_wire_names() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, serde_json::Value::String(code.as_str().to_owned()));
        }
    }

    #[test]
    fn only_internal_maps_to_500() {
        for code in ErrorCode::ALL {
            let status = code.http_status();
            assert_eq!(status == 500, code == ErrorCode::Internal, "{code}");
        }
    }
}
