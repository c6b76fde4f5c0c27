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
