//! Security through the real HTTP port: session tokens (scope, rotation,
//! reuse revocation), the passthrough vault (scopes, no plaintext on disk or
//! in logs, master-key rotation with the real binary), keys and scopes, rate
//! limits, and hostile input.

mod common;

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const SECRET: &str = "ghp_SuperSecretValue1234567890";

fn create_body(id: &str) -> Value {
    json!({"session_id": id, "edge_mcp_id": "edge",
           "passthrough_auth": {"credentials": {"github": {"type": "bearer", "token": SECRET}}}})
}

/// Sends `method path` with `Authorization: Bearer token`.
async fn with_token(
    client: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = client
        .request(method, format!("{base}{path}"))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn create(server: &TestServer, id: &str) -> Value {
    let (status, body) = server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(create_body(id)),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_token_works_on_its_own_session_and_nowhere_else() {
    let server = TestServer::start().await;
    let (c, b) = (&server.client, server.base.as_str());
    let one = create(&server, "tok-1").await;
    create(&server, "tok-2").await;
    let token = one["session_token"].as_str().unwrap();
    let refresh = one["refresh_token"].as_str().unwrap();
    assert!(
        token.starts_with("est_") && token.len() >= 4 + 43,
        "{token}"
    );
    assert!(refresh.starts_with("ert_") && refresh.len() >= 4 + 43);
    // Shown once: reads never carry tokens or credentials.
    let (_, read) = server
        .call(Method::GET, "/api/v1/sessions/tok-1", KEY_A, None)
        .await;
    assert!(read.get("session_token").is_none() && read.get("refresh_token").is_none());
    assert!(!read.to_string().contains(SECRET));
    assert_eq!(read["passthrough_providers"], json!(["github"]));

    // Every (T) call on its own session.
    for (method, path, body, expected) in [
        (Method::GET, "/api/v1/sessions/tok-1", None, StatusCode::OK),
        (
            Method::PATCH,
            "/api/v1/sessions/tok-1",
            Some(json!({"initialized": true})),
            StatusCode::OK,
        ),
        (
            Method::POST,
            "/api/v1/sessions/tok-1/activity",
            None,
            StatusCode::NO_CONTENT,
        ),
        (
            Method::POST,
            "/api/v1/sessions/tok-1/validate",
            None,
            StatusCode::OK,
        ),
        (
            Method::POST,
            "/api/v1/sessions/tok-1/tools/execute",
            Some(json!({"tool_name": "t"})),
            StatusCode::NO_CONTENT,
        ),
        (
            Method::GET,
            "/api/v1/sessions/tok-1/tools/executions",
            None,
            StatusCode::OK,
        ),
        (
            Method::GET,
            "/api/v1/sessions/tok-1/metrics",
            None,
            StatusCode::OK,
        ),
        (
            Method::POST,
            "/api/v1/sessions/tok-1/refresh",
            None,
            StatusCode::OK,
        ),
    ] {
        let (status, body) = with_token(c, b, method.clone(), path, token, body).await;
        assert_eq!(status, expected, "{method} {path}: {body}");
    }
    // Another session of the same tenant, or none: the token does not
    // authenticate (401), whether the session exists or not.
    for id in ["tok-2", "no-such-session"] {
        let path = format!("/api/v1/sessions/{id}");
        let (status, body) = with_token(c, b, Method::GET, &path, token, None).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("unauthorized")),
            "{id}"
        );
        let (status, _) = with_token(c, b, Method::DELETE, &path, token, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{id}");
    }
    // Not a (T) endpoint: 401.
    for (method, path) in [
        (Method::GET, "/api/v1/sessions"),
        (Method::GET, "/api/v1/sessions/metrics"),
        (Method::POST, "/api/v1/executions"),
    ] {
        let (status, body) = with_token(
            c,
            b,
            method,
            path,
            token,
            Some(json!({"session_id": "tok-1", "tool_name": "t"})),
        )
        .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("unauthorized")),
            "{path}"
        );
    }
    let (status, _) = with_token(
        c,
        b,
        Method::POST,
        "/api/v1/sessions",
        token,
        Some(json!({"edge_mcp_id": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Tenant B with the same id: the token names tenant A, so B's session
    // is out of reach.
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_B,
            Some(json!({"session_id": "tok-1", "edge_mcp_id": "b"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, mine) = with_token(c, b, Method::GET, "/api/v1/sessions/tok-1", token, None).await;
    assert_eq!(mine["tenant_id"], TENANT_A);
    // A forged or garbled token.
    for bad in [
        "est_garbage",
        &format!("{token}x"),
        &token.replace("est_", "ert_"),
    ] {
        let (status, _) = with_token(c, b, Method::GET, "/api/v1/sessions/tok-1", bad, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{bad}");
    }
    // A final session's own token still authenticates it: reads work, live
    // calls answer 410.
    let (status, _) = with_token(c, b, Method::DELETE, "/api/v1/sessions/tok-1", token, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = with_token(c, b, Method::GET, "/api/v1/sessions/tok-1", token, None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("terminated"))
    );
    let (status, body) = with_token(
        c,
        b,
        Method::POST,
        "/api/v1/sessions/tok-1/activity",
        token,
        None,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::GONE, Some("session_terminated"))
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_rotates_both_tokens_and_a_reused_refresh_token_revokes() {
    let server = TestServer::start().await;
    let (c, b) = (&server.client, server.base.as_str());
    let created = create(&server, "rot-1").await;
    let (old_token, old_refresh) = (
        created["session_token"].as_str().unwrap().to_owned(),
        created["refresh_token"].as_str().unwrap().to_owned(),
    );
    // An unknown refresh token: 401, nothing changes.
    let (status, body) = server
        .call(
            Method::POST,
            "/api/v1/sessions/rot-1/refresh",
            KEY_A,
            Some(json!({"refresh_token": "ert_nope"})),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );

    let (status, rotated) = with_token(
        c,
        b,
        Method::POST,
        "/api/v1/sessions/rot-1/refresh",
        &old_token,
        Some(json!({"refresh_token": old_refresh})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_token = rotated["session_token"].as_str().unwrap();
    let new_refresh = rotated["refresh_token"].as_str().unwrap();
    assert_ne!(new_token, old_token);
    assert_ne!(new_refresh, old_refresh);
    // The old session token stopped working, the new one works.
    let (status, _) = with_token(
        c,
        b,
        Method::GET,
        "/api/v1/sessions/rot-1",
        &old_token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) =
        with_token(c, b, Method::GET, "/api/v1/sessions/rot-1", new_token, None).await;
    assert_eq!(status, StatusCode::OK);
    // A refresh without a token restarts the lifetime and rotates nothing.
    let (status, plain) = with_token(
        c,
        b,
        Method::POST,
        "/api/v1/sessions/rot-1/refresh",
        new_token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(plain.get("session_token").is_none());

    // The rotated-away refresh token comes back: the pair leaked.
    let (status, body) = server
        .call(
            Method::POST,
            "/api/v1/sessions/rot-1/refresh",
            KEY_A,
            Some(json!({"refresh_token": old_refresh})),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("refresh_token_reused"))
    );
    let (_, after) = server
        .call(Method::GET, "/api/v1/sessions/rot-1", KEY_A, None)
        .await;
    assert_eq!(after["status"], "terminated");
    assert_eq!(after["termination_reason"], "refresh_token_reuse");
    let (status, _) = with_token(
        c,
        b,
        Method::POST,
        "/api/v1/sessions/rot-1/activity",
        new_token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::GONE);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_read_only_with_passthrough_read() {
    let server = TestServer::start().await;
    let (c, b) = (&server.client, server.base.as_str());
    let created = create(&server, "pt-1").await;
    let token = created["session_token"].as_str().unwrap();
    server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(json!({"session_id": "pt-none", "edge_mcp_id": "e"})),
        )
        .await;
    let path = "/api/v1/sessions/pt-1/passthrough-auth";

    let (status, bundle) = server.call(Method::GET, path, KEY_A_READER, None).await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(
        bundle,
        json!({"credentials": {"github": {"type": "bearer", "token": SECRET}}})
    );
    let (status, _) = server.call(Method::GET, path, KEY_A_READ_ONLY, None).await;
    assert_eq!(status, StatusCode::OK, "passthrough:read alone suffices");

    let (status, body) = server.call(Method::GET, path, KEY_A, None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    let (status, _) = with_token(c, b, Method::GET, path, token, None).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a session token never reads credentials (not a (T) endpoint)"
    );
    let (status, _) = server.call(Method::GET, path, KEY_B, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = server.call(Method::GET, path, "no-such-key", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A read-only key cannot use the rest of the API.
    let (status, _) = server
        .call(Method::GET, "/api/v1/sessions/pt-1", KEY_A_READ_ONLY, None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = server
        .call(
            Method::GET,
            "/api/v1/sessions/pt-none/passthrough-auth",
            KEY_A_READER,
            None,
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("passthrough_auth_not_found"))
    );
    let (status, _) = server
        .call(
            Method::GET,
            "/api/v1/sessions/nobody/passthrough-auth",
            KEY_A_READER,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server
        .call(Method::DELETE, "/api/v1/sessions/pt-1", KEY_A, None)
        .await;
    let (status, body) = server.call(Method::GET, path, KEY_A_READER, None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::GONE, Some("session_terminated"))
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_checked_by_kind() {
    let server = TestServer::start().await;
    let (status, body) = server.call(Method::GET, "/api/v1/sessions", "", None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    // The admin key is not a tenant key, and the reverse.
    let response = server
        .client
        .get(format!("{}/api/v1/sessions", server.base))
        .header("X-Admin-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = server
        .client
        .get(format!("{}/api/v1/sessions", server.base))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = server
        .client
        .post(format!("{}/admin/sessions/cleanup", server.base))
        .header("X-Admin-Key", KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = server
        .client
        .post(format!("{}/admin/sessions/cleanup", server.base))
        .header("X-API-Key", KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let (status, _) = server
        .call(Method::POST, "/admin/sessions/cleanup", ADMIN_KEY, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_limit_gets_429_with_the_headers() {
    let server = TestServer::start_with(
        1000,
        "[rate_limits]\ncreate_per_second = 1\ncreate_burst = 3\nread_per_second = 0\n",
    )
    .await;
    let mut remaining = Vec::new();
    for i in 0..3 {
        let response = server
            .client
            .post(format!("{}/api/v1/sessions", server.base))
            .header("X-API-Key", KEY_A)
            .json(&json!({"edge_mcp_id": format!("rl-{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(response.headers()["ratelimit-limit"], "3");
        assert_eq!(response.headers()["ratelimit-reset"], "1");
        remaining.push(
            response.headers()["ratelimit-remaining"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    let response = server
        .client
        .post(format!("{}/api/v1/sessions", server.base))
        .header("X-API-Key", KEY_A)
        .json(&json!({"edge_mcp_id": "rl-over"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let headers = response.headers().clone();
    assert!(
        headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(headers["ratelimit-remaining"], "0");
    assert_eq!(headers["ratelimit-limit"], "3");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    assert!(body["request_id"].is_string());
    // Refused creates created nothing; reads (unlimited here) and another
    // key's bucket are unaffected.
    let (_, list) = server
        .call(Method::GET, "/api/v1/sessions", KEY_A, None)
        .await;
    assert_eq!(list["count"], 3);
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_A_READER,
            Some(json!({"edge_mcp_id": "other-key"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_a_4xx_and_changes_nothing() {
    let server = TestServer::start().await;
    create(&server, "h-1").await;
    let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
    let many_providers: serde_json::Map<String, Value> = (0..33)
        .map(|i| (format!("p{i}"), json!({"token": "x"})))
        .collect();
    let cases: Vec<(Method, &str, String, StatusCode, &str)> = vec![
        (Method::POST, "/api/v1/sessions", format!(r#"{{"edge_mcp_id":"e","metadata":{{"a":{deep}}}}}"#), StatusCode::BAD_REQUEST, "validation_failed"),
        (Method::POST, "/api/v1/sessions/h-1/tools/execute", format!(r#"{{"tool_name":"t","arguments":{deep}}}"#), StatusCode::BAD_REQUEST, "validation_failed"),
        (Method::POST, "/api/v1/sessions", json!({"edge_mcp_id": "e", "passthrough_auth": {"credentials": many_providers}}).to_string(), StatusCode::BAD_REQUEST, "validation_failed"),
        (Method::POST, "/api/v1/sessions", json!({"edge_mcp_id": "e", "passthrough_auth": {"credentials": {"p": {"token": "x".repeat(17_000)}}}}).to_string(), StatusCode::BAD_REQUEST, "validation_failed"),
        (Method::POST, "/api/v1/sessions", json!({"edge_mcp_id": "e", "passthrough_auth": {"credentials": {"": {}}}}).to_string(), StatusCode::BAD_REQUEST, "validation_failed"),
        (Method::POST, "/api/v1/sessions", json!({"edge_mcp_id": "e", "passthrough_auth": {"tokens": {}}}).to_string(), StatusCode::BAD_REQUEST, "unknown_field"),
        (Method::POST, "/api/v1/sessions/h-1/refresh", json!({"refresh_token": 5}).to_string(), StatusCode::BAD_REQUEST, "validation_failed"),
        (Method::POST, "/api/v1/sessions", "x".repeat(70_000), StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
    ];
    for (method, path, body, status, code) in cases {
        let response = server
            .client
            .request(method.clone(), format!("{}{path}", server.base))
            .header("X-API-Key", KEY_A)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let got = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (got, body["code"].as_str()),
            (status, Some(code)),
            "{method} {path}: {body}"
        );
    }
    // Oversized headers.
    let response = server
        .client
        .get(format!("{}/api/v1/sessions", server.base))
        .header("X-API-Key", KEY_A)
        .header("X-Padding", "p".repeat(17 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "headers_too_large");
    // Nothing changed.
    let (_, list) = server
        .call(Method::GET, "/api/v1/sessions", KEY_A, None)
        .await;
    assert_eq!(list["count"], 1);
    let (_, one) = server
        .call(Method::GET, "/api/v1/sessions/h-1", KEY_A, None)
        .await;
    assert_eq!(
        (
            one["version"].as_u64(),
            one["tool_execution_count"].as_u64()
        ),
        (Some(1), Some(0))
    );
    server.stop().await;
}

/// Every file under `dir`, recursively, as raw bytes.
fn all_bytes(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_disk_or_the_logs_and_survive_a_key_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edge.toml");
    std::fs::write(&config, config_toml(&dir.path().join("data"), 100, "")).unwrap();
    let server = ChildServer::start(&config).await;
    let client = client();
    let (status, created) = call(
        &client,
        &server.base,
        Method::POST,
        "/api/v1/sessions",
        KEY_A,
        Some(create_body("disk-1")),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let token = created["session_token"].as_str().unwrap().to_owned();
    let refresh = created["refresh_token"].as_str().unwrap().to_owned();
    // An unknown key and a wrong token: logged as auth failures.
    call(
        &client,
        &server.base,
        Method::GET,
        "/api/v1/sessions",
        "wrong-key-material",
        None,
    )
    .await;
    let (status, _) = call(
        &client,
        &server.base,
        Method::POST,
        "/admin/flush",
        ADMIN_KEY,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let needles: Vec<Vec<u8>> = vec![
        SECRET.as_bytes().to_vec(),
        base64::engine::general_purpose::STANDARD
            .encode(SECRET)
            .into_bytes(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(SECRET)
            .into_bytes(),
        token.as_bytes().to_vec(),
        refresh.as_bytes().to_vec(),
    ];
    let files = all_bytes(&dir.path().join("data"));
    assert!(
        files
            .iter()
            .any(|(p, _)| p.to_string_lossy().contains("sled")),
        "sled files exist"
    );
    for (path, bytes) in &files {
        for needle in &needles {
            assert!(
                !contains(bytes, needle),
                "{} holds a secret",
                path.display()
            );
        }
    }

    // Rotate the master key with the real command; restart.
    assert_eq!(server.terminate().code(), Some(0));
    let out = Command::new(env!("CARGO_BIN_EXE_edge-sessions"))
        .args(["rotate-key", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("new master key"));
    let server = ChildServer::start(&config).await;
    let (status, bundle) = call(
        &client,
        &server.base,
        Method::GET,
        "/api/v1/sessions/disk-1/passthrough-auth",
        KEY_A_READER,
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "sealed under the old key, still readable: {bundle}"
    );
    assert_eq!(bundle["credentials"]["github"]["token"], SECRET);
    let (status, _) = call(
        &client,
        &server.base,
        Method::POST,
        "/api/v1/sessions",
        KEY_A,
        Some(create_body("disk-2")),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(server.terminate().code(), Some(0));

    // Keep only the newest key: the new session opens, the old one cannot,
    // so new writes used the new key.
    let key_file = master_key_file(&dir.path().join("data"));
    let text = std::fs::read_to_string(&key_file).unwrap();
    let newest: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(newest.len(), 2);
    std::fs::write(&key_file, format!("{}\n", newest[0])).unwrap();
    let server = ChildServer::start(&config).await;
    let (status, bundle) = call(
        &client,
        &server.base,
        Method::GET,
        "/api/v1/sessions/disk-2/passthrough-auth",
        KEY_A_READER,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    let (status, body) = call(
        &client,
        &server.base,
        Method::GET,
        "/api/v1/sessions/disk-1/passthrough-auth",
        KEY_A_READER,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(
        !body.to_string().contains("master key"),
        "no internals in the body"
    );

    let logs = server.logs.lock().unwrap().join("\n");
    let stdout = server.stdout.lock().unwrap().join("\n");
    assert_eq!(server.terminate().code(), Some(0));
    for text in [&logs, &stdout] {
        for needle in &needles {
            assert!(
                !contains(text.as_bytes(), needle),
                "a secret reached the output"
            );
        }
        assert!(!text.contains("wrong-key-material"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_are_structured_log_events() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edge.toml");
    std::fs::write(&config, config_toml(&dir.path().join("data"), 100, "")).unwrap();
    let server = ChildServer::start(&config).await;
    let client = client();
    call(
        &client,
        &server.base,
        Method::GET,
        "/api/v1/sessions",
        "leaked-looking-key",
        None,
    )
    .await;
    call(
        &client,
        &server.base,
        Method::POST,
        "/admin/sessions/cleanup",
        "bad-admin",
        None,
    )
    .await;
    let mut events = Vec::new();
    for _ in 0..100 {
        events = server
            .logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == "auth_failure")
            .collect();
        if events.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(events.len() >= 2, "{events:?}");
    assert!(events
        .iter()
        .all(|e| e["reason"].is_string() && e["path"].is_string()));
    let all = server.logs.lock().unwrap().join("\n");
    assert!(!all.contains("leaked-looking-key") && !all.contains("bad-admin"));
    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn serve_refuses_tenants_without_a_master_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edge.toml");
    let text = config_toml(&dir.path().join("data"), 10, "").replace(
        "[security]\nmaster_key_file",
        "[security]\n# master_key_file",
    );
    std::fs::write(&config, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edge-sessions"))
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("EDGE_SESSIONS_MASTER_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("master_key_file") && stderr.contains("no master key"),
        "{stderr}"
    );
}

/// A well-formed session token for `tenant` that the server never issued.
fn forged_token(tenant: &str) -> String {
    let mut bytes = uuid::Uuid::parse_str(tenant).unwrap().as_bytes().to_vec();
    bytes.extend_from_slice(&[7u8; 32]);
    format!(
        "est_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thief_who_rotated_first_is_caught_when_the_client_refreshes_with_its_own_token() {
    let server = TestServer::start().await;
    let (c, b) = (&server.client, server.base.as_str());
    let created = create(&server, "theft-1").await;
    let (token, refresh) = (
        created["session_token"].as_str().unwrap().to_owned(),
        created["refresh_token"].as_str().unwrap().to_owned(),
    );
    // The thief uses the stolen pair first.
    let (status, _) = with_token(
        c,
        b,
        Method::POST,
        "/api/v1/sessions/theft-1/refresh",
        &token,
        Some(json!({"refresh_token": refresh})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // The client, authenticated only by its (now rotated-away) token, refreshes.
    let (status, body) = with_token(
        c,
        b,
        Method::POST,
        "/api/v1/sessions/theft-1/refresh",
        &token,
        Some(json!({"refresh_token": refresh})),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("refresh_token_reused")),
        "{body}"
    );
    let (_, after) = server
        .call(Method::GET, "/api/v1/sessions/theft-1", KEY_A, None)
        .await;
    assert_eq!(after["termination_reason"], "refresh_token_reuse");
    // A stale token without a refresh token stays an unknown session.
    let created = create(&server, "theft-2").await;
    let token2 = created["session_token"].as_str().unwrap();
    let refresh2 = created["refresh_token"].as_str().unwrap();
    with_token(
        c,
        b,
        Method::POST,
        "/api/v1/sessions/theft-2/refresh",
        token2,
        Some(json!({"refresh_token": refresh2})),
    )
    .await;
    let (status, _) = with_token(
        c,
        b,
        Method::POST,
        "/api/v1/sessions/theft-2/refresh",
        token2,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_follow_the_credential_that_authenticated() {
    let server = TestServer::start_with(
        1000,
        "[rate_limits]\ncreate_per_second = 1\ncreate_burst = 1\nwrite_per_second = 1\nwrite_burst = 2\n",
    )
    .await;
    let (c, b) = (&server.client, server.base.as_str());
    // An API key cannot dodge its bucket by adding a session token.
    let mut statuses = Vec::new();
    for i in 0..2 {
        let response = c
            .post(format!("{b}/api/v1/sessions"))
            .header("X-API-Key", KEY_A)
            .bearer_auth(forged_token(TENANT_A))
            .json(&json!({"session_id": format!("lim-{i}"), "edge_mcp_id": "e"}))
            .send()
            .await
            .unwrap();
        statuses.push(response.status());
    }
    assert_eq!(
        statuses,
        [StatusCode::CREATED, StatusCode::TOO_MANY_REQUESTS]
    );

    // A session token draws on its session's bucket, charged only once the
    // token is verified: forged tokens neither drain nor touch it.
    let (_, created) = server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_A_READER,
            Some(json!({"session_id": "lim-s", "edge_mcp_id": "e"})),
        )
        .await;
    let token = created["session_token"].as_str().unwrap().to_owned();
    let response = c
        .post(format!("{b}/api/v1/sessions/lim-s/activity"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(response.headers()["ratelimit-remaining"], "1");
    for _ in 0..5 {
        let (status, _) = with_token(
            c,
            b,
            Method::POST,
            "/api/v1/sessions/lim-s/activity",
            &forged_token(TENANT_A),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let response = c
        .post(format!("{b}/api/v1/sessions/lim-s/activity"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::NO_CONTENT,
        "the forged calls took nothing"
    );
    let response = c
        .post(format!("{b}/api/v1/sessions/lim-s/activity"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(response.headers()["ratelimit-limit"], "2");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    // The API key's own write bucket is separate.
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/sessions/lim-s/activity",
            KEY_A_READER,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_come_back_in_errors_and_an_empty_bundle_is_none() {
    let server = TestServer::start().await;
    for bad in [
        json!({"edge_mcp_id": "e", "passthrough_auth": "ghp_echo_me"}),
        json!({"edge_mcp_id": "e", "passthrough_auth": {"credentials": "ghp_echo_me"}}),
        json!({"edge_mcp_id": "e", "passthrough_auth": {"credentials": ["ghp_echo_me"]}}),
    ] {
        let (status, body) = server
            .call(Method::POST, "/api/v1/sessions", KEY_A, Some(bad))
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("validation_failed"))
        );
        assert!(!body.to_string().contains("ghp_echo_me"), "{body}");
    }
    let (status, created) = server
        .call(Method::POST, "/api/v1/sessions", KEY_A, Some(json!({"session_id": "empty", "edge_mcp_id": "e", "passthrough_auth": {"credentials": {}}})))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(created["has_passthrough_auth"], false);
    assert!(created.get("session_token").is_some());
    let (status, body) = server
        .call(
            Method::GET,
            "/api/v1/sessions/empty/passthrough-auth",
            KEY_A_READER,
            None,
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("passthrough_auth_not_found"))
    );
    let response = server
        .client
        .post(format!("{}/api/v1/sessions", server.base))
        .header("X-API-Key", KEY_A)
        .json(&json!({"edge_mcp_id": "e"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["cache-control"],
        "no-store",
        "answers with tokens are not cached"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_made_up_token_on_refresh_learns_nothing_and_drains_nothing() {
    let server = TestServer::start_with(
        1000,
        "[rate_limits]\nwrite_per_second = 1\nwrite_burst = 2\n",
    )
    .await;
    let (c, b) = (&server.client, server.base.as_str());
    let live = create(&server, "probe-live").await;
    let token = live["session_token"].as_str().unwrap().to_owned();
    create(&server, "probe-gone").await;
    let (status, _) = server
        .call(Method::DELETE, "/api/v1/sessions/probe-gone", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let forged = forged_token(TENANT_A);
    let forged_refresh = forged.replacen("est_", "ert_", 1);
    // Live, terminated or unknown, with or without a refresh token in the
    // body: the same 401, so the answer tells nothing about the session.
    let mut answers = Vec::new();
    for id in ["probe-live", "probe-gone", "probe-never"] {
        for body in [
            Some(json!({"refresh_token": forged_refresh})),
            Some(json!({"refresh_token": "ert_not_even_well_formed"})),
            None,
        ] {
            let path = format!("/api/v1/sessions/{id}/refresh");
            let (status, answer) = with_token(c, b, Method::POST, &path, &forged, body).await;
            answers.push((status, answer["code"].clone()));
        }
    }
    assert!(
        answers
            .iter()
            .all(|a| *a == (StatusCode::UNAUTHORIZED, json!("unauthorized"))),
        "{answers:?}"
    );
    // None of it touched the live session's write bucket (burst 2) or its
    // state.
    for _ in 0..2 {
        let (status, _) = with_token(
            c,
            b,
            Method::POST,
            "/api/v1/sessions/probe-live/activity",
            &token,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "the bucket was untouched");
    }
    let (_, view) = server
        .call(Method::GET, "/api/v1/sessions/probe-live", KEY_A, None)
        .await;
    assert_eq!(view["status"], "active");
    assert_eq!(view["version"], live["version"], "{view}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_proven_by_the_refresh_token_alone_are_charged_to_the_session() {
    let server = TestServer::start_with(
        1000,
        "[rate_limits]\nwrite_per_second = 1\nwrite_burst = 2\n",
    )
    .await;
    let (c, b) = (&server.client, server.base.as_str());
    let created = create(&server, "stale-loop").await;
    // A session token that does not authenticate, with the session's
    // current refresh token each time: rotations, charged like any write.
    let stale = forged_token(TENANT_A);
    let mut refresh = created["refresh_token"].as_str().unwrap().to_owned();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let (status, body) = with_token(
            c,
            b,
            Method::POST,
            "/api/v1/sessions/stale-loop/refresh",
            &stale,
            Some(json!({"refresh_token": refresh})),
        )
        .await;
        statuses.push(status);
        if let Some(next) = body["refresh_token"].as_str() {
            refresh = next.to_owned();
        }
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ],
        "a write burst of 2"
    );
    server.stop().await;
}
