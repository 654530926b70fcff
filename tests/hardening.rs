//! The hardening rules of the contract (v1.1), through the real port or the
//! real binary: slow clients, file modes, CSV formula quoting, termination
//! reasons and durations, log filtering, browser headers, the
//! failed-authentication limit, and the first-run messages.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use futures::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Slow-client limits short enough for a test (the contract's 10/30/60 s
/// are the defaults, checked in `the_contract_timeouts_are_the_defaults`).
const HEAD: Duration = Duration::from_millis(1000);
const BODY: Duration = Duration::from_millis(2000);
const IDLE: Duration = Duration::from_millis(3000);

async fn start_with_short_timeouts() -> TestServer {
    TestServer::start_customized(1000, "", "", |settings| {
        settings.server.header_read_timeout_ms = HEAD.as_millis() as u64;
        settings.server.body_read_timeout_ms = BODY.as_millis() as u64;
        settings.server.idle_timeout_ms = IDLE.as_millis() as u64;
    })
    .await
}

fn addr(server: &TestServer) -> String {
    server.base.trim_start_matches("http://").to_owned()
}

/// Reads until the server closes the connection (EOF or reset), within
/// `limit`; answers what was read and when it closed.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(start + limit),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => panic!(
                "still open after {limit:?}; read: {}",
                String::from_utf8_lossy(&seen)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (String::from_utf8_lossy(&seen).into_owned(), start.elapsed())
            }
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn the_contract_timeouts_are_the_defaults() {
    let settings = edge_sessions::settings::Settings::from_toml("").unwrap();
    assert_eq!(settings.server.header_read_timeout_ms, 10_000);
    assert_eq!(settings.server.body_read_timeout_ms, 30_000);
    assert_eq!(settings.server.idle_timeout_ms, 60_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_request_heads_are_closed_after_the_head_timeout() {
    let server = start_with_short_timeouts().await;
    let addr = addr(&server);
    // Many connections, each sending a header line every 300 ms: a limit
    // between reads would never fire; the head's own clock does.
    let mut clients = Vec::new();
    for i in 0..20 {
        let addr = addr.clone();
        clients.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(&addr).await.unwrap();
            let start = Instant::now();
            stream
                .write_all(format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\n").as_bytes())
                .await
                .unwrap();
            let mut buf = [0u8; 1024];
            loop {
                tokio::select! {
                    read = stream.read(&mut buf) => match read {
                        Ok(0) | Err(_) => return start.elapsed(),
                        Ok(n) => panic!("an answer to an unfinished head: {:?}", String::from_utf8_lossy(&buf[..n])),
                    },
                    () = tokio::time::sleep(Duration::from_millis(300)) => {
                        let line = format!("X-Trickle-{i}: still here\r\n");
                        if stream.write_all(line.as_bytes()).await.is_err() {
                            return start.elapsed();
                        }
                    }
                }
                assert!(start.elapsed() < HEAD * 5, "still open after {:?}", start.elapsed());
            }
        }));
    }
    // A connection that sends nothing at all owes its head as well.
    clients.push(tokio::spawn({
        let addr = addr.clone();
        async move {
            let mut stream = TcpStream::connect(&addr).await.unwrap();
            read_until_closed(&mut stream, HEAD * 5).await.1
        }
    }));
    for client in clients {
        let closed_after = client.await.unwrap();
        assert!(
            closed_after >= HEAD - Duration::from_millis(100) && closed_after < HEAD * 3,
            "closed after {closed_after:?}"
        );
    }
    // The server still serves.
    let (status, _) = server.call(Method::GET, "/readyz", "", None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_body_that_does_not_arrive_is_answered_and_closed() {
    let server = start_with_short_timeouts().await;
    let addr = addr(&server);
    // Within the body limit: answered and closed once the body deadline
    // passes.
    for (length, status) in [("1000", "400")] {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(
                format!(
                    "POST /api/v1/sessions HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: {KEY_A}\r\n\
                     Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{\""
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let (answer, closed_after) = read_until_closed(&mut stream, BODY * 4).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{length}: {answer}"
        );
        assert!(
            answer.contains("\"request_id\""),
            "the error body: {answer}"
        );
        assert!(
            closed_after >= BODY - Duration::from_millis(100),
            "{length}: closed after {closed_after:?}"
        );
    }
    // Far beyond it (the finding: no answer ever): 413 at once, closed.
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    stream
        .write_all(
            format!(
                "POST /api/v1/sessions HTTP/1.1\r\nHost: {addr}\r\nX-API-Key: {KEY_A}\r\n\
                 Content-Type: application/json\r\nContent-Length: 99999999999\r\n\r\n{{\""
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let (answer, closed_after) = read_until_closed(&mut stream, BODY * 4).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"payload_too_large\""), "{answer}");
    assert!(
        closed_after < BODY,
        "answered before the body deadline: {closed_after:?}"
    );
    let (status, list) = server
        .call(Method::GET, "/api/v1/sessions", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["count"], 0, "no state change: {list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let server = start_with_short_timeouts().await;
    let addr = addr(&server);
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    stream
        .write_all(format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("\r\n\r\n{") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    // Idle: neither the head limit (1 s) nor anything but the idle limit
    // (3 s) closes it.
    let (_, closed_after) = read_until_closed(&mut stream, IDLE * 3).await;
    assert!(
        closed_after >= IDLE - Duration::from_millis(300) && closed_after < IDLE * 2,
        "closed after {closed_after:?}"
    );
    // A WebSocket outlives the connection limits: its own pings keep it.
    let (status, created) = server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(json!({"session_id": "slow-ws", "edge_mcp_id": "e"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let mut request = format!(
        "{}/api/v1/sessions/slow-ws/ws",
        server.base.replacen("http", "ws", 1)
    )
    .into_client_request()
    .unwrap();
    request
        .headers_mut()
        .insert("x-api-key", KEY_A.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    tokio::time::sleep(IDLE + HEAD).await;
    ws.send(Message::Text(
        json!({"jsonrpc": "2.0", "id": 1, "method": "session.get"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let reply = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(text))) => break serde_json::from_str::<Value>(&text).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("the socket closed: {other:?}"),
        }
    };
    assert_eq!(reply["result"]["session_id"], "slow-ws");
}

/// Every directory under `dir` (itself included) is 0700, every file 0600.
fn assert_private(dir: &Path) {
    let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{}: {mode:o}", dir.display());
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            assert_private(&entry.path());
        } else if kind.is_file() {
            let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}: {mode:o}", entry.path().display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_and_every_file_in_it_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_toml(&data, 100, "")).unwrap();
    let child = ChildServer::start(&config).await;
    let client = client();
    let (status, _) = call(
        &client,
        &child.base,
        Method::POST,
        "/api/v1/sessions",
        KEY_A,
        Some(json!({"session_id": "private-1", "edge_mcp_id": "e", "metadata": {"k": "v"}})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = call(
        &client,
        &child.base,
        Method::POST,
        "/api/v1/sessions/private-1/tools/execute",
        KEY_A,
        Some(json!({"tool_name": "grep", "arguments": {"q": "secret"}})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(
        &client,
        &child.base,
        Method::POST,
        "/admin/flush",
        ADMIN_KEY,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(child.terminate().success());
    assert!(std::fs::read_dir(data.join("sled")).unwrap().count() > 0);
    assert_private(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_cells_that_start_like_formulas_are_quoted() {
    let server = TestServer::start().await;
    let formula = "=HYPERLINK(\"http://evil.example\",\"click\")";
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(json!({"session_id": "csv-1", "edge_mcp_id": formula, "client_name": "@SUM(A1)"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let export = |format: &'static str| {
        let server = &server;
        async move {
            let response = server
                .client
                .get(format!(
                    "{}/admin/sessions/export?format={format}&tenant_id={TENANT_A}",
                    server.base
                ))
                .header("X-Admin-Key", ADMIN_KEY)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.text().await.unwrap()
        }
    };
    let csv_text = export("csv").await;
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let headers = reader.headers().unwrap().clone();
    let column = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let row = reader
        .records()
        .map(Result::unwrap)
        .find(|r| &r[0] == "csv-1")
        .unwrap();
    assert_eq!(&row[column("edge_mcp_id")], format!("'{formula}"));
    assert_eq!(&row[column("client_name")], "'@SUM(A1)");
    assert_eq!(&row[column("status")], "active", "other cells unchanged");

    let ndjson = export("ndjson").await;
    let line: Value = ndjson
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["session_id"] == "csv-1")
        .unwrap();
    assert_eq!(line["edge_mcp_id"], formula, "NDJSON is unchanged");
    assert_eq!(line["client_name"], "@SUM(A1)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reasons_and_durations_are_refused_without_a_change() {
    let server = TestServer::start().await;
    for id in ["reason-1", "reason-ws"] {
        let (status, _) = server
            .call(
                Method::POST,
                "/api/v1/sessions",
                KEY_A,
                Some(json!({"session_id": id, "edge_mcp_id": "e"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let too_long = "x".repeat(256);
    let bad = [
        "",
        too_long.as_str(),
        "line\nbreak",
        "\u{1b}[31mred",
        "zero\u{200b}width",
        "right-to-left \u{202e}override",
        "idle_timeout",
        "ttl_expired",
        "refresh_token_reuse",
        "admin_request",
    ];
    for reason in bad {
        let (status, body) = server
            .call(
                Method::DELETE,
                "/api/v1/sessions/reason-1",
                KEY_A,
                Some(json!({ "reason": reason })),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{reason:?}: {body}");
        assert_eq!(body["code"], "validation_failed", "{reason:?}: {body}");
        assert_eq!(body["details"]["field"], "reason", "{body}");
    }
    // The socket's session.terminate follows the same rule.
    let mut request = format!(
        "{}/api/v1/sessions/reason-ws/ws",
        server.base.replacen("http", "ws", 1)
    )
    .into_client_request()
    .unwrap();
    request
        .headers_mut()
        .insert("x-api-key", KEY_A.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    for (id, reason) in bad.iter().enumerate() {
        ws.send(Message::Text(
            json!({"jsonrpc": "2.0", "id": id, "method": "session.terminate", "params": {"reason": reason}})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
        let reply = loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .unwrap()
            {
                Some(Ok(Message::Text(text))) => {
                    break serde_json::from_str::<Value>(&text).unwrap()
                }
                Some(Ok(_)) => continue,
                other => panic!("the socket closed: {other:?}"),
            }
        };
        assert_eq!(reply["error"]["code"], -32602, "{reason:?}: {reply}");
    }
    for id in ["reason-1", "reason-ws"] {
        let (_, session) = server
            .call(Method::GET, &format!("/api/v1/sessions/{id}"), KEY_A, None)
            .await;
        assert_eq!(session["status"], "active", "no state change: {session}");
    }

    // Durations: at most 24 h, over REST, the batch endpoint and the socket.
    let execute = |duration: Value| {
        let server = &server;
        async move {
            server
                .call(
                    Method::POST,
                    "/api/v1/sessions/reason-1/tools/execute",
                    KEY_A,
                    Some(json!({"tool_name": "t", "duration_ms": duration})),
                )
                .await
        }
    };
    for too_long in [json!(86_400_001), json!(86_400_000.6), json!(1e300)] {
        let (status, body) = execute(too_long.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{too_long}: {body}");
        assert_eq!(body["code"], "validation_failed");
        assert_eq!(body["details"]["field"], "duration_ms", "{body}");
    }
    ws.send(Message::Text(
        json!({"jsonrpc": "2.0", "id": 99, "method": "tool.executed", "params": {"tool_name": "t", "duration_ms": 86_400_001}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let reply = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(text))) => break serde_json::from_str::<Value>(&text).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("the socket closed: {other:?}"),
        }
    };
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    let (_, session) = server
        .call(Method::GET, "/api/v1/sessions/reason-1", KEY_A, None)
        .await;
    assert_eq!(session["tool_execution_count"], 0, "{session}");
    let (status, _) = execute(json!(86_400_000)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "24 h exactly is fine");

    // The DELETE default may be given explicitly.
    let (status, body) = server
        .call(
            Method::DELETE,
            "/api/v1/sessions/reason-1",
            KEY_A,
            Some(json!({"reason": "client_request"})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, session) = server
        .call(Method::GET, "/api/v1/sessions/reason-1", KEY_A, None)
        .await;
    assert_eq!(session["termination_reason"], "client_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_hold_no_refresh_token_and_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_toml(&dir.path().join("data"), 100, "")).unwrap();
    let child = ChildServer::start_with_env(
        &config,
        true,
        &[
            ("EDGE_SESSIONS__LOG__FORMAT", "text"),
            ("RUST_LOG", "trace"),
        ],
    )
    .await;
    let client = client();
    let (status, created) = call(
        &client,
        &child.base,
        Method::POST,
        "/api/v1/sessions",
        KEY_A,
        Some(json!({"session_id": "logs-1", "edge_mcp_id": "e"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let refresh = created["refresh_token"].as_str().unwrap().to_owned();
    let mut request = format!(
        "{}/api/v1/sessions/logs-1/ws",
        child.base.replacen("http", "ws", 1)
    )
    .into_client_request()
    .unwrap();
    request
        .headers_mut()
        .insert("x-api-key", KEY_A.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws.send(Message::Text(
        json!({"jsonrpc": "2.0", "id": 1, "method": "session.refresh", "params": {"refresh_token": refresh}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let reply = loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(text) => break serde_json::from_str::<Value>(&text).unwrap(),
            _ => continue,
        }
    };
    let rotated = reply["result"]["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(rotated.starts_with("ert_"), "{reply}");
    ws.close(None).await.unwrap();
    let logs = child.logs.clone();
    assert!(child.terminate().success());
    let logs = logs.lock().unwrap().join("\n");
    assert!(
        logs.contains("TRACE"),
        "trace is on for the server's own lines"
    );
    for token in [&refresh, &rotated] {
        let hex: String = token.bytes().map(|b| format!("{b:02x}")).collect();
        assert!(
            !logs.contains(token.as_str()),
            "a refresh token in the logs"
        );
        assert!(!logs.contains(&hex), "a refresh token (hex) in the logs");
    }
    assert!(!logs.contains("\u{1b}["), "colour codes in piped logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_tickets_carry_their_headers() {
    let server = TestServer::start().await;
    let page = server
        .client
        .get(format!("{}/admin/dashboard", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains('*') && !csp.contains("http"),
        "{csp}"
    );
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    let html = page.text().await.unwrap();
    assert!(!html.contains("<style") && !html.contains("style=") && !html.contains("<script>"));
    for file in ["/admin/dashboard.js", "/admin/dashboard.css"] {
        let response = server
            .client
            .get(format!("{}{file}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{file}");
    }

    let ticket = server
        .client
        .post(format!("{}/admin/tickets", server.base))
        .header("X-Admin-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(ticket.status(), StatusCode::OK);
    assert_eq!(ticket.headers()["cache-control"], "no-store");
    let ticket: Value = ticket.json().await.unwrap();
    let ticket = ticket["ticket"].as_str().unwrap();

    // The stats socket refuses another site's page before the upgrade and
    // before the ticket is used up.
    let url = format!(
        "{}/admin/stats/ws?ticket={ticket}",
        server.base.replacen("http", "ws", 1)
    );
    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", "http://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 403);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["code"], "forbidden", "{body}");
        }
        other => panic!("expected 403, got {other:?}"),
    }
    let mut request = url.as_str().into_client_request().unwrap();
    let own = server.base.clone();
    request.headers_mut().insert("origin", own.parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the page's own origin, with the same ticket");
    let frame = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(frame, Message::Text(_)));
    // A ticket is still needed.
    let mut request = format!("{}/admin/stats/ws", server.base.replacen("http", "ws", 1))
        .into_client_request()
        .unwrap();
    request.headers_mut().insert("origin", own.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 401)
        }
        other => panic!("expected 401, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentication_is_limited_per_address() {
    let defaults = edge_sessions::settings::Settings::from_toml("").unwrap();
    assert_eq!(defaults.rate_limits.failed_auth_burst, 20);
    assert_eq!(defaults.rate_limits.failed_auth_per_second, 1);
    // The per-key classes off: the failed-authentication bucket stands alone.
    let server = TestServer::start_customized(1000, "", "", |settings| {
        let r = &mut settings.rate_limits;
        r.create_per_second = 0;
        r.read_per_second = 0;
        r.write_per_second = 0;
        r.admin_per_second = 0;
    })
    .await;
    let mut statuses = Vec::new();
    for i in 0..30 {
        let (path, key) = if i % 2 == 0 {
            ("/api/v1/sessions", format!("wrong-key-{i}"))
        } else {
            ("/admin/stats", format!("wrong-admin-key-{i}"))
        };
        let mut request = server.client.get(format!("{}{path}", server.base));
        request = if path.starts_with("/admin") {
            request.header("X-Admin-Key", key)
        } else {
            request.header("X-API-Key", key)
        };
        let response = request.send().await.unwrap();
        let status = response.status();
        let retry_after = response.headers().get("retry-after").cloned();
        let body: Value = response.json().await.unwrap();
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(body["code"], "rate_limited", "{body}");
            assert!(body["request_id"].is_string(), "{body}");
            let seconds: u64 = retry_after.unwrap().to_str().unwrap().parse().unwrap();
            assert!((1..=2).contains(&seconds), "{seconds}");
        } else {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        }
        statuses.push(status);
    }
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!(
        statuses[..20]
            .iter()
            .all(|s| *s == StatusCode::UNAUTHORIZED),
        "the burst of 20: {statuses:?}"
    );
    assert!(refused >= 9, "the later ones are refused: {statuses:?}");
    // No key at all counts as a failed attempt too.
    let (status, _) = server.call(Method::GET, "/api/v1/sessions", "", None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // A client holding a real key from the same address is not locked out.
    let (status, _) = server
        .call(Method::GET, "/api/v1/sessions", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server
        .call(Method::GET, "/admin/stats", ADMIN_KEY, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    // Health and metrics are not behind it.
    let (status, _) = server.call(Method::GET, "/readyz", "", None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_says_so_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_toml(&data, 100, "")).unwrap();
    let first = ChildServer::start(&config).await;
    let second = tokio::task::spawn_blocking({
        let config = config.clone();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_edge-sessions"))
                .args(["serve", "--config"])
                .arg(&config)
                .env("EDGE_SESSIONS__SERVER__LISTEN", "127.0.0.1:0")
                .env("RUST_LOG", "off")
                .output()
                .unwrap()
        }
    });
    let output = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("the second server exits")
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains("another process holds the data dir")
            && lines[0].contains(&data.display().to_string()),
        "{stderr}"
    );
    assert!(
        !stderr.contains("Os {") && !stderr.contains("WouldBlock"),
        "{stderr}"
    );
    // The first one is unaffected.
    let (status, _) = call(&client(), &first.base, Method::GET, "/readyz", "", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(first.terminate().success());
}
