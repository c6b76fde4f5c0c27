//! The checked-in OpenAPI document matches the one the server generates and serves.

use crate::harness::TestServer;

fn checked_in_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json")
}

#[tokio::test]
async fn openapi_document_has_not_drifted() {
    let generated = kiln_control::api::openapi::document();
    let text = serde_json::to_string_pretty(&generated).unwrap() + "\n";
    let path = checked_in_path();
    if std::env::var_os("KILN_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == text,
        "docs/openapi.json is out of date; regenerate it with \
         KILN_UPDATE_OPENAPI=1 cargo test -p kiln-control --test integration openapi"
    );

    let server = TestServer::start().await;
    let (status, served) = server
        .raw("GET", kiln_api::routes::OPENAPI, None, None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(served, generated);
}

#[test]
fn every_route_is_in_the_document() {
    let document = kiln_control::api::openapi::document();
    for route in kiln_api::routes::ROUTES {
        let operation = &document["paths"][route.path][route.method.to_lowercase()];
        assert_eq!(operation["operationId"], route.operation, "{route:?}");
    }
}

/// Collects every `$ref` in `value`.
fn references<'a>(value: &'a serde_json::Value, found: &mut Vec<&'a str>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, child) in map {
                match (key.as_str(), child) {
                    ("$ref", serde_json::Value::String(target)) => found.push(target),
                    _ => references(child, found),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|item| references(item, found)),
        _ => {}
    }
}

#[test]
fn every_schema_reference_resolves_to_a_generated_schema() {
    let document = kiln_control::api::openapi::document();
    let mut found = Vec::new();
    references(&document, &mut found);
    assert!(found.len() > 100, "only {} references", found.len());
    let components = &document["components"]["schemas"];
    for target in found {
        let name = target
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("reference {target} points outside components.schemas"));
        let schema = &components[name];
        assert!(schema.is_object(), "reference {target} has no schema");
        assert!(
            !schema["description"]
                .as_str()
                .unwrap_or_default()
                .contains("not yet in kiln_api::schema's list"),
            "{name} is a placeholder; list it in crates/kiln-api/src/schema.rs"
        );
    }

    // Spot checks that the schemas carry the types' real fields.
    let create_env = &components["CreateEnv"];
    assert_eq!(create_env["additionalProperties"], false, "{create_env}");
    assert_eq!(
        create_env["properties"]["name"]["$ref"],
        "#/components/schemas/EnvName"
    );
    let codes = serde_json::to_string(&components["ErrorCode"]).unwrap();
    for code in kiln_api::ErrorCode::ALL {
        assert!(
            codes.contains(&format!("\"{}\"", code.as_str())),
            "{code} missing from {codes}"
        );
    }
}
