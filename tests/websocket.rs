//! The JSON-RPC WebSocket with a real client (tokio-tungstenite): both
//! authentication forms, every method, bad frames, the pushes and close
//! codes (terminated by REST or by the socket, revoked, expired), and
//! keep-alive holding an idle-timeout session alive.

mod common;

use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn ws_url(server: &TestServer, id: &str, query: &str) -> String {
    format!(
        "{}/api/v1/sessions/{id}/ws{query}",
        server.base.replacen("http", "ws", 1)
    )
}

async fn connect(url: &str, header: Option<(&str, &str)>) -> Result<Socket, u16> {
    let mut request = url.into_client_request().unwrap();
    if let Some((name, value)) = header {
        request.headers_mut().insert(
            reqwest::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("connect: {e}"),
    }
}

/// The next text frame as JSON (pings and pongs skipped), within 10 s.
async fn next_json(socket: &mut Socket) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a frame within 10 s")
            .expect("the socket is open")
            .unwrap();
        match frame {
            Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// The close frame's code, within 10 s.
async fn close_code(socket: &mut Socket) -> u16 {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a close within 10 s");
        match frame {
            Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
            Some(Ok(Message::Close(None))) | None => return 0,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("{e}"),
        }
    }
}

async fn send(socket: &mut Socket, value: Value) {
    socket
        .send(Message::Text(value.to_string().into()))
        .await
        .unwrap();
}

async fn request(socket: &mut Socket, id: u64, method: &str, params: Value) -> Value {
    send(
        socket,
        json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
    )
    .await;
    let reply = next_json(socket).await;
    assert_eq!(reply["id"], id, "{reply}");
    reply
}

async fn create(server: &TestServer, id: &str, extra: Value) -> Value {
    let mut body = json!({"session_id": id, "edge_mcp_id": "edge"});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let (status, created) = server
        .call(Method::POST, "/api/v1/sessions", KEY_A, Some(body))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_both_auth_forms_and_bad_frames() {
    let server = TestServer::start().await;
    let created = create(&server, "ws-1", json!({})).await;
    let token = created["session_token"].as_str().unwrap().to_owned();
    let refresh = created["refresh_token"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {token}");
    let mut ws = connect(
        &ws_url(&server, "ws-1", ""),
        Some(("authorization", &bearer)),
    )
    .await
    .unwrap();

    let reply = request(&mut ws, 1, "session.heartbeat", Value::Null).await;
    assert!(reply["result"]["expires_at"].is_string(), "{reply}");
    let reply = request(&mut ws, 2, "session.get", Value::Null).await;
    assert_eq!(reply["result"]["session_id"], "ws-1");
    let reply = request(
        &mut ws,
        3,
        "session.update",
        json!({"client_name": "ws client", "initialized": true}),
    )
    .await;
    assert_eq!(reply["result"]["client_name"], "ws client");
    let reply = request(
        &mut ws,
        4,
        "tool.executed",
        json!({"tool_name": "grep", "tokens_used": 5}),
    )
    .await;
    assert_eq!(reply["result"]["tool_execution_count"], 1);
    // A notification gets no answer: the next reply is for id 5.
    send(
        &mut ws,
        json!({"jsonrpc": "2.0", "method": "tool.executed", "params": {"tool_name": "t"}}),
    )
    .await;
    let reply = request(&mut ws, 5, "session.get", Value::Null).await;
    assert_eq!(reply["result"]["tool_execution_count"], 2);
    let reply = request(
        &mut ws,
        6,
        "session.refresh",
        json!({"refresh_token": refresh}),
    )
    .await;
    let new_token = reply["result"]["session_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(reply["result"]["refresh_token"]
        .as_str()
        .unwrap()
        .starts_with("ert_"));

    // Bad frames: an error each, and the connection stays open.
    ws.send(Message::Text("{not json".into())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["error"]["code"], -32700);
    send(&mut ws, json!({"id": 7, "method": "session.get"})).await;
    assert_eq!(next_json(&mut ws).await["error"]["code"], -32600);
    send(&mut ws, json!([1, 2])).await;
    assert_eq!(next_json(&mut ws).await["error"]["code"], -32600);
    let reply = request(&mut ws, 8, "session.dance", Value::Null).await;
    assert_eq!(reply["error"]["code"], -32601);
    let reply = request(&mut ws, 9, "tool.executed", json!({"tokens_used": 1})).await;
    assert_eq!(reply["error"]["code"], -32602, "tool_name is required");
    let reply = request(&mut ws, 10, "session.update", json!({"nope": 1})).await;
    assert_eq!(reply["error"]["code"], -32602);
    let reply = request(&mut ws, 11, "session.get", Value::Null).await;
    assert_eq!(reply["result"]["session_id"], "ws-1", "still open");

    // The token in the query, and the tenant's API key.
    let mut by_query = connect(
        &ws_url(&server, "ws-1", &format!("?token={new_token}")),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        request(&mut by_query, 1, "session.get", Value::Null).await["result"]["session_id"],
        "ws-1"
    );
    let mut by_key = connect(&ws_url(&server, "ws-1", ""), Some(("x-api-key", KEY_A)))
        .await
        .unwrap();
    assert_eq!(
        request(&mut by_key, 1, "session.get", Value::Null).await["result"]["session_id"],
        "ws-1"
    );
    // Refused before the upgrade.
    assert_eq!(
        connect(&ws_url(&server, "ws-1", ""), None).await.err(),
        Some(401)
    );
    assert_eq!(
        connect(&ws_url(&server, "ws-1", &format!("?token={token}")), None)
            .await
            .err(),
        Some(401),
        "rotated away"
    );
    create(&server, "ws-other", json!({})).await;
    assert_eq!(
        connect(
            &ws_url(&server, "ws-other", &format!("?token={new_token}")),
            None
        )
        .await
        .err(),
        Some(401),
        "another session's token"
    );
    assert_eq!(
        connect(&ws_url(&server, "ws-1", ""), Some(("x-api-key", KEY_B)))
            .await
            .err(),
        Some(404)
    );

    // session.terminate: {}, then the push, then close 4000 (on every socket).
    let reply = request(&mut ws, 12, "session.terminate", json!({"reason": "done"})).await;
    assert_eq!(reply["result"], json!({}));
    let note = next_json(&mut ws).await;
    assert_eq!(
        (note["method"].as_str(), note["params"]["reason"].as_str()),
        (Some("session.terminated"), Some("done"))
    );
    assert_eq!(close_code(&mut ws).await, 4000);
    assert_eq!(next_json(&mut by_key).await["method"], "session.terminated");
    assert_eq!(close_code(&mut by_key).await, 4000);
    assert_eq!(close_code(&mut by_query).await, 4000);
    // A final session refuses new sockets.
    assert_eq!(
        connect(&ws_url(&server, "ws-1", ""), Some(("x-api-key", KEY_A)))
            .await
            .err(),
        Some(410)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_termination_revocation_and_expiry_reach_open_sockets() {
    let server = TestServer::start_with(1000, "[sessions]\nexpiring_notice_seconds = 10\n").await;
    // Terminated over REST: every open socket hears it at once.
    create(&server, "push-1", json!({})).await;
    let mut a = connect(&ws_url(&server, "push-1", ""), Some(("x-api-key", KEY_A)))
        .await
        .unwrap();
    let mut b = connect(&ws_url(&server, "push-1", ""), Some(("x-api-key", KEY_A)))
        .await
        .unwrap();
    let (status, _) = server
        .call(
            Method::DELETE,
            "/api/v1/sessions/push-1",
            KEY_A,
            Some(json!({"reason": "admin"})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for socket in [&mut a, &mut b] {
        let note = next_json(socket).await;
        assert_eq!(
            note,
            json!({"jsonrpc": "2.0", "method": "session.terminated", "params": {"reason": "admin"}})
        );
        assert_eq!(close_code(socket).await, 4000);
    }

    // Revoked by refresh-token reuse: 4002.
    let created = create(&server, "push-2", json!({})).await;
    let refresh = created["refresh_token"].as_str().unwrap();
    let mut c = connect(&ws_url(&server, "push-2", ""), Some(("x-api-key", KEY_A)))
        .await
        .unwrap();
    server
        .call(
            Method::POST,
            "/api/v1/sessions/push-2/refresh",
            KEY_A,
            Some(json!({"refresh_token": refresh})),
        )
        .await;
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/sessions/push-2/refresh",
            KEY_A,
            Some(json!({"refresh_token": refresh})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let note = next_json(&mut c).await;
    assert_eq!(
        (note["method"].as_str(), note["params"]["reason"].as_str()),
        (Some("session.terminated"), Some("refresh_token_reuse"))
    );
    assert_eq!(close_code(&mut c).await, 4002);

    // Expiring then expired: connecting inside the notice window hears
    // session.expiring at once; then expiry (of the ttl: an open socket
    // holds off the idle timeout) closes with 4001.
    create(&server, "push-3", json!({"ttl": 3})).await;
    let mut d = connect(&ws_url(&server, "push-3", ""), Some(("x-api-key", KEY_A)))
        .await
        .unwrap();
    let note = next_json(&mut d).await;
    assert_eq!(note["method"], "session.expiring", "{note}");
    assert!(note["params"]["seconds_left"].as_u64().unwrap() <= 3);
    assert!(note["params"]["expires_at"].is_string());
    let note = next_json(&mut d).await;
    assert_eq!(
        note,
        json!({"jsonrpc": "2.0", "method": "session.expired", "params": {}})
    );
    assert_eq!(close_code(&mut d).await, 4001);
    let (_, view) = server
        .call(Method::GET, "/api/v1/sessions/push-3", KEY_A, None)
        .await;
    assert_eq!(view["status"], "expired");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_keep_an_idle_timeout_session_alive() {
    let server = TestServer::start().await;
    create(&server, "alive", json!({"idle_timeout": 2})).await;
    create(&server, "left-alone", json!({"idle_timeout": 2})).await;
    let mut ws = connect(&ws_url(&server, "alive", ""), Some(("x-api-key", KEY_A)))
        .await
        .unwrap();
    for _ in 0..8 {
        ws.send(Message::Ping(b"hi".to_vec().into())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (_, alive) = server
        .call(Method::GET, "/api/v1/sessions/alive", KEY_A, None)
        .await;
    assert_eq!(
        alive["status"], "active",
        "4 s of pings held a 2 s idle timeout"
    );
    let (_, alone) = server
        .call(Method::GET, "/api/v1/sessions/left-alone", KEY_A, None)
        .await;
    assert_eq!(alone["status"], "expired", "the control expired");
    server.stop().await;
}

/// The session's `last_activity_at`, read over REST.
async fn last_activity(server: &TestServer, id: &str) -> String {
    let (status, body) = server
        .call(Method::GET, &format!("/api/v1/sessions/{id}"), KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["last_activity_at"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_is_activity_a_failed_tool_call_and_a_bad_frame_too() {
    let server = TestServer::start().await;
    create(&server, "busy", json!({})).await;
    let mut ws = connect(&ws_url(&server, "busy", ""), Some(("x-api-key", KEY_A)))
        .await
        .unwrap();
    let mut seen = last_activity(&server, "busy").await;
    let frames: [(&str, Value); 4] = [
        (
            "a recorded tool call",
            json!({"jsonrpc": "2.0", "id": 1, "method": "tool.executed", "params": {"tool_name": "grep", "duration_ms": 5}}),
        ),
        (
            "a tool call with bad params",
            json!({"jsonrpc": "2.0", "id": 2, "method": "tool.executed", "params": {"duration_ms": 5}}),
        ),
        (
            "a read",
            json!({"jsonrpc": "2.0", "id": 3, "method": "session.get"}),
        ),
        (
            "a frame that is not JSON-RPC",
            json!(["not", "a", "request"]),
        ),
    ];
    for (what, frame) in frames {
        server.clock.advance(Duration::from_secs(10));
        send(&mut ws, frame).await;
        let reply = next_json(&mut ws).await;
        let now = last_activity(&server, "busy").await;
        assert!(
            now > seen,
            "{what} ({reply}) moved last_activity_at: {seen} -> {now}"
        );
        seen = now;
    }
    // A notification (no id, so no reply) with bad params: the activity
    // shows over REST once the socket has handled it.
    server.clock.advance(Duration::from_secs(10));
    send(
        &mut ws,
        json!({"jsonrpc": "2.0", "method": "tool.executed", "params": {"duration_ms": 5}}),
    )
    .await;
    let now = poll(
        async || last_activity(&server, "busy").await,
        |now| *now > seen,
    )
    .await;
    assert!(
        now > seen,
        "a failed tool.executed notification moved last_activity_at"
    );
    let (_, session) = server
        .call(Method::GET, "/api/v1/sessions/busy", KEY_A, None)
        .await;
    assert_eq!(session["tool_execution_count"], 1, "{session}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_over_the_write_limit_get_an_error_and_the_socket_stays() {
    let server = TestServer::start_with(
        1000,
        "[rate_limits]\nwrite_per_second = 1\nwrite_burst = 2\n",
    )
    .await;
    let created = create(&server, "lim", json!({})).await;
    let token = created["session_token"].as_str().unwrap();
    let mut ws = connect(&ws_url(&server, "lim", &format!("?token={token}")), None)
        .await
        .unwrap();
    let mut codes = Vec::new();
    for id in 1..=4 {
        let reply = request(&mut ws, id, "session.get", Value::Null).await;
        codes.push(reply["error"]["code"].as_i64().unwrap_or(0));
    }
    assert_eq!(
        codes,
        [0, 0, -32029, -32029],
        "the session's own write bucket"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = request(&mut ws, 5, "session.get", Value::Null).await;
    assert_eq!(
        reply["result"]["session_id"], "lim",
        "open, and a token came back"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_fake_a_revocation() {
    let server = TestServer::start().await;
    create(&server, "fake", json!({})).await;
    let mut ws = connect(&ws_url(&server, "fake", ""), Some(("x-api-key", KEY_A)))
        .await
        .unwrap();
    let reply = request(
        &mut ws,
        1,
        "session.terminate",
        json!({"reason": "refresh_token_reuse"}),
    )
    .await;
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    let (status, body) = server
        .call(
            Method::DELETE,
            "/api/v1/sessions/fake",
            KEY_A,
            Some(json!({"reason": "refresh_token_reuse"})),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("validation_failed"))
    );
    // A plain termination still closes with 4000.
    server
        .call(
            Method::DELETE,
            "/api/v1/sessions/fake",
            KEY_A,
            Some(json!({"reason": "done"})),
        )
        .await;
    assert_eq!(next_json(&mut ws).await["method"], "session.terminated");
    assert_eq!(close_code(&mut ws).await, 4000);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_declared_over_64_kib_is_refused_from_its_header_with_1009() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start().await;
    let created = create(&server, "big", json!({})).await;
    let token = created["session_token"].as_str().unwrap();
    let addr = server.base.trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let handshake = format!(
        "GET /api/v1/sessions/big/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    tcp.write_all(handshake.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // A masked binary frame declaring 16 MiB, and none of its payload: the
    // server must answer from the header alone.
    let mut frame = vec![0x82, 0xFF];
    frame.extend_from_slice(&(16u64 << 20).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    tcp.write_all(&frame).await.unwrap();
    let mut reply = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut reply))
        .await
        .expect("answered without waiting for the payload")
        .unwrap();
    assert_eq!(reply[0], 0x88, "a close frame: {reply:?}");
    assert_eq!(u16::from_be_bytes([reply[2], reply[3]]), 1009);
    server.stop().await;
}

/// What the server answers an upgrade request it refuses: status and body.
async fn refused_upgrade(url: &str, header: Option<(&str, &str)>) -> (StatusCode, Value) {
    let mut request = client()
        .get(url.replacen("ws", "http", 1))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_per_session_are_capped_before_the_upgrade() {
    let server =
        TestServer::start_with(1000, "[websocket]\nmax_connections_per_session = 2\n").await;
    create(&server, "cap", json!({})).await;
    create(&server, "cap-other", json!({})).await;
    let key = Some(("x-api-key", KEY_A));
    let url = ws_url(&server, "cap", "");
    let mut first = connect(&url, key).await.unwrap();
    let mut second = connect(&url, key).await.unwrap();
    let (status, body) = refused_upgrade(&url, key).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("too_many_connections")),
        "{body}"
    );
    assert_eq!(body["details"]["max_connections_per_session"], 2);
    // Per session: another session of the tenant still opens.
    let mut other = connect(&ws_url(&server, "cap-other", ""), key)
        .await
        .unwrap();
    assert_eq!(
        request(&mut other, 1, "session.get", Value::Null).await["result"]["session_id"],
        "cap-other"
    );
    // The two open ones still work; closing one frees its place.
    assert_eq!(
        request(&mut second, 1, "session.get", Value::Null).await["result"]["session_id"],
        "cap"
    );
    first.close(None).await.unwrap();
    drop(first);
    let mut reopened = None;
    for _ in 0..50 {
        match connect(&url, key).await {
            Ok(socket) => {
                reopened = Some(socket);
                break;
            }
            Err(429) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(other) => panic!("upgrade answered {other}"),
        }
    }
    let mut reopened = reopened.expect("a place came free within 5 s");
    assert_eq!(
        request(&mut reopened, 1, "session.get", Value::Null).await["result"]["session_id"],
        "cap"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_upgrade_is_charged_to_the_read_bucket_of_its_credential() {
    let server = TestServer::start_with(
        1000,
        "[rate_limits]\nread_per_second = 1\nread_burst = 3\n[websocket]\nmax_connections_per_session = 8\n",
    )
    .await;
    let created = create(&server, "charged", json!({})).await;
    let token = created["session_token"].as_str().unwrap().to_owned();
    let mut statuses = Vec::new();
    let mut open = Vec::new();
    for i in 0..5 {
        // Both token forms draw on the same (the session's) bucket.
        let answer = if i % 2 == 0 {
            connect(
                &ws_url(&server, "charged", &format!("?token={token}")),
                None,
            )
            .await
        } else {
            connect(
                &ws_url(&server, "charged", ""),
                Some(("authorization", &format!("Bearer {token}"))),
            )
            .await
        };
        statuses.push(answer.as_ref().map_or_else(|s| *s, |_| 101));
        if let Ok(socket) = answer {
            open.push(socket);
        }
    }
    assert_eq!(statuses, [101, 101, 101, 429, 429], "a read burst of 3");
    let (status, body) = refused_upgrade(
        &ws_url(&server, "charged", &format!("?token={token}")),
        None,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited"))
    );
    // A token that does not authenticate is 401 and takes nothing.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..3 {
        assert_eq!(
            connect(&ws_url(&server, "charged", "?token=est_made_up"), None)
                .await
                .err(),
            Some(401)
        );
    }
    assert!(
        connect(
            &ws_url(&server, "charged", &format!("?token={token}")),
            None
        )
        .await
        .is_ok(),
        "the refilled token was still there"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_closes_the_sockets_opened_with_the_old_token() {
    let server = TestServer::start().await;
    let created = create(&server, "rot", json!({})).await;
    let token = created["session_token"].as_str().unwrap().to_owned();
    let refresh = created["refresh_token"].as_str().unwrap().to_owned();
    let url = ws_url(&server, "rot", "");
    let bearer = format!("Bearer {token}");
    let mut by_header = connect(&url, Some(("authorization", &bearer)))
        .await
        .unwrap();
    let mut by_query = connect(&ws_url(&server, "rot", &format!("?token={token}")), None)
        .await
        .unwrap();
    let mut by_key = connect(&url, Some(("x-api-key", KEY_A))).await.unwrap();
    // A socket that rotates by its own session.refresh stays open and
    // keeps working on the new pair.
    let mut rotator = connect(&url, Some(("authorization", &bearer)))
        .await
        .unwrap();
    let reply = request(
        &mut rotator,
        1,
        "session.refresh",
        json!({"refresh_token": refresh}),
    )
    .await;
    let new_token = reply["result"]["session_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let new_refresh = reply["result"]["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(close_code(&mut by_header).await, 4003);
    assert_eq!(close_code(&mut by_query).await, 4003);
    assert_eq!(
        request(&mut by_key, 1, "session.get", Value::Null).await["result"]["status"],
        "active",
        "a key's socket stays, and the session is live"
    );
    assert_eq!(
        request(&mut rotator, 2, "session.get", Value::Null).await["result"]["session_id"],
        "rot"
    );
    // A rotation over REST closes the sockets of the token it replaced,
    // the rotating socket's included now that it holds that token.
    let new_bearer = format!("Bearer {new_token}");
    let mut by_new = connect(&url, Some(("authorization", &new_bearer)))
        .await
        .unwrap();
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/sessions/rot/refresh",
            KEY_A,
            Some(json!({"refresh_token": new_refresh})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(close_code(&mut by_new).await, 4003);
    assert_eq!(close_code(&mut rotator).await, 4003);
    assert_eq!(
        request(&mut by_key, 2, "session.get", Value::Null).await["result"]["status"],
        "active"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_socket_keeps_a_silent_session_from_idling_out() {
    let server = TestServer::start().await;
    create(&server, "quiet", json!({"idle_timeout": 2})).await;
    create(&server, "quiet-ttl", json!({"idle_timeout": 2, "ttl": 3})).await;
    create(&server, "unwatched", json!({"idle_timeout": 2})).await;
    let key = Some(("x-api-key", KEY_A));
    // The client sends nothing at all (the server's pings come every 30 s).
    let _quiet = connect(&ws_url(&server, "quiet", ""), key).await.unwrap();
    let mut quiet_ttl = connect(&ws_url(&server, "quiet-ttl", ""), key)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let status = |view: Value| view["status"].as_str().unwrap_or_default().to_owned();
    let (_, quiet) = server
        .call(Method::GET, "/api/v1/sessions/quiet", KEY_A, None)
        .await;
    assert_eq!(status(quiet), "active", "held by its open socket");
    let (_, unwatched) = server
        .call(Method::GET, "/api/v1/sessions/unwatched", KEY_A, None)
        .await;
    assert_eq!(status(unwatched.clone()), "expired", "{unwatched}");
    // The absolute ttl still ends a watched session.
    let (_, ended) = server
        .call(Method::GET, "/api/v1/sessions/quiet-ttl", KEY_A, None)
        .await;
    assert_eq!(
        (status(ended.clone()), ended["termination_reason"].as_str()),
        ("expired".to_owned(), Some("ttl_expired")),
        "{ended}"
    );
    assert_eq!(close_code(&mut quiet_ttl).await, 4001);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_by_query_token_is_charged_to_the_session_not_a_key_beside_it() {
    let server =
        TestServer::start_with(1000, "[rate_limits]\nread_per_second = 1\nread_burst = 3\n").await;
    let created = create(&server, "beside", json!({})).await;
    let token = created["session_token"].as_str().unwrap().to_owned();
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(
            connect(
                &ws_url(&server, "beside", &format!("?token={token}")),
                Some(("x-api-key", KEY_A)),
            )
            .await
            .unwrap(),
        );
    }
    // The key's own read bucket (burst 3) was not touched.
    for _ in 0..3 {
        let (status, _) = server
            .call(Method::GET, "/api/v1/sessions/beside", KEY_A, None)
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    server.stop().await;
}
