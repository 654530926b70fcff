//! The dashboard in a real headless browser (Debian's `chromium`, driven
//! over its DevTools protocol): the page loads with no key, takes the admin
//! key, opens the stats WebSocket with a ticket, and the live-session count
//! it shows follows the sessions created meanwhile. A screenshot is saved as
//! `target/test-artifacts/dashboard.png`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless chromium, killed on drop.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    devtools: String,
}

impl Browser {
    fn start() -> Self {
        let binary = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
            .unwrap_or_else(|| panic!("no chromium: install Debian's `chromium` package (apt-get install chromium); .ci/run does"));
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let devtools = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium prints its DevTools address");
        Browser {
            child,
            _profile: profile,
            devtools,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DevTools protocol connection.
struct Cdp {
    socket: Socket,
    next: u64,
}

impl Cdp {
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.socket
            .send(Message::Text(message.to_string().into()))
            .await
            .unwrap();
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .expect("DevTools answers")
                .unwrap()
                .unwrap();
            if let Message::Text(text) = frame {
                let value: Value = serde_json::from_str(text.as_str()).unwrap();
                if value["id"] == id {
                    assert!(value.get("error").is_none(), "{method}: {value}");
                    return value["result"].clone();
                }
            }
        }
    }

    async fn eval(&mut self, session: &str, expression: &str) -> Value {
        let result = self
            .call(
                Some(session),
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until it equals `expected` (10 s at most).
    async fn wait_for(&mut self, session: &str, expression: &str, expected: &Value) -> Value {
        let started = Instant::now();
        loop {
            let value = self.eval(session, expression).await;
            if &value == expected || started.elapsed() > Duration::from_secs(10) {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_sessions_in_a_real_browser() {
    let server = TestServer::start().await;
    for i in 0..2 {
        let (status, _) = server
            .call(
                Method::POST,
                "/api/v1/sessions",
                KEY_A,
                Some(json!({"session_id": format!("d-{i}"), "edge_mcp_id": "e"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    // The page itself needs no key and holds no data.
    let page = server
        .client
        .get(format!("{}/admin/dashboard", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "self-contained: no CDN"
    );

    let browser = Browser::start();
    let (socket, _) = tokio_tungstenite::connect_async(browser.devtools.as_str())
        .await
        .unwrap();
    let mut cdp = Cdp { socket, next: 0 };
    let target = cdp
        .call(
            None,
            "Target.createTarget",
            json!({"url": format!("{}/admin/dashboard", server.base)}),
        )
        .await;
    let attached = cdp
        .call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        )
        .await;
    let session = attached["sessionId"].as_str().unwrap().to_owned();
    let ready = cdp
        .wait_for(
            &session,
            "location.pathname === '/admin/dashboard' && document.readyState === 'complete' && !!document.getElementById('live-sessions')",
            &json!(true),
        )
        .await;
    assert_eq!(ready, true, "the page loaded (not the initial about:blank)");
    assert_eq!(
        cdp.eval(
            &session,
            "document.getElementById('live-sessions').textContent"
        )
        .await,
        "—"
    );

    cdp.eval(
        &session,
        &format!("document.getElementById('admin-key').value = {ADMIN_KEY:?}; document.getElementById('login').requestSubmit(); true"),
    )
    .await;
    let shown = cdp
        .wait_for(
            &session,
            "document.getElementById('live-sessions').textContent",
            &json!("2"),
        )
        .await;
    assert_eq!(shown, "2", "the page shows the live sessions");
    assert_eq!(
        cdp.eval(&session, "document.getElementById('status').textContent")
            .await,
        "live"
    );

    for i in 2..5 {
        server
            .call(
                Method::POST,
                "/api/v1/sessions",
                KEY_A,
                Some(json!({"session_id": format!("d-{i}"), "edge_mcp_id": "e"})),
            )
            .await;
    }
    server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_B,
            Some(json!({"session_id": "d-b", "edge_mcp_id": "e"})),
        )
        .await;
    let shown = cdp
        .wait_for(
            &session,
            "document.getElementById('live-sessions').textContent",
            &json!("6"),
        )
        .await;
    assert_eq!(shown, "6", "the number follows new sessions");
    let top = cdp
        .wait_for(
            &session,
            "document.querySelector('#tenants tr td').textContent",
            &json!(TENANT_A),
        )
        .await;
    assert_eq!(top, TENANT_A, "top tenant by live sessions first");
    let shards = cdp
        .eval(&session, "document.querySelectorAll('#shards tr').length")
        .await;
    assert!(shards.as_u64().unwrap() >= 1);

    // Load for a few seconds (bounded, to 127.0.0.1): the charts, the rates
    // and the top tools follow it.
    let load_until = Instant::now() + Duration::from_secs(4);
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (client, base) = (server.client.clone(), server.base.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while Instant::now() < load_until {
                    let id = format!("d-{}", (w + i) % 5);
                    let (path, body) = if i % 3 == 0 {
                        (format!("/api/v1/sessions/{id}/tools/execute"), Some(json!({"tool_name": if i % 2 == 0 { "grep" } else { "bash" }, "duration_ms": 5})))
                    } else {
                        (format!("/api/v1/sessions/{id}"), None)
                    };
                    let method = if body.is_some() { Method::POST } else { Method::GET };
                    call(&client, &base, method, &path, KEY_A, body).await;
                    if i % 50 == 0 {
                        call(&client, &base, Method::GET, "/api/v1/sessions/nope", KEY_A, None).await;
                    }
                    i += 1;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let top_tool = cdp
        .wait_for(
            &session,
            "['grep', 'bash'].includes(document.querySelector('#top-tools tr td')?.textContent)",
            &json!(true),
        )
        .await;
    assert_eq!(top_tool, true, "the top tools table");
    let charted = cdp
        .eval(
            &session,
            "samples.some((s) => s.ops_per_second > 0 && s.tool_executions_per_second > 0 && s.client_errors_per_second > 0 && s.p99_ms !== null)",
        )
        .await;
    assert_eq!(charted, true, "the samples hold the load");

    let shot = cdp
        .call(
            Some(&session),
            "Page.captureScreenshot",
            json!({"format": "png"}),
        )
        .await;
    let png = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        shot["data"].as_str().unwrap(),
    )
    .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dashboard.png"), png).unwrap();

    // With no traffic, p99 shows a dash, not the last figure.
    let quiet = cdp
        .wait_for(
            &session,
            "document.getElementById('p99').textContent",
            &json!("—"),
        )
        .await;
    assert_eq!(quiet, "—");

    // The history is the server's: a reloaded page draws it at once.
    let kept = cdp.eval(&session, "samples.length").await.as_u64().unwrap();
    assert!(kept >= 4, "{kept} samples");
    cdp.eval(&session, "location.reload(); true").await;
    cdp.wait_for(
        &session,
        "document.readyState === 'complete' && typeof samples !== 'undefined' && samples.length === 0",
        &json!(true),
    )
    .await;
    cdp.eval(
        &session,
        &format!("document.getElementById('admin-key').value = {ADMIN_KEY:?}; document.getElementById('login').requestSubmit(); true"),
    )
    .await;
    let restored = cdp
        .wait_for(&session, &format!("samples.length >= {kept}"), &json!(true))
        .await;
    assert_eq!(restored, true, "the history came back from the server");

    // The session browser: search, inspect, terminate with a confirmation.
    cdp.eval(
        &session,
        "document.getElementById('q-id').value = 'd-'; document.getElementById('q-status').value = 'active'; document.getElementById('search').requestSubmit(); true",
    )
    .await;
    let found = cdp
        .wait_for(
            &session,
            "document.getElementById('search-status').textContent",
            &json!("6 session(s)"),
        )
        .await;
    assert_eq!(found, "6 session(s)");
    cdp.eval(
        &session,
        "[...document.querySelectorAll('#sessions tr')].find((r) => r.cells[0].textContent === 'd-1').querySelector('button').click(); true",
    )
    .await;
    let inspected = cdp
        .wait_for(
            &session,
            "document.getElementById('inspect').textContent.includes('\"session_id\": \"d-1\"')",
            &json!(true),
        )
        .await;
    assert_eq!(inspected, true);
    // Declining the confirmation changes nothing; accepting terminates.
    cdp.eval(
        &session,
        "window.confirm = () => false; [...document.querySelectorAll('#sessions tr')].find((r) => r.cells[0].textContent === 'd-1').querySelector('button.danger').click(); true",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, d1) = server
        .call(Method::GET, "/api/v1/sessions/d-1", KEY_A, None)
        .await;
    assert_eq!(d1["status"], "active", "declined: nothing changed");
    cdp.eval(
        &session,
        "window.confirm = () => true; [...document.querySelectorAll('#sessions tr')].find((r) => r.cells[0].textContent === 'd-1').querySelector('button.danger').click(); true",
    )
    .await;
    let after = cdp
        .wait_for(
            &session,
            "document.getElementById('search-status').textContent",
            &json!("5 session(s)"),
        )
        .await;
    assert_eq!(after, "5 session(s)", "the list is searched again");
    let (_, d1) = server
        .call(Method::GET, "/api/v1/sessions/d-1", KEY_A, None)
        .await;
    assert_eq!(
        (d1["status"].as_str(), d1["termination_reason"].as_str()),
        (Some("terminated"), Some("admin_request"))
    );

    // A wrong key is refused, and a ticket works once.
    let bad = cdp.eval(&session, "fetch('/admin/tickets', {method: 'POST', headers: {'X-Admin-Key': 'nope'}}).then(r => r.status)").await;
    assert_eq!(bad, 401);
    drop(browser);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_answer_the_contract_fields_and_tickets_are_single_use() {
    let server = TestServer::start().await;
    for i in 0..3 {
        server
            .call(
                Method::POST,
                "/api/v1/sessions",
                KEY_A,
                Some(json!({"session_id": format!("s-{i}"), "edge_mcp_id": "e"})),
            )
            .await;
        server
            .call(Method::GET, &format!("/api/v1/sessions/s-{i}"), KEY_A, None)
            .await;
    }
    let (status, stats) = server
        .call(Method::GET, "/admin/stats", ADMIN_KEY, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(stats["uptime_seconds"].is_u64());
    assert_eq!(stats["sessions"]["live"], 3);
    assert_eq!(stats["sessions"]["idle"], 0);
    let shards = stats["shards"].as_array().unwrap();
    assert!(!shards.is_empty());
    for field in ["id", "live_actors", "mailbox_depth", "ops_per_second"] {
        assert!(shards[0].get(field).is_some(), "{field}");
    }
    for p in ["p50", "p99", "p999"] {
        assert!(shards[0]["latency_ms"][p].is_number());
    }
    let actors: i64 = shards
        .iter()
        .map(|s| s["live_actors"].as_i64().unwrap())
        .sum();
    assert_eq!(actors, 3);
    let gets: u64 = shards
        .iter()
        .flat_map(|s| s["operations"].as_array().unwrap().clone())
        .filter(|o| o["operation"] == "get")
        .map(|o| o["count"].as_u64().unwrap())
        .sum();
    assert!(gets >= 3, "per-operation latency counts the GETs");
    assert_eq!(stats["tenants"][0]["tenant_id"], TENANT_A);
    assert_eq!(stats["tenants"][0]["live_sessions"], 3);
    for field in ["queue_depth", "flush_lag_ms", "last_flush_at"] {
        assert!(stats["write_behind"].get(field).is_some(), "{field}");
    }
    assert!(stats["process"]["rss_bytes"].as_u64().unwrap() > 0);
    let (status, _) = server.call(Method::GET, "/admin/stats", KEY_A, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The stats WebSocket: with the header, or with a single-use ticket.
    let ws_base = server.base.replacen("http", "ws", 1);
    let (_, ticket) = server
        .call(Method::POST, "/admin/tickets", ADMIN_KEY, None)
        .await;
    let ticket = ticket["ticket"].as_str().unwrap().to_owned();
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("{ws_base}/admin/stats/ws?ticket={ticket}"))
            .await
            .unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let pushed: Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
    assert_eq!(pushed["sessions"]["live"], 3);
    let again =
        tokio_tungstenite::connect_async(format!("{ws_base}/admin/stats/ws?ticket={ticket}")).await;
    match again {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 401, "a ticket works once")
        }
        other => panic!("a used ticket must be refused with 401, got {other:?}"),
    }
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "{ws_base}/admin/stats/ws"
        ))
        .unwrap();
    request
        .headers_mut()
        .insert("x-admin-key", ADMIN_KEY.parse().unwrap());
    assert!(tokio_tungstenite::connect_async(request).await.is_ok());
    server.stop().await;
}
