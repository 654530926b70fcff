//! The admin API on sessions across tenants, through the real port: search
//! with filters and keyset pagination, inspect, terminate one (heard by an
//! open WebSocket), terminate in bulk by user or by edge-mcp. (The audit
//! row's actor `admin` is checked against a real PostgreSQL in
//! tests/postgres.rs.)

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const USER_1: &str = "11111111-1111-4111-8111-111111111111";
const USER_2: &str = "22222222-2222-4222-8222-222222222222";

async fn create(server: &TestServer, key: &str, id: &str, user: &str, edge: &str) {
    let (status, body) = server
        .call(
            Method::POST,
            "/api/v1/sessions",
            key,
            Some(json!({"session_id": id, "edge_mcp_id": edge, "user_id": user})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

async fn admin(
    server: &TestServer,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    server.call(method, path, ADMIN_KEY, body).await
}

fn ids(page: &Value) -> Vec<String> {
    page["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}/{}",
                s["tenant_id"].as_str().unwrap(),
                s["session_id"].as_str().unwrap()
            )
        })
        .collect()
}

/// Six sessions over two tenants: a-1..a-4 in A, b-1, b-2 in B; USER_1 owns
/// a-1, a-2 and b-1; edge "edge-x" runs a-3 and b-2.
async fn seeded() -> TestServer {
    let server = TestServer::start().await;
    create(&server, KEY_A, "a-1", USER_1, "edge-1").await;
    create(&server, KEY_A, "a-2", USER_1, "edge-2").await;
    create(&server, KEY_B, "b-1", USER_1, "edge-1").await;
    create(&server, KEY_A, "a-3", USER_2, "edge-x").await;
    create(&server, KEY_B, "b-2", USER_2, "edge-x").await;
    create(&server, KEY_A, "a-4", USER_2, "edge-4").await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_search_every_tenant_page_by_page() {
    let server = seeded().await;
    // A tenant key is not an admin key.
    let response = server
        .client
        .get(format!("{}/admin/sessions", server.base))
        .header("X-API-Key", KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let (status, _) = server
        .call(Method::GET, "/admin/sessions", KEY_A, None)
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a tenant key as admin key"
    );

    let (status, all) = admin(&server, Method::GET, "/admin/sessions", None).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(all["count"], 6);
    assert_eq!(all["next_cursor"], Value::Null);
    let everything = ids(&all);
    let created: Vec<i64> = all["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(s["created_at"].as_str().unwrap())
                .unwrap()
                .timestamp_millis()
        })
        .collect();
    assert!(
        created.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {created:?}"
    );
    assert_eq!(everything[0], format!("{TENANT_A}/a-4"), "the newest");

    // Keyset pages of two walk the same list, each session once.
    let mut walked = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            None => "/admin/sessions?limit=2".to_owned(),
            Some(c) => format!("/admin/sessions?limit=2&cursor={c}"),
        };
        let (status, page) = admin(&server, Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert!(page["count"].as_u64().unwrap() <= 2);
        walked.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(walked, everything);

    // Filters, alone and together.
    for (query, expected) in [
        (format!("tenant_id={TENANT_B}"), vec!["b-2", "b-1"]),
        (format!("user_id={USER_1}"), vec!["b-1", "a-2", "a-1"]),
        (
            format!("user_id={USER_1}&tenant_id={TENANT_A}"),
            vec!["a-2", "a-1"],
        ),
        ("edge_mcp_id=edge-x".to_owned(), vec!["b-2", "a-3"]),
        ("status=terminated".to_owned(), vec![]),
        (
            "status=active&client_type=".to_owned(),
            vec!["a-4", "b-2", "a-3", "b-1", "a-2", "a-1"],
        ),
        (
            "tenant_id=00000000-0000-4000-8000-000000000000".to_owned(),
            vec![],
        ),
    ] {
        let (status, page) = admin(
            &server,
            Method::GET,
            &format!("/admin/sessions?{query}"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{query}: {page}");
        let got: Vec<String> = page["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["session_id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(got, expected, "{query}");
        assert_eq!(page["count"], expected.len(), "{query}");
    }
    // The same resource as the tenant API, tokens and credentials never.
    let (_, tenant_view) = server
        .call(Method::GET, "/api/v1/sessions/a-1", KEY_A, None)
        .await;
    let (status, admin_view) = admin(
        &server,
        Method::GET,
        &format!("/admin/tenants/{TENANT_A}/sessions/a-1"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(admin_view, tenant_view);

    // Bad input: 400 with the error body; unknown: 404.
    for query in [
        "limit=0",
        "limit=1001",
        "limit=ten",
        "user_id=not-a-uuid",
        "tenant_id=42",
        "status=sleeping",
        "client_type=robot",
        "cursor=not-a-cursor",
    ] {
        let (status, body) = admin(
            &server,
            Method::GET,
            &format!("/admin/sessions?{query}"),
            None,
        )
        .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("validation_failed")),
            "{query}: {body}"
        );
    }
    for (path, expected) in [
        (
            format!("/admin/tenants/{TENANT_A}/sessions/b-1"),
            StatusCode::NOT_FOUND,
        ),
        (
            "/admin/tenants/00000000-0000-4000-8000-000000000000/sessions/a-1".to_owned(),
            StatusCode::NOT_FOUND,
        ),
        (
            "/admin/tenants/not-a-tenant/sessions/a-1".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("/admin/tenants/{TENANT_A}/sessions/bad%20id"),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (status, body) = admin(&server, Method::GET, &path, None).await;
        assert_eq!(status, expected, "{path}: {body}");
        assert!(body["code"].is_string(), "{path}: {body}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_ends_one_session_and_its_socket_hears_it() {
    let server = seeded().await;
    let url = format!(
        "{}/api/v1/sessions/a-1/ws",
        server.base.replacen("http", "ws", 1)
    );
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-api-key", KEY_A.parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let path = format!("/admin/tenants/{TENANT_A}/sessions/a-1");
    // Bad input changes nothing.
    for body in [
        json!({"reason": ""}),
        json!({"reason": "refresh_token_reuse"}),
        json!({"reason": "admin_request"}),
        json!({"reason": "refresh_token_reuse\u{200b}"}),
        json!({"reason": "x".repeat(256)}),
        json!({"why": "typo"}),
    ] {
        let (status, answer) = admin(&server, Method::DELETE, &path, Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
    }
    let (_, view) = admin(&server, Method::GET, &path, None).await;
    assert_eq!(view["status"], "active");

    let (status, _) = admin(&server, Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let note = loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a push within 10 s")
            .unwrap()
            .unwrap();
        if let Message::Text(text) = frame {
            break serde_json::from_str::<Value>(text.as_str()).unwrap();
        }
    };
    assert_eq!(
        note,
        json!({"jsonrpc": "2.0", "method": "session.terminated", "params": {"reason": "admin_request"}})
    );
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(Some(frame)))) => break u16::from(frame.code),
            Some(Ok(_)) => continue,
            other => panic!("expected a close, got {other:?}"),
        }
    };
    assert_eq!(close, 4000);
    let (_, ended) = server
        .call(Method::GET, "/api/v1/sessions/a-1", KEY_A, None)
        .await;
    assert_eq!(
        (
            ended["status"].as_str(),
            ended["termination_reason"].as_str()
        ),
        (Some("terminated"), Some("admin_request"))
    );
    // A final session: 204 and nothing changes.
    let (status, _) = admin(
        &server,
        Method::DELETE,
        &path,
        Some(json!({"reason": "again"})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, after) = server
        .call(Method::GET, "/api/v1/sessions/a-1", KEY_A, None)
        .await;
    assert_eq!(after, ended);
    // Another reason, on another session; unknown ones are 404.
    let (status, _) = admin(
        &server,
        Method::DELETE,
        &format!("/admin/tenants/{TENANT_B}/sessions/b-2"),
        Some(json!({"reason": "abuse report 17"})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, b2) = server
        .call(Method::GET, "/api/v1/sessions/b-2", KEY_B, None)
        .await;
    assert_eq!(b2["termination_reason"], "abuse report 17");
    let (status, body) = admin(
        &server,
        Method::DELETE,
        &format!("/admin/tenants/{TENANT_B}/sessions/a-2"),
        None,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("session_not_found"))
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_ends_every_session_of_a_user_or_an_edge() {
    let server = seeded().await;
    // One of USER_1's sessions is already over: not counted again.
    let (status, _) = server
        .call(Method::DELETE, "/api/v1/sessions/a-2", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for body in [
        None,
        Some(json!({})),
        Some(json!({"tenant_id": TENANT_A})),
        Some(json!({"reason": "x"})),
        Some(json!({"user_id": "not-a-uuid"})),
        Some(json!({"user_id": 7})),
        Some(json!({"edge_mcp_id": "edge-x", "reason": "ttl_expired"})),
        Some(json!({"edge_mcp_id": "edge-x", "everything": true})),
    ] {
        let (status, answer) = admin(
            &server,
            Method::POST,
            "/admin/sessions/terminate",
            body.clone(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}: {answer}");
        assert!(answer["code"].is_string());
    }
    let (_, before) = admin(&server, Method::GET, "/admin/sessions?status=active", None).await;
    assert_eq!(before["count"], 5, "bad input ended nothing");

    let (status, answer) = admin(
        &server,
        Method::POST,
        "/admin/sessions/terminate",
        Some(json!({"user_id": USER_1, "reason": "offboarded"})),
    )
    .await;
    assert_eq!(
        (status, answer.clone()),
        (StatusCode::OK, json!({"terminated": 2})),
        "{answer}"
    );
    let (_, again) = admin(
        &server,
        Method::POST,
        "/admin/sessions/terminate",
        Some(json!({"user_id": USER_1})),
    )
    .await;
    assert_eq!(again, json!({"terminated": 0}));
    // Narrowed to one tenant, by edge.
    let (_, edge) = admin(
        &server,
        Method::POST,
        "/admin/sessions/terminate",
        Some(json!({"edge_mcp_id": "edge-x", "tenant_id": TENANT_B})),
    )
    .await;
    assert_eq!(edge, json!({"terminated": 1}));

    let (_, live) = admin(&server, Method::GET, "/admin/sessions?status=active", None).await;
    let live: HashSet<String> = live["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(live, HashSet::from(["a-3".to_owned(), "a-4".to_owned()]));
    let (_, b1) = server
        .call(Method::GET, "/api/v1/sessions/b-1", KEY_B, None)
        .await;
    assert_eq!(b1["termination_reason"], "offboarded");
    let (_, b2) = server
        .call(Method::GET, "/api/v1/sessions/b-2", KEY_B, None)
        .await;
    assert_eq!(b2["termination_reason"], "admin_request");
    server.stop().await;
}
