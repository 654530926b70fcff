//! The REST API through the real HTTP port: lifecycle, tenant isolation,
//! the tenant limit, bad input, concurrency, paging.

mod common;

use common::*;
use futures::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn create_body(id: &str) -> Value {
    json!({"session_id": id, "edge_mcp_id": "edge-1", "client_name": "Claude Code", "client_type": "claude-code", "client_version": "1.0.0"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_create_activity_tools_metrics_terminate() {
    let server = TestServer::start().await;
    let (status, created) = server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(create_body("life-1")),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["session_id"], "life-1");
    assert_eq!(created["tenant_id"], TENANT_A);
    assert_eq!(created["status"], "active");
    assert_eq!(created["version"], 1);
    assert_eq!(created["connection_metadata"], json!({}));
    assert_eq!(created["passthrough_providers"], json!([]));
    assert_eq!(created["idle_timeout_seconds"], 1800);
    assert_eq!(created["ttl_seconds"], 86400);

    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/sessions/life-1/activity",
            KEY_A,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    for (tool, duration, error) in [
        ("grep", 10, Value::Null),
        ("grep", 30, json!("boom")),
        ("read", 5, Value::Null),
    ] {
        let body = json!({"tool_name": tool, "duration_ms": duration, "tokens_used": 7, "error": error, "arguments": {"q": "x"}, "result": {"ok": true}});
        let (status, body) = server
            .call(
                Method::POST,
                "/api/v1/sessions/life-1/tools/execute",
                KEY_A,
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }

    let (status, session) = server
        .call(Method::GET, "/api/v1/sessions/life-1", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(session["tool_execution_count"], 3);
    assert_eq!(session["tool_error_count"], 1);
    assert_eq!(session["total_tokens_used"], 21);
    assert_eq!(session["version"], 4, "one bump per execution");

    let (status, metrics) = server
        .call(Method::GET, "/api/v1/sessions/life-1/metrics", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(metrics["tool_execution_count"], 3);
    let grep = &metrics["tools"]["grep"];
    assert_eq!(
        (
            grep["count"].as_u64(),
            grep["errors"].as_u64(),
            grep["tokens"].as_u64()
        ),
        (Some(2), Some(1), Some(14))
    );
    assert_eq!(grep["mean_ms"], 20.0);
    assert_eq!(grep["max_ms"], 30);
    assert_eq!(grep["p50_ms"], 10);
    assert_eq!(metrics["tools"]["read"]["count"], 1);

    let (status, list) = server
        .call(
            Method::GET,
            "/api/v1/sessions/life-1/tools/executions?limit=2",
            KEY_A,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["count"], 2);
    assert_eq!(list["executions"][0]["tool_name"], "read", "newest first");
    assert_eq!(list["executions"][1]["error"], "boom");
    assert_eq!(list["executions"][1]["arguments"], json!({"q": "x"}));

    let (status, _) = server
        .call(
            Method::DELETE,
            "/api/v1/sessions/life-1",
            KEY_A,
            Some(json!({"reason": "user closed the editor"})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = server
        .call(Method::DELETE, "/api/v1/sessions/life-1", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "repeating DELETE is 204");

    let (status, ended) = server
        .call(Method::GET, "/api/v1/sessions/life-1", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::OK, "final sessions stay readable");
    assert_eq!(ended["status"], "terminated");
    assert_eq!(ended["termination_reason"], "user closed the editor");
    assert_eq!(ended["tool_execution_count"], 3);
    assert_eq!(ended["version"], 5);
    assert!(ended["terminated_at"].is_string());

    for (method, path, code) in [
        (
            Method::POST,
            "/api/v1/sessions/life-1/activity",
            "session_terminated",
        ),
        (
            Method::POST,
            "/api/v1/sessions/life-1/refresh",
            "session_terminated",
        ),
        (
            Method::POST,
            "/api/v1/sessions/life-1/validate",
            "session_terminated",
        ),
    ] {
        let (status, body) = server.call(method, path, KEY_A, None).await;
        assert_eq!(status, StatusCode::GONE, "{path}");
        assert_eq!(body["code"], code);
    }
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/sessions/life-1/tools/execute",
            KEY_A,
            Some(json!({"tool_name": "x"})),
        )
        .await;
    assert_eq!(status, StatusCode::GONE);
    let (status, _) = server
        .call(
            Method::PATCH,
            "/api/v1/sessions/life-1",
            KEY_A,
            Some(json!({"initialized": true})),
        )
        .await;
    assert_eq!(status, StatusCode::GONE);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_refresh_validate_and_versions() {
    let server = TestServer::start().await;
    server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(create_body("p-1")),
        )
        .await;

    let response = server
        .client
        .patch(format!("{}/api/v1/sessions/p-1", server.base))
        .header("X-API-Key", KEY_A)
        .header("If-Match", "\"1\"")
        .json(&json!({"initialized": true, "connection_metadata": {"workspace": "/src"}, "client_version": "1.1.0"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["etag"], "\"2\"");
    let patched: Value = response.json().await.unwrap();
    assert_eq!(patched["initialized"], true);
    assert_eq!(patched["client_version"], "1.1.0");
    assert_eq!(patched["connection_metadata"], json!({"workspace": "/src"}));

    let response = server
        .client
        .patch(format!("{}/api/v1/sessions/p-1", server.base))
        .header("X-API-Key", KEY_A)
        .header("If-Match", "\"1\"")
        .json(&json!({"initialized": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PRECONDITION_FAILED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "version_mismatch");
    let (_, now) = server
        .call(Method::GET, "/api/v1/sessions/p-1", KEY_A, None)
        .await;
    assert_eq!(
        now["initialized"], true,
        "a failed precondition changes nothing"
    );

    let (status, refreshed) = server
        .call(Method::POST, "/api/v1/sessions/p-1/refresh", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(refreshed["version"], 3);

    let (status, valid) = server
        .call(Method::POST, "/api/v1/sessions/p-1/validate", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(valid["valid"], true);
    assert_eq!(valid["session"]["session_id"], "p-1");
    assert_eq!(valid["session"]["version"], 3, "validate is not a change");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_tenants_sessions_answer_exactly_like_unknown_ones() {
    let server = TestServer::start().await;
    server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(create_body("mine")),
        )
        .await;
    let calls: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, "/api/v1/sessions/{id}".into(), None),
        (
            Method::PATCH,
            "/api/v1/sessions/{id}".into(),
            Some(json!({"initialized": true})),
        ),
        (Method::DELETE, "/api/v1/sessions/{id}".into(), None),
        (Method::POST, "/api/v1/sessions/{id}/activity".into(), None),
        (Method::POST, "/api/v1/sessions/{id}/refresh".into(), None),
        (Method::POST, "/api/v1/sessions/{id}/validate".into(), None),
        (
            Method::POST,
            "/api/v1/sessions/{id}/tools/execute".into(),
            Some(json!({"tool_name": "t"})),
        ),
        (
            Method::GET,
            "/api/v1/sessions/{id}/tools/executions".into(),
            None,
        ),
        (Method::GET, "/api/v1/sessions/{id}/metrics".into(), None),
    ];
    for (method, path, body) in calls {
        let (theirs_status, theirs) = server
            .call(
                method.clone(),
                &path.replace("{id}", "mine"),
                KEY_B,
                body.clone(),
            )
            .await;
        let (unknown_status, unknown) = server
            .call(method.clone(), &path.replace("{id}", "nope"), KEY_B, body)
            .await;
        assert_eq!(theirs_status, StatusCode::NOT_FOUND, "{method} {path}");
        assert_eq!(theirs_status, unknown_status, "{method} {path}");
        assert_eq!(theirs["code"], "session_not_found");
        assert_eq!(theirs["code"], unknown["code"]);
        assert_eq!(theirs["error"], unknown["error"]);
    }
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/executions",
            KEY_B,
            Some(json!({"session_id": "mine", "tool_name": "t"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (_, list) = server
        .call(Method::GET, "/api/v1/sessions", KEY_B, None)
        .await;
    assert_eq!(list["count"], 0);
    let (_, metrics) = server
        .call(Method::GET, "/api/v1/sessions/metrics", KEY_B, None)
        .await;
    assert_eq!(metrics["total_sessions"], 0);

    // Ids are scoped per tenant: B may use the same id.
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_B,
            Some(create_body("mine")),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(create_body("mine")),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "session_exists");

    // A's session is untouched by everything B did.
    let (_, mine) = server
        .call(Method::GET, "/api/v1/sessions/mine", KEY_A, None)
        .await;
    assert_eq!(
        (mine["status"].as_str(), mine["version"].as_u64()),
        (Some("active"), Some(1))
    );
    assert_eq!(mine["tool_execution_count"], 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_id_admit_exactly_one() {
    // A limit of five: a refused create that kept its slot would make a
    // later round answer 429.
    let server = TestServer::start_with(5, "").await;
    for round in 0..5 {
        let id = format!("race-{round}");
        let creates = (0..20).map(|_| {
            let body = json!({"session_id": id, "edge_mcp_id": "edge"});
            server.call(Method::POST, "/api/v1/sessions", KEY_A, Some(body))
        });
        let results = join_all(creates).await;
        let statuses: Vec<StatusCode> = results.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            statuses
                .iter()
                .filter(|s| **s == StatusCode::CREATED)
                .count(),
            1,
            "{statuses:?}"
        );
        assert!(
            results
                .iter()
                .filter(|(s, _)| *s != StatusCode::CREATED)
                .all(|(s, b)| *s == StatusCode::CONFLICT && b["code"] == "session_exists"),
            "round {round}: {results:?}"
        );
    }
    // The refused ones left no slot taken: the count is exactly the five.
    let (_, metrics) = server
        .call(Method::GET, "/api/v1/sessions/metrics", KEY_A, None)
        .await;
    assert_eq!(metrics["active_sessions"], 5, "{metrics}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_limit_is_never_over_admitted() {
    let server = TestServer::start_with(50, "").await;
    let creates = (0..150).map(|i| {
        let body = json!({"session_id": format!("lim-{i}"), "edge_mcp_id": "edge"});
        server.call(Method::POST, "/api/v1/sessions", KEY_A, Some(body))
    });
    let results = join_all(creates).await;
    let created = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    let limited: Vec<_> = results
        .iter()
        .filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(created, 50);
    assert_eq!(limited.len(), 100);
    assert!(limited
        .iter()
        .all(|(_, b)| b["code"] == "tenant_session_limit"));
    let (_, list) = server
        .call(Method::GET, "/api/v1/sessions?limit=1000", KEY_A, None)
        .await;
    assert_eq!(list["count"], 50, "refused creates left nothing behind");

    let first = results
        .iter()
        .find(|(s, _)| *s == StatusCode::CREATED)
        .unwrap()
        .1["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = server
        .call(
            Method::DELETE,
            &format!("/api/v1/sessions/{first}"),
            KEY_A,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(json!({"edge_mcp_id": "edge"})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "a terminated session frees its slot"
    );
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(json!({"edge_mcp_id": "edge"})),
        )
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Another tenant is not affected.
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_B,
            Some(json!({"edge_mcp_id": "edge"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_tool_executions_on_one_session_count_exactly() {
    let server = TestServer::start().await;
    server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(create_body("busy")),
        )
        .await;
    let calls = (0..1000).map(|i| {
        let body = json!({"tool_name": format!("tool-{}", i % 4), "duration_ms": i % 50, "tokens_used": 1});
        server.call(Method::POST, "/api/v1/sessions/busy/tools/execute", KEY_A, Some(body))
    });
    let results = join_all(calls).await;
    assert!(results.iter().all(|(s, _)| *s == StatusCode::NO_CONTENT));
    let (_, session) = server
        .call(Method::GET, "/api/v1/sessions/busy", KEY_A, None)
        .await;
    assert_eq!(session["tool_execution_count"], 1000);
    assert_eq!(session["total_tokens_used"], 1000);
    assert_eq!(session["version"], 1001);
    let (_, metrics) = server
        .call(Method::GET, "/api/v1/sessions/busy/metrics", KEY_A, None)
        .await;
    let per_tool: u64 = metrics["tools"]
        .as_object()
        .unwrap()
        .values()
        .map(|t| t["count"].as_u64().unwrap())
        .sum();
    assert_eq!(per_tool, 1000);
    let (_, list) = server
        .call(
            Method::GET,
            "/api/v1/sessions/busy/tools/executions?limit=1000",
            KEY_A,
            None,
        )
        .await;
    assert_eq!(list["count"], 1000, "every execution was stored");
    server.stop().await;
}

/// method, path, content type, body, expected status, expected code
type BadCase<'a> = (
    Method,
    &'a str,
    Option<&'a str>,
    Vec<u8>,
    StatusCode,
    &'a str,
);

async fn raw(
    server: &TestServer,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value, bool) {
    let mut request = server
        .client
        .request(method, format!("{}{path}", server.base))
        .header("X-API-Key", KEY_A);
    if let Some(ct) = content_type {
        request = request.header("Content-Type", ct);
    }
    let response = request.body(body).send().await.unwrap();
    let has_request_id = response.headers().contains_key("x-request-id");
    let status = response.status();
    (
        status,
        response.json().await.unwrap_or(Value::Null),
        has_request_id,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_4xx_and_changes_nothing() {
    let server = TestServer::start().await;
    server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(create_body("steady")),
        )
        .await;
    let json_ct = Some("application/json");
    let long = "x".repeat(256);
    let big_metadata =
        json!({"edge_mcp_id": "e", "metadata": {"blob": "y".repeat(17 * 1024)}}).to_string();
    let cases: Vec<BadCase> = vec![
        (
            Method::POST,
            "/api/v1/sessions",
            json_ct,
            b"{\"edge_mcp_id\":".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            json_ct,
            b"[1,2]".to_vec(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            json_ct,
            b"{\"edge_mcp_id\":\"e\",\"colour\":1}".to_vec(),
            StatusCode::BAD_REQUEST,
            "unknown_field",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            Some("text/plain"),
            b"{\"edge_mcp_id\":\"e\"}".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            None,
            b"{\"edge_mcp_id\":\"e\"}".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            json_ct,
            vec![b' '; 65 * 1024],
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            json_ct,
            b"{}".to_vec(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            json_ct,
            json!({"edge_mcp_id": long}).to_string().into_bytes(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            json_ct,
            json!({"edge_mcp_id": "e", "session_id": "bad id"})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            json_ct,
            json!({"edge_mcp_id": "e", "session_id": ""})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            json_ct,
            json!({"edge_mcp_id": "e", "session_id": "active"})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            json_ct,
            json!({"edge_mcp_id": "e", "metadata": [1]})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            json_ct,
            json!({"edge_mcp_id": "e", "metadata": "text"})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            json_ct,
            big_metadata.into_bytes(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            json_ct,
            json!({"edge_mcp_id": "e", "ttl": -1})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            json_ct,
            json!({"edge_mcp_id": "e", "ttl": 86401})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            json_ct,
            json!({"edge_mcp_id": "e", "idle_timeout": "soon"})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            json_ct,
            json!({"edge_mcp_id": "e", "client_type": "emacs"})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/sessions",
            json_ct,
            json!({"edge_mcp_id": "e", "user_id": "not-a-uuid"})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::GET,
            "/api/v1/sessions/bad%20id",
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::GET,
            "/api/v1/sessions?limit=0",
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::GET,
            "/api/v1/sessions?limit=1001",
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::GET,
            "/api/v1/sessions?status=sleeping",
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::GET,
            "/api/v1/sessions?cursor=garbage",
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::GET,
            "/api/v1/sessions/metrics?since=yesterday",
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::GET,
            "/api/v1/sessions/steady/tools/executions?limit=5000",
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::PATCH,
            "/api/v1/sessions/steady",
            json_ct,
            b"{\"initialized\":\"yes\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::PATCH,
            "/api/v1/sessions/steady",
            json_ct,
            b"{\"status\":\"terminated\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "unknown_field",
        ),
        (
            Method::PATCH,
            "/api/v1/sessions/steady",
            json_ct,
            b"{\"connection_metadata\":5}".to_vec(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::PATCH,
            "/api/v1/sessions/steady",
            json_ct,
            json!({"client_name": long}).to_string().into_bytes(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::DELETE,
            "/api/v1/sessions/steady",
            json_ct,
            b"{\"reason\":".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            Method::DELETE,
            "/api/v1/sessions/steady",
            json_ct,
            b"{\"why\":\"x\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "unknown_field",
        ),
        (
            Method::POST,
            "/api/v1/sessions/steady/tools/execute",
            json_ct,
            b"{}".to_vec(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/sessions/steady/tools/execute",
            json_ct,
            b"{\"tool_name\":\"\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/sessions/steady/tools/execute",
            json_ct,
            b"{\"tool_name\":\"t\",\"duration_ms\":-4}".to_vec(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/sessions/steady/tools/execute",
            json_ct,
            b"{\"tool_name\":\"t\",\"executed_at\":\"noon\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/sessions/steady/tools/execute",
            json_ct,
            b"{\"tool_name\":\"t\",\"extra\":1}".to_vec(),
            StatusCode::BAD_REQUEST,
            "unknown_field",
        ),
        (
            Method::POST,
            "/api/v1/executions",
            json_ct,
            b"{\"session_id\":\"steady\",\"tool_name\":\"t\",\"timestamp\":true}".to_vec(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/executions",
            json_ct,
            b"{\"session_id\":\"bad id\",\"tool_name\":\"t\"}".to_vec(),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
    ];
    for (method, path, ct, body, status, code) in cases {
        let (got, body, has_id) = raw(&server, method.clone(), path, ct, body).await;
        assert_eq!(got, status, "{method} {path}: {body}");
        assert_eq!(body["code"], code, "{method} {path}: {body}");
        assert!(
            body["request_id"].is_string() && body["error"].is_string(),
            "{body}"
        );
        assert!(has_id);
    }
    let (_, list) = server
        .call(Method::GET, "/api/v1/sessions", KEY_A, None)
        .await;
    assert_eq!(list["count"], 1, "no bad create made a session");
    let (_, steady) = server
        .call(Method::GET, "/api/v1/sessions/steady", KEY_A, None)
        .await;
    assert_eq!(steady["status"], "active");
    assert_eq!(steady["version"], 1, "no bad call changed the session");
    assert_eq!(steady["tool_execution_count"], 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_and_request_ids() {
    let server = TestServer::start().await;
    for key in ["", "wrong", ADMIN_KEY] {
        let (status, body) = server
            .call(Method::GET, "/api/v1/sessions", key, None)
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "key {key:?}");
        assert_eq!(body["code"], "unauthorized");
    }
    for key in ["", KEY_A] {
        let (status, body) = server
            .call(Method::POST, "/admin/sessions/cleanup", key, None)
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["code"], "unauthorized");
    }
    let response = server
        .client
        .get(format!("{}/api/v1/sessions", server.base))
        .header("Authorization", format!("Bearer {KEY_A}"))
        .header("X-Request-Id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "Bearer API keys are accepted"
    );
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");
    let response = server
        .client
        .get(format!("{}/api/v1/sessions/nope", server.base))
        .header("X-API-Key", KEY_A)
        .header("X-Trace-ID", "from-trace-header")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "from-trace-header");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["request_id"], "from-trace-header");
    let response = server
        .client
        .get(format!("{}/healthz", server.base))
        .send()
        .await
        .unwrap();
    assert!(
        response.headers()["x-request-id"].to_str().unwrap().len() >= 32,
        "generated when absent"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_filter_and_page_newest_first() {
    let server = TestServer::start().await;
    for i in 0..7 {
        let kind = if i % 2 == 0 { "cursor" } else { "agent" };
        let body = json!({"session_id": format!("l-{i}"), "edge_mcp_id": format!("edge-{}", i % 3), "client_type": kind});
        let (status, _) = server
            .call(Method::POST, "/api/v1/sessions", KEY_A, Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED);
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    server
        .call(Method::DELETE, "/api/v1/sessions/l-6", KEY_A, None)
        .await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "/api/v1/sessions?limit=3".to_owned(),
            Some(c) => format!("/api/v1/sessions?limit=3&cursor={c}"),
        };
        let (status, page) = server.call(Method::GET, &path, KEY_A, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            page["count"].as_u64().unwrap() as usize,
            page["sessions"].as_array().unwrap().len()
        );
        seen.extend(
            page["sessions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["session_id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..7).rev().map(|i| format!("l-{i}")).collect();
    assert_eq!(seen, expected, "every session once, newest first");

    let (_, page) = server
        .call(
            Method::GET,
            "/api/v1/sessions?limit=2&offset=2",
            KEY_A,
            None,
        )
        .await;
    let ids: Vec<&str> = page["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["l-4", "l-3"]);

    let (_, page) = server
        .call(Method::GET, "/api/v1/sessions?client_type=ide", KEY_A, None)
        .await;
    assert_eq!(page["count"], 4, "cursor was normalised to ide");
    let (_, page) = server
        .call(
            Method::GET,
            "/api/v1/sessions?edge_mcp_id=edge-0",
            KEY_A,
            None,
        )
        .await;
    assert_eq!(page["count"], 3);
    let (_, page) = server
        .call(
            Method::GET,
            "/api/v1/sessions?status=terminated",
            KEY_A,
            None,
        )
        .await;
    assert_eq!(page["count"], 1);
    let (_, page) = server
        .call(Method::GET, "/api/v1/sessions/active", KEY_A, None)
        .await;
    assert_eq!(page["count"], 6);
    assert!(page["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["status"] == "active"));

    let (status, metrics) = server
        .call(Method::GET, "/api/v1/sessions/metrics", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(metrics["active_sessions"], 6);
    assert_eq!(metrics["idle_sessions"], 0);
    assert_eq!(metrics["total_sessions"], 7);
    let (_, metrics) = server
        .call(
            Method::GET,
            "/api/v1/sessions/metrics?since=2999-01-01T00:00:00Z",
            KEY_A,
            None,
        )
        .await;
    assert_eq!(metrics["total_sessions"], 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_mcp_compatibility() {
    let server = TestServer::start().await;
    let body = json!({"edge_mcp_id": "e", "client_type": "", "tenant_id": "ignored", "passthrough_auth": {"credentials": {"github": {"type": "bearer", "token": "ghp_secret"}}}});
    let (status, created) = server
        .call(Method::POST, "/api/v1/sessions", KEY_A, Some(body))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["client_type"], "cli");
    assert_eq!(created["tenant_id"], TENANT_A);
    assert_eq!(created["has_passthrough_auth"], true);
    assert_eq!(created["passthrough_providers"], json!(["github"]));
    assert!(
        !created.to_string().contains("ghp_secret"),
        "credentials are never returned"
    );
    let id = created["session_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("ses_") && id.len() == 47);

    for timestamp in [
        json!(1_700_000_000),
        json!("2026-11-23T22:18:06.123Z"),
        json!(1_700_000_000.5),
    ] {
        let body = json!({"session_id": id, "tool_name": "search", "arguments": null, "result": {"hits": 3}, "timestamp": timestamp, "tenant_id": ""});
        let (status, body) = server
            .call(Method::POST, "/api/v1/executions", KEY_A, Some(body))
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    let (_, list) = server
        .call(
            Method::GET,
            &format!("/api/v1/sessions/{id}/tools/executions"),
            KEY_A,
            None,
        )
        .await;
    assert_eq!(list["count"], 3);
    assert_eq!(
        list["executions"][2]["executed_at"],
        "2023-11-14T22:13:20.000Z"
    );

    let response = server
        .client
        .delete(format!("{}/api/v1/sessions/{id}", server.base))
        .header("X-API-Key", KEY_A)
        .header("Content-Type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::NO_CONTENT,
        "body-less DELETE with a JSON content type"
    );
    let (_, ended) = server
        .call(Method::GET, &format!("/api/v1/sessions/{id}"), KEY_A, None)
        .await;
    assert_eq!(ended["termination_reason"], "client_request");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_durability_answers_from_memory_and_reads_see_every_change() {
    let server =
        TestServer::start_with_storage(1000, "durability = \"async\"\nflush_interval_ms = 200", "")
            .await;
    for i in 0..20 {
        let (status, _) = server
            .call(
                Method::POST,
                "/api/v1/sessions",
                KEY_A,
                Some(create_body(&format!("a-{i}"))),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
        let body = json!({"tool_name": "t", "tokens_used": 3});
        let (status, _) = server
            .call(
                Method::POST,
                &format!("/api/v1/sessions/a-{i}/tools/execute"),
                KEY_A,
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    // Lists and executions come from the store: they wait for the queue.
    let (_, list) = server
        .call(Method::GET, "/api/v1/sessions?limit=100", KEY_A, None)
        .await;
    assert_eq!(list["count"], 20);
    let (_, executions) = server
        .call(
            Method::GET,
            "/api/v1/sessions/a-7/tools/executions",
            KEY_A,
            None,
        )
        .await;
    assert_eq!(executions["count"], 1);
    let (_, metrics) = server
        .call(Method::GET, "/api/v1/sessions/metrics", KEY_A, None)
        .await;
    assert_eq!(
        (
            metrics["total_sessions"].as_u64(),
            metrics["total_tokens_used"].as_u64()
        ),
        (Some(20), Some(60))
    );
    server.stop().await;
}
