//! The OpenAPI 3.1 document, generated from [`kiln_api::routes::ROUTES`] so it cannot list an
//! endpoint the server does not mount. A copy is checked in at `docs/openapi.json`, and a test
//! fails when the two drift.
//!
//! Schemas are named after the kiln-api types (`CreateApp`, `List<Org>`, ...) and described
//! as objects whose fields are documented in the kiln-api crate and `docs/api.md`.

use std::collections::BTreeSet;

use axum::Json;
use kiln_api::routes::{Access, ROUTES};
use kiln_api::{ErrorCode, routes};
use serde_json::{Value, json};

/// `GET /v1/openapi.json`.
pub async fn get_openapi() -> Json<Value> {
    Json(document())
}

/// Builds the OpenAPI document.
pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    let mut schemas = BTreeSet::new();

    for route in ROUTES {
        let mut operation = serde_json::Map::new();
        operation.insert("operationId".into(), json!(route.operation));
        operation.insert("summary".into(), json!(route.summary));
        operation.insert("x-kiln-access".into(), json!(access_name(route.access)));

        let mut parameters: Vec<Value> = path_parameters(route.path)
            .into_iter()
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if route.method != "GET" {
            parameters.push(json!({
                "name": "Idempotency-Key", "in": "header", "required": false,
                "description": "Repeating a call with the same key returns the first response.",
                "schema": {"type": "string", "maxLength": 255}
            }));
        }
        if let Some(query) = route.query {
            schemas.insert(query.to_owned());
            parameters.push(json!({
                "name": "query", "in": "query", "style": "form", "explode": true,
                "schema": {"$ref": schema_ref(query)}
            }));
        }
        operation.insert("parameters".into(), Value::Array(parameters));

        if let Some(request) = route.request {
            schemas.insert(request.to_owned());
            operation.insert(
                "requestBody".into(),
                json!({"required": true, "content": {"application/json": {"schema": {"$ref": schema_ref(request)}}}}),
            );
        }

        let mut responses = serde_json::Map::new();
        let success = match route.response {
            Some(response) => {
                schemas.insert(response.to_owned());
                json!({"description": "Success", "content": {"application/json": {"schema": {"$ref": schema_ref(response)}}}})
            }
            None => json!({"description": "Success, no content"}),
        };
        responses.insert(route.status.to_string(), success);
        responses.insert(
            "default".into(),
            json!({"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}),
        );
        operation.insert("responses".into(), Value::Object(responses));
        if route.access != Access::Public {
            operation.insert("security".into(), json!([{"bearer": []}]));
        }

        let entry = paths
            .entry(route.path.to_owned())
            .or_insert_with(|| json!({}));
        if let Value::Object(methods) = entry {
            methods.insert(route.method.to_lowercase(), Value::Object(operation));
        }
    }

    let mut components = serde_json::Map::new();
    for name in schemas {
        components.insert(
            name.clone(),
            json!({"type": "object", "description": format!("The kiln-api type {name}; fields are listed in docs/api.md.")}),
        );
    }
    let codes: Vec<&str> = ErrorCode::ALL.iter().map(|code| code.as_str()).collect();
    components.insert(
        "ErrorBody".into(),
        json!({
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "enum": codes},
                "message": {"type": "string"},
                "details": {}
            }
        }),
    );

    json!({
        "openapi": "3.1.0",
        "info": {"title": "Kiln control plane API", "version": "v1"},
        "servers": [{"url": "/"}],
        "paths": Value::Object(paths),
        "components": {
            "schemas": Value::Object(components),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
        },
        "x-kiln-openapi-path": routes::OPENAPI
    })
}

fn schema_ref(name: &str) -> String {
    format!("#/components/schemas/{name}")
}

fn path_parameters(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|segment| {
            segment
                .strip_prefix('{')
                .and_then(|rest| rest.strip_suffix('}'))
        })
        .collect()
}

fn access_name(access: Access) -> &'static str {
    match access {
        Access::Public => "public",
        Access::AnyToken => "any_token",
        Access::Org => "org",
        Access::Operator => "operator",
        Access::OperatorOrOrg => "operator_or_org",
        Access::Host => "host",
        Access::Ingress => "ingress",
    }
}
