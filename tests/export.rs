//! `GET /admin/sessions/export`: CSV with a header row or NDJSON, every
//! tenant or one, `since` on `created_at`, no credentials or tokens.

mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn export(server: &TestServer, query: &str) -> (StatusCode, String, String) {
    let response = server
        .client
        .get(format!("{}/admin/sessions/export{query}", server.base))
        .header("X-Admin-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_every_session_as_csv_or_ndjson_without_secrets() {
    let server = TestServer::start().await;
    let mut tokens = Vec::new();
    for i in 0..120 {
        let body = json!({"session_id": format!("x-{i}"), "edge_mcp_id": "edge, \"quoted\"",
                          "client_name": "line\nbreak",
                          "passthrough_auth": {"credentials": {"github": {"token": "ghp_exported_never"}}}});
        let (status, created) = server
            .call(Method::POST, "/api/v1/sessions", KEY_A, Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED);
        tokens.push(created["session_token"].as_str().unwrap().to_owned());
    }
    for i in 0..5 {
        let (status, _) = server
            .call(
                Method::POST,
                "/api/v1/sessions",
                KEY_B,
                Some(json!({"session_id": format!("y-{i}"), "edge_mcp_id": "b"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    server
        .call(Method::DELETE, "/api/v1/sessions/x-0", KEY_A, None)
        .await;
    server
        .call(Method::POST, "/admin/flush", ADMIN_KEY, None)
        .await;

    let (status, content_type, csv) = export(&server, "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.starts_with("text/csv"));
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        header[..6],
        [
            "session_id",
            "tenant_id",
            "edge_mcp_id",
            "client_type",
            "status",
            "created_at"
        ]
    );
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 125);
    let x0 = rows.iter().find(|r| &r[0] == "x-0").unwrap();
    assert_eq!(&x0[4], "terminated");
    assert_eq!(&x0[2], "edge, \"quoted\"", "quoting round-trips");
    assert_eq!(&x0[13], "line\nbreak");
    for secret in std::iter::once("ghp_exported_never".to_owned()).chain(tokens.iter().cloned()) {
        assert!(!csv.contains(&secret));
    }

    let (status, content_type, ndjson) = export(&server, "?format=ndjson").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "application/x-ndjson");
    let lines: Vec<Value> = ndjson
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 125);
    assert!(lines
        .iter()
        .all(|l| l["session_id"].is_string() && l.get("session_token").is_none()));
    assert!(!ndjson.contains("ghp_exported_never"));

    let (_, _, only_b) = export(&server, &format!("?format=ndjson&tenant_id={TENANT_B}")).await;
    assert_eq!(only_b.lines().count(), 5);
    let (_, _, future) = export(&server, "?since=2999-01-01T00:00:00Z").await;
    assert_eq!(future.lines().count(), 1, "the header row only");
    let (_, _, past) = export(&server, "?since=2000-01-01T00:00:00Z&format=ndjson").await;
    assert_eq!(past.lines().count(), 125);

    for (query, field) in [
        ("?format=xml", "format"),
        ("?since=yesterday", "since"),
        ("?tenant_id=nope", "tenant_id"),
    ] {
        let (status, _, body) = export(&server, query).await;
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("validation_failed")),
            "{query}"
        );
        assert_eq!(body["details"]["field"], field);
    }
    let (status, _) = server
        .call(Method::GET, "/admin/sessions/export", "", None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = server
        .call(Method::GET, "/admin/sessions/export", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    server.stop().await;
}
