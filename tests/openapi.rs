//! The served OpenAPI document covers the contract: every endpoint with
//! its method, the request bodies (closed to unknown fields), the error
//! body on every error status, and the security schemes. (The conformance
//! of real answers to it is what `tests/schemathesis.sh` checks.)

mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_covers_every_endpoint_of_the_contract() {
    let server = TestServer::start().await;
    let (status, doc) = server
        .call(Method::GET, "/api/v1/openapi.json", "", None)
        .await;
    assert_eq!(status, StatusCode::OK, "served without a key");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let contract = [
        ("post", "/api/v1/sessions"),
        ("get", "/api/v1/sessions"),
        ("get", "/api/v1/sessions/active"),
        ("get", "/api/v1/sessions/metrics"),
        ("get", "/api/v1/sessions/{session_id}"),
        ("patch", "/api/v1/sessions/{session_id}"),
        ("delete", "/api/v1/sessions/{session_id}"),
        ("post", "/api/v1/sessions/{session_id}/activity"),
        ("post", "/api/v1/sessions/{session_id}/refresh"),
        ("post", "/api/v1/sessions/{session_id}/validate"),
        ("post", "/api/v1/sessions/{session_id}/tools/execute"),
        ("get", "/api/v1/sessions/{session_id}/tools/executions"),
        ("get", "/api/v1/sessions/{session_id}/metrics"),
        ("get", "/api/v1/sessions/{session_id}/passthrough-auth"),
        ("post", "/api/v1/executions"),
        ("post", "/admin/sessions/cleanup"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/api/v1/openapi.json"),
    ];
    for (method, path) in contract {
        let operation = &doc["paths"][path][method];
        assert!(operation.is_object(), "{method} {path} is missing");
        for (code, response) in operation["responses"].as_object().unwrap() {
            if code.starts_with('4') || (code.starts_with('5') && path.starts_with("/api")) {
                let schema = &response["content"]["application/json"]["schema"]["$ref"];
                assert_eq!(
                    schema, "#/components/schemas/ErrorResponse",
                    "{method} {path} {code}"
                );
            }
        }
    }
    // Bodies are closed: an unknown field is a documented 400.
    let schemas = &doc["components"]["schemas"];
    for body in [
        "CreateBody",
        "UpdateBody",
        "ExecuteBody",
        "RecordBody",
        "RefreshBody",
        "TerminateBody",
    ] {
        assert_eq!(
            schemas[body]["additionalProperties"],
            Value::Bool(false),
            "{body}"
        );
    }
    for (code, path, method) in [
        ("409", "/api/v1/sessions", "post"),
        ("429", "/api/v1/sessions", "post"),
        ("412", "/api/v1/sessions/{session_id}", "patch"),
        ("410", "/api/v1/sessions/{session_id}/tools/execute", "post"),
        (
            "403",
            "/api/v1/sessions/{session_id}/passthrough-auth",
            "get",
        ),
        ("413", "/api/v1/executions", "post"),
        ("415", "/api/v1/executions", "post"),
    ] {
        assert!(
            doc["paths"][path][method]["responses"][code].is_object(),
            "{method} {path} {code}"
        );
    }
    let security = &doc["components"]["securitySchemes"];
    assert_eq!(security["api_key"]["name"], "X-API-Key");
    assert_eq!(security["admin_key"]["name"], "X-Admin-Key");
    assert_eq!(security["session_token"]["scheme"], "bearer");
    // The created session documents its tokens.
    let created = serde_json::to_string(&schemas["CreatedSession"]).unwrap();
    assert!(created.contains("session_token") && created.contains("refresh_token"));
    server.stop().await;
}
