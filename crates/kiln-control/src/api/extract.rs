//! Request extractors that turn every malformed input into an [`ApiError`] with a stable code:
//! JSON bodies, query strings, path names and the authenticated caller.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use kiln_api::ErrorCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::auth::Caller;

/// A JSON body. Syntax errors are `malformed_json`; unknown fields, wrong types and missing
/// fields are `invalid_body` with the serde message (which names the field and position).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|_| ApiError::new(ErrorCode::BodyTooLarge, "request body too large"))?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// A JSON body whose NUL characters are replaced with U+FFFD instead of rejected. Only the host
/// agent's log batches use it: a process may print NUL, and rejecting the batch would make the
/// agent retry it forever.
#[derive(Debug)]
pub struct LossyJsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for LossyJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|_| ApiError::new(ErrorCode::BodyTooLarge, "request body too large"))?;
        if !contains_nul_escape(&bytes) {
            return parse_json(&bytes).map(LossyJsonBody);
        }
        let mut value = parse_json_value(&bytes)?;
        replace_nul(&mut value);
        let text = serde_json::to_vec(&value)
            .map_err(|_| ApiError::internal("re-encoding a JSON body failed"))?;
        parse_json(&text).map(LossyJsonBody)
    }
}

fn parse_json_value(bytes: &[u8]) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|error| {
        ApiError::new(
            ErrorCode::MalformedJson,
            format!("request body is not valid JSON: {error}"),
        )
    })
}

fn replace_nul(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(text) if text.contains('\0') => {
            *text = text.replace('\0', "\u{FFFD}");
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(replace_nul),
        serde_json::Value::Object(fields) => fields.values_mut().for_each(replace_nul),
        _ => {}
    }
}

fn contains_nul_escape(bytes: &[u8]) -> bool {
    const ESCAPE: &[u8] = b"\\u0000";
    bytes.windows(ESCAPE.len()).any(|window| window == ESCAPE)
}

/// Parses a JSON request body, classifying errors. A string containing NUL (`\u0000`) is
/// `invalid_value` naming its JSON path, because PostgreSQL `text` and `jsonb` cannot store
/// NUL and every string of a body may end up in one of them.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let parsed = serde_json::from_slice(bytes).map_err(|error| {
        use serde_json::error::Category;
        match error.classify() {
            Category::Syntax | Category::Eof | Category::Io => ApiError::new(
                ErrorCode::MalformedJson,
                format!("request body is not valid JSON: {error}"),
            ),
            Category::Data => ApiError::new(
                ErrorCode::InvalidBody,
                format!("request body does not match the expected fields: {error}"),
            ),
        }
    })?;
    reject_nul(bytes)?;
    Ok(parsed)
}

/// Rejects a body whose strings or object keys contain NUL. JSON can only carry NUL as the
/// escape `\u0000` (a raw control character is a syntax error), so bodies without that
/// escape skip the second parse.
fn reject_nul(bytes: &[u8]) -> Result<(), ApiError> {
    if !contains_nul_escape(bytes) {
        return Ok(());
    }
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|error| ApiError::new(ErrorCode::MalformedJson, error.to_string()))?;
    match nul_path(&value, "") {
        Some(path) => Err(ApiError::invalid(
            &path,
            format!("{path} contains a NUL character (\\u0000); remove it"),
        )),
        None => Ok(()),
    }
}

/// Returns the JSON path (`spec.env.K`, `items[2]`) of the first string containing NUL.
fn nul_path(value: &serde_json::Value, path: &str) -> Option<String> {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        serde_json::Value::String(text) if text.contains('\0') => Some(if path.is_empty() {
            "body".to_owned()
        } else {
            path.to_owned()
        }),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(index, item)| nul_path(item, &format!("{path}[{index}]"))),
        serde_json::Value::Object(fields) => fields.iter().find_map(|(key, field)| {
            if key.contains('\0') {
                Some(join(&key.replace('\0', "\\u0000")))
            } else {
                nul_path(field, &join(key))
            }
        }),
        _ => None,
    }
}

/// A query string. Unknown parameters and wrong types are `invalid_value`.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        serde_urlencoded_from_str(query).map(QueryParams)
    }
}

fn serde_urlencoded_from_str<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let pairs: Vec<(String, String)> = url_pairs(query);
    let mut object = serde_json::Map::new();
    for (key, value) in pairs {
        let json = match value.parse::<u64>() {
            Ok(number) => serde_json::Value::from(number),
            Err(_) => serde_json::Value::String(value),
        };
        // A repeated parameter is refused rather than letting one value silently win.
        if object.contains_key(&key) {
            return Err(ApiError::invalid(
                &key,
                format!("query parameter '{key}' is given more than once; give it once"),
            ));
        }
        object.insert(key, json);
    }
    serde_path_to_error::deserialize(serde_json::Value::Object(object)).map_err(|error| {
        let parameter = error.path().to_string();
        let inner = error.into_inner();
        // The path is `.` when no single value failed, as for an unknown parameter, whose
        // name serde puts in the message between backticks.
        if parameter == "." {
            let message = inner.to_string();
            let unknown = message
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split_once('`'))
                .map(|(name, _)| name.to_owned());
            let error = ApiError::new(
                ErrorCode::InvalidValue,
                format!("invalid query parameters: {message}"),
            );
            match unknown {
                Some(name) => error.with_details(serde_json::json!({ "field": name })),
                None => error,
            }
        } else {
            ApiError::invalid(
                &parameter,
                format!("invalid query parameter '{parameter}': {inner}"),
            )
        }
    })
}

fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        index += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::internal("caller missing: authentication middleware not applied")
        })
    }
}

/// Parses a validated name from a path segment, as `invalid_value` on failure.
pub fn name<T>(
    field: &str,
    value: &str,
    parse: impl FnOnce(String) -> Result<T, kiln_core::NameError>,
) -> Result<T, ApiError> {
    parse(value.to_owned()).map_err(|error| ApiError::invalid(field, error.to_string()))
}
