//! A cluster of real `serve` processes on one throwaway PostgreSQL: any
//! node answers for every session (forwarding to the owner, which the
//! answer names), a killed node's sessions come back through the others
//! with every acknowledged change, a rolling restart fails no call.
//!
//! Leases are two seconds, so a killed node's shards move within a few
//! seconds and the suite stays fast.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pg::TempPostgres;
use common::{ChildServer, ADMIN_KEY, KEY_A, KEY_B, TENANT_A};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const SECRET: &str = "cluster-test-secret-0123456789";
const LEASE_SECONDS: u64 = 2;
const SHARDS: u32 = 64;

/// A node's config file in `root` (the nodes share the master key file
/// there).
fn node_config(root: &Path, name: &str, pg: &TempPostgres, limit_a: usize) -> PathBuf {
    let data = root.join(name);
    std::fs::create_dir_all(&data).unwrap();
    let extra = format!(
        r#"
[postgres]
url = "{url}"
[cluster]
enabled = true
node_id = "{name}"
shards = {SHARDS}
lease_seconds = {LEASE_SECONDS}
"#,
        url = pg.url
    );
    let text =
        common::config_toml_with_storage(&data, limit_a, "durability = \"postgres\"", &extra);
    let path = root.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

async fn start_node(config: &Path) -> ChildServer {
    ChildServer::start_with_env(config, true, &[("EDGE_SESSIONS_CLUSTER_SECRET", SECRET)]).await
}

/// Three nodes, n1 to n3 (tenant A limited to `limit_a` live sessions),
/// on `pg`, once they have shared out the shards; with their base URLs and
/// a client.
async fn three_nodes(
    root: &Path,
    pg: &TempPostgres,
    limit_a: usize,
) -> (Vec<ChildServer>, Vec<String>, reqwest::Client) {
    let mut nodes = Vec::new();
    for name in ["n1", "n2", "n3"] {
        nodes.push(start_node(&node_config(root, name, pg, limit_a)).await);
    }
    let client = common::client();
    let bases: Vec<String> = nodes.iter().map(|n| n.base.clone()).collect();
    wait_balanced(&client, &bases[0], 3).await;
    (nodes, bases, client)
}

/// `GET /admin/cluster` of `base`.
async fn cluster_view(client: &reqwest::Client, base: &str) -> Value {
    let (status, body) =
        common::call(client, base, Method::GET, "/admin/cluster", ADMIN_KEY, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// Waits until `expected` nodes are alive and each owns some of the
/// shards, which all have an owner (the hand-overs after the joins are
/// over).
async fn wait_balanced(client: &reqwest::Client, base: &str, expected: usize) -> Value {
    let started = Instant::now();
    loop {
        let view = cluster_view(client, base).await;
        let alive: Vec<&Value> = view["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["status"] == "alive")
            .collect();
        let owned: u64 = alive.iter().map(|n| n["shards"].as_u64().unwrap()).sum();
        if alive.len() == expected
            && owned == u64::from(SHARDS)
            && alive.iter().all(|n| n["shards"].as_u64().unwrap() > 0)
        {
            return view;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the cluster did not settle: {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A call with tenant A's key; answers the status, the owner it names and
/// the body.
async fn call_node(
    client: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Option<String>, Value) {
    let (status, headers, body) =
        common::call_with_headers(client, base, method, path, key, body).await;
    let node = headers
        .get("x-edge-sessions-node")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, node, body)
}

/// Prints the warnings and errors the nodes logged (on a failure).
fn dump_logs(nodes: &[ChildServer]) {
    for node in nodes {
        for line in node.logs.lock().unwrap().iter() {
            let lower = line.to_ascii_lowercase();
            if lower.contains("warn") || lower.contains("error") || lower.contains("503") {
                eprintln!("{}: {line}", node.base);
            }
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens session `id`'s WebSocket at the node `base` with `key`.
async fn open_socket(
    base: &str,
    id: &str,
    key: &str,
) -> Result<
    (
        Socket,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let url = format!("{}/api/v1/sessions/{id}/ws", base.replacen("http", "ws", 1));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-api-key", key.parse().unwrap());
    tokio_tungstenite::connect_async(request).await
}

/// The next text frame as JSON, or the close code, within 10 s.
async fn next_text(socket: &mut Socket) -> Result<Value, Option<u16>> {
    use futures::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message as Frame;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .unwrap()
        {
            Some(Ok(Frame::Text(text))) => {
                return Ok(serde_json::from_str::<Value>(text.as_str()).unwrap())
            }
            Some(Ok(Frame::Close(close))) => return Err(close.map(|c| u16::from(c.code))),
            Some(Ok(_)) => continue,
            other => panic!("socket: {other:?}"),
        }
    }
}

fn execution(i: usize) -> Value {
    json!({"tool_name": format!("tool-{}", i % 3), "arguments": {"i": i}, "result": {}, "duration_ms": 3})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_answers_for_every_session_and_names_its_owner() {
    let pg = TempPostgres::start();
    let root = tempfile::tempdir().unwrap();
    let (nodes, bases, client) = three_nodes(root.path(), &pg, 1000).await;
    let view = cluster_view(&client, &bases[0]).await;
    assert_eq!(view["shards"]["total"], SHARDS);
    assert_eq!(view["node_id"], "n1");
    // The operators' views show the nodes and their shards too.
    let (status, stats) = common::call(
        &client,
        &bases[1],
        Method::GET,
        "/admin/stats",
        ADMIN_KEY,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stats["cluster"]["node_id"], "n2", "{}", stats["cluster"]);
    assert_eq!(stats["cluster"]["nodes"].as_array().unwrap().len(), 3);
    let metrics = client
        .get(format!("{}/metrics", bases[2]))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("cluster_shards_owned "),
        "cluster_shards_owned missing"
    );
    assert!(
        metrics.contains("cluster_nodes{status=\"alive\"} 3"),
        "cluster_nodes missing"
    );

    // Creates through every node, with and without a chosen id.
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..24 {
        let base = &bases[i % 3];
        let body = if i % 2 == 0 {
            json!({"session_id": format!("ses-c-{i}"), "edge_mcp_id": "edge"})
        } else {
            json!({"edge_mcp_id": "edge"})
        };
        let (status, node, created) = call_node(
            &client,
            base,
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(body),
        )
        .await;
        if status != StatusCode::CREATED {
            dump_logs(&nodes);
        }
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let node = node.expect("a create names its owner");
        owners.insert(created["session_id"].as_str().unwrap().to_owned(), node);
    }
    let distinct: std::collections::HashSet<&String> = owners.values().collect();
    assert!(
        distinct.len() >= 2,
        "sessions landed on one node only: {owners:?}"
    );

    // Every node answers every call for every session, naming the owner.
    for (n, (id, owner)) in owners.iter().enumerate() {
        for (i, base) in bases.iter().enumerate() {
            let (status, node, body) = call_node(
                &client,
                base,
                Method::GET,
                &format!("/api/v1/sessions/{id}"),
                KEY_A,
                None,
            )
            .await;
            assert_eq!(status, StatusCode::OK, "GET {id} on node {i}: {body}");
            assert_eq!(
                node.as_deref(),
                Some(owner.as_str()),
                "GET {id} on node {i}"
            );
            let (status, node, body) = call_node(
                &client,
                base,
                Method::POST,
                &format!("/api/v1/sessions/{id}/tools/execute"),
                KEY_A,
                Some(execution(i)),
            )
            .await;
            assert_eq!(
                status,
                StatusCode::NO_CONTENT,
                "execute {id} on node {i}: {body}"
            );
            assert_eq!(node.as_deref(), Some(owner.as_str()));
        }
        // Tenant isolation holds through forwarding.
        let other = &bases[(n + 1) % 3];
        let (status, _, _) = call_node(
            &client,
            other,
            Method::GET,
            &format!("/api/v1/sessions/{id}"),
            KEY_B,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "tenant B must not see {id}");
        let (status, _, metrics) = call_node(
            &client,
            other,
            Method::GET,
            &format!("/api/v1/sessions/{id}/metrics"),
            KEY_A,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(metrics["tool_execution_count"], 3, "{metrics}");
    }

    // Lists and figures on any node are complete: pages of 7 through
    // every node give each session once.
    for base in &bases {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                None => "/api/v1/sessions?limit=7".to_owned(),
                Some(c) => format!("/api/v1/sessions?limit=7&cursor={c}"),
            };
            let (status, _, page) = call_node(&client, base, Method::GET, &path, KEY_A, None).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            for s in page["sessions"].as_array().unwrap() {
                seen.push(s["session_id"].as_str().unwrap().to_owned());
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), seen.len(), "a session listed twice on {base}");
        assert_eq!(
            sorted,
            owners.keys().cloned().collect::<Vec<_>>(),
            "list on {base}"
        );
        let (_, _, page) = call_node(
            &client,
            base,
            Method::GET,
            "/api/v1/sessions?offset=20&limit=3",
            KEY_A,
            None,
        )
        .await;
        assert_eq!(page["count"], 3, "{page}");
        let (_, _, page) =
            call_node(&client, base, Method::GET, "/api/v1/sessions", KEY_B, None).await;
        assert_eq!(
            page["count"], 0,
            "tenant B sees none of A's sessions: {page}"
        );
        let (status, _, figures) = call_node(
            &client,
            base,
            Method::GET,
            "/api/v1/sessions/metrics",
            KEY_A,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{figures}");
        assert_eq!(figures["total_sessions"], 24, "{figures}");
        assert_eq!(figures["active_sessions"], 24, "{figures}");
        assert_eq!(figures["total_tool_executions"], 24 * 3, "{figures}");
        let (status, _, _) = call_node(
            &client,
            base,
            Method::GET,
            "/api/v1/sessions?limit=0",
            KEY_A,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    // An operator's calls: one session through any node, lists of every
    // node's sessions, and a bulk end carried out by every node.
    for base in &bases {
        for (id, owner) in owners.iter().take(4) {
            let response = client
                .get(format!("{base}/admin/tenants/{TENANT_A}/sessions/{id}"))
                .header("X-Admin-Key", ADMIN_KEY)
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status(),
                StatusCode::OK,
                "admin read of {id} on {base}"
            );
            assert_eq!(
                response
                    .headers()
                    .get("x-edge-sessions-node")
                    .and_then(|v| v.to_str().ok()),
                Some(owner.as_str())
            );
        }
        let mut seen = 0;
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                None => "/admin/sessions?limit=5".to_owned(),
                Some(c) => format!("/admin/sessions?limit=5&cursor={c}"),
            };
            let (status, page) =
                common::call(&client, base, Method::GET, &path, ADMIN_KEY, None).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            seen += page["count"].as_u64().unwrap();
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        assert_eq!(seen, 24, "the admin list on {base}");
    }
    let extra: Vec<String> = (0..6).map(|i| format!("ses-bulk-{i}")).collect();
    for (i, id) in extra.iter().enumerate() {
        let (status, _, body) = call_node(
            &client,
            &bases[i % 3],
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(json!({"session_id": id, "edge_mcp_id": "bulk-edge"})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, ended) = common::call(
        &client,
        &bases[2],
        Method::POST,
        "/admin/sessions/terminate",
        ADMIN_KEY,
        Some(json!({"edge_mcp_id": "bulk-edge"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{ended}");
    assert_eq!(ended["terminated"], 6, "{ended}");
    for id in &extra {
        let (_, _, read) = call_node(
            &client,
            &bases[0],
            Method::GET,
            &format!("/api/v1/sessions/{id}"),
            KEY_A,
            None,
        )
        .await;
        assert_eq!(read["status"], "terminated", "{read}");
    }

    // A forwarded call keeps the caller's request id; forwards are counted.
    let (id, owner) = owners.iter().next().unwrap();
    let other = ["n1", "n2", "n3"]
        .iter()
        .position(|n| *n != owner.as_str())
        .unwrap();
    let response = client
        .get(format!("{}/api/v1/sessions/{id}", bases[other]))
        .header("X-API-Key", KEY_A)
        .header("X-Request-Id", "trace-cluster-0042")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("trace-cluster-0042")
    );
    let metrics = client
        .get(format!("{}/metrics", bases[other]))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("cluster_forwarded_calls_total{outcome=\"sent\"}")),
        "forwarded calls are counted"
    );

    // Paging beyond one page of each node (offset + limit over 1,000)
    // reads every node page by page; bad input is refused as one node
    // refuses it.
    let (status, _, page) = call_node(
        &client,
        &bases[1],
        Method::GET,
        "/api/v1/sessions?offset=25&limit=1000",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["count"], 5, "{page}");
    assert!(page["next_cursor"].is_null());
    for body in [
        json!({"session_id": "active", "edge_mcp_id": "edge"}),
        json!({"session_id": 12, "edge_mcp_id": "edge"}),
        json!({"session_id": "no spaces", "edge_mcp_id": "edge"}),
    ] {
        let (status, _, answer) = call_node(
            &client,
            &bases[0],
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
    }

    // A WebSocket opened on a node that does not own its session works
    // (a JSON-RPC call through it), and gets the push when the session is
    // deleted through a third node; a bad token is refused as the owner
    // refuses it.
    let (ws_id, ws_owner) = owners.iter().nth(1).unwrap();
    let (opener, deleter) = {
        let index = |name: &str| ["n1", "n2", "n3"].iter().position(|n| *n == name).unwrap();
        let owner = index(ws_owner);
        ((owner + 1) % 3, (owner + 2) % 3)
    };
    match open_socket(&bases[opener], ws_id, KEY_B).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(
                response.status(),
                StatusCode::NOT_FOUND,
                "another tenant's key"
            )
        }
        other => panic!(
            "tenant B opened A's socket: {:?}",
            other.map(|(_, r)| r.status())
        ),
    }
    let (mut socket, response) = open_socket(&bases[opener], ws_id, KEY_A)
        .await
        .expect("upgrade through a non-owner");
    assert_eq!(
        response
            .headers()
            .get("x-edge-sessions-node")
            .and_then(|v| v.to_str().ok()),
        Some(ws_owner.as_str())
    );
    use futures::SinkExt as _;
    use tokio_tungstenite::tungstenite::Message as Frame;
    socket
        .send(Frame::Text(
            r#"{"jsonrpc":"2.0","id":1,"method":"session.get"}"#.into(),
        ))
        .await
        .unwrap();
    let reply = next_text(&mut socket).await.unwrap();
    assert_eq!(reply["result"]["session_id"], ws_id.as_str(), "{reply}");
    let (status, _, _) = call_node(
        &client,
        &bases[deleter],
        Method::DELETE,
        &format!("/api/v1/sessions/{ws_id}"),
        KEY_A,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let push = next_text(&mut socket).await.unwrap();
    assert_eq!(push["method"], "session.terminated", "{push}");
    assert_eq!(next_text(&mut socket).await.unwrap_err(), Some(4000));

    // A change through one node, read through another; a delete through a
    // third ends it everywhere.
    let (id, owner) = owners.iter().next().unwrap();
    let (status, _, body) = call_node(
        &client,
        &bases[1],
        Method::PATCH,
        &format!("/api/v1/sessions/{id}"),
        KEY_A,
        Some(json!({"client_name": "renamed"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, _, read) = call_node(
        &client,
        &bases[2],
        Method::GET,
        &format!("/api/v1/sessions/{id}"),
        KEY_A,
        None,
    )
    .await;
    assert_eq!(read["client_name"], "renamed");
    let (status, node, _) = call_node(
        &client,
        &bases[0],
        Method::DELETE,
        &format!("/api/v1/sessions/{id}"),
        KEY_A,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(node.as_deref(), Some(owner.as_str()));
    for base in &bases {
        let (status, _, read) = call_node(
            &client,
            base,
            Method::GET,
            &format!("/api/v1/sessions/{id}"),
            KEY_A,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(read["status"], "terminated", "{read}");
    }

    // Every acknowledged change is in PostgreSQL, written by its owner.
    assert_eq!(
        pg.scalar(&format!(
            "SELECT count(*) FROM mcp.edge_mcp_sessions WHERE tenant_id = '{TENANT_A}' AND shard IS NOT NULL"
        )),
        30
    );
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.session_tool_executions"),
        24 * 3
    );
    // The counters in the session rows follow within a coalescing delay.
    let started = Instant::now();
    while pg.scalar("SELECT coalesce(sum(tool_execution_count), 0) FROM mcp.edge_mcp_sessions")
        != 24 * 3
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the session rows' counters did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for node in nodes {
        assert!(node.terminate().success());
    }
}

/// Killed under load: the killed node's sessions answer again through the
/// others within the lease and a few seconds, and every acknowledged
/// execution is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_sessions_come_back_with_every_acknowledged_change() {
    let pg = TempPostgres::start();
    let root = tempfile::tempdir().unwrap();
    let (nodes, bases, client) = three_nodes(root.path(), &pg, 1000).await;
    let mut nodes: Vec<Option<ChildServer>> = nodes.into_iter().map(Some).collect();
    let mut owners: HashMap<String, String> = HashMap::new();
    for i in 0..60 {
        let (status, node, created) = call_node(
            &client,
            &bases[i % 3],
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(json!({"session_id": format!("ses-k-{i}"), "edge_mcp_id": "edge"})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        owners.insert(format!("ses-k-{i}"), node.unwrap());
    }
    // Load through nodes 2 and 3 while node 1 is killed: count what each
    // session got acknowledged.
    let victim = "n1";
    // Per session: (acknowledged, failed) executions. A failed one may
    // have been committed all the same (the answer was lost), never twice.
    let acked: std::sync::Arc<std::sync::Mutex<HashMap<String, (u64, u64)>>> = Default::default();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (client, bases, acked, stop) =
            (client.clone(), bases.clone(), acked.clone(), stop.clone());
        let ids: Vec<String> = owners.keys().cloned().collect();
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = &ids[i % ids.len()];
                let base = &bases[1 + i % 2];
                let (status, _, _) = call_node(
                    &client,
                    base,
                    Method::POST,
                    &format!("/api/v1/sessions/{id}/tools/execute"),
                    KEY_A,
                    Some(execution(i)),
                )
                .await;
                let mut acked = acked.lock().unwrap();
                let entry = acked.entry(id.clone()).or_default();
                if status == StatusCode::NO_CONTENT {
                    entry.0 += 1;
                } else {
                    entry.1 += 1;
                }
                i += 4;
            }
        }));
    }
    // A socket opened through another node on a session of the victim.
    let watched = owners
        .iter()
        .find(|(_, o)| *o == victim)
        .map(|(id, _)| id.clone())
        .unwrap();
    let (mut socket, _) = open_socket(&bases[1], &watched, KEY_A).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = Instant::now();
    nodes[0].take().unwrap().kill();
    // Its owner is gone: the socket closes with 1012, so the client
    // reconnects (and reaches the new owner).
    assert_eq!(next_text(&mut socket).await.unwrap_err(), Some(1012));
    // The victim's sessions answer again through the others.
    let theirs: Vec<&String> = owners
        .iter()
        .filter(|(_, o)| *o == victim)
        .map(|(id, _)| id)
        .collect();
    assert!(!theirs.is_empty());
    let mut back_after = Duration::ZERO;
    for id in &theirs {
        loop {
            let (status, node, _) = call_node(
                &client,
                &bases[1],
                Method::GET,
                &format!("/api/v1/sessions/{id}"),
                KEY_A,
                None,
            )
            .await;
            if status == StatusCode::OK && node.as_deref() != Some(victim) {
                back_after = back_after.max(killed_at.elapsed());
                break;
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(LEASE_SECONDS + 15),
                "{id} did not come back: {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!(
        "the killed node's {} sessions answered again after {back_after:?}",
        theirs.len()
    );
    // The killed node is listed as gone (after a lease without a
    // heartbeat), owning nothing; the others share every shard.
    tokio::time::sleep(Duration::from_secs(LEASE_SECONDS)).await;
    let view = cluster_view(&client, &bases[1]).await;
    let nodes_listed = view["nodes"].as_array().unwrap();
    assert_eq!(nodes_listed.len(), 3, "{view}");
    let gone = nodes_listed
        .iter()
        .find(|n| n["node_id"] == victim)
        .unwrap();
    assert_eq!(gone["status"], "gone", "{view}");
    assert_eq!(gone["shards"], 0, "{view}");
    assert!(
        gone["last_heartbeat_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{view}"
    );
    let owned: u64 = nodes_listed
        .iter()
        .map(|n| n["shards"].as_u64().unwrap())
        .sum();
    assert_eq!(owned, u64::from(SHARDS), "{view}");
    assert_eq!(view["node_id"], "n2");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    // Every acknowledged execution counted once: by the sessions' owners
    // and in PostgreSQL.
    let acked = acked.lock().unwrap().clone();
    let failed: u64 = acked.values().map(|(_, f)| f).sum();
    eprintln!(
        "executions: {} acknowledged, {failed} failed",
        acked.values().map(|(a, _)| a).sum::<u64>()
    );
    for (id, (acknowledged, failed)) in &acked {
        let (status, _, metrics) = call_node(
            &client,
            &bases[2],
            Method::GET,
            &format!("/api/v1/sessions/{id}/metrics"),
            KEY_A,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let count = metrics["tool_execution_count"].as_u64().unwrap();
        assert!(
            count >= *acknowledged && count <= acknowledged + failed,
            "{id}: {acknowledged} acknowledged, {failed} failed, {count} counted"
        );
        let stored = pg.scalar(&format!(
            "SELECT count(*) FROM mcp.session_tool_executions e JOIN mcp.edge_mcp_sessions s ON s.id = e.session_id WHERE s.session_id = '{id}'"
        )) as u64;
        assert!(
            stored >= *acknowledged && stored <= acknowledged + failed && stored == count,
            "{id}: {stored} in PostgreSQL, {count} counted, {acknowledged} acknowledged, {failed} failed"
        );
    }
    for node in nodes.into_iter().flatten() {
        assert!(node.terminate().success());
    }
}

/// A rolling restart (SIGTERM, start again, next node) while a client
/// works through the other nodes: no call fails, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_fails_no_call_and_loses_nothing() {
    let pg = TempPostgres::start();
    let root = tempfile::tempdir().unwrap();
    let configs: Vec<PathBuf> = ["n1", "n2", "n3"]
        .iter()
        .map(|name| node_config(root.path(), name, &pg, 1000))
        .collect();
    let mut logs = Vec::new();
    let mut nodes = Vec::new();
    for config in &configs {
        nodes.push(Some(start_node(config).await));
    }
    let client = common::client();
    let bases = std::sync::Arc::new(std::sync::Mutex::new(
        nodes
            .iter()
            .flatten()
            .map(|n| n.base.clone())
            .collect::<Vec<String>>(),
    ));
    let first = bases.lock().unwrap()[0].clone();
    wait_balanced(&client, &first, 3).await;
    let ids: Vec<String> = (0..30).map(|i| format!("ses-r-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let base = bases.lock().unwrap()[i % 3].clone();
        let (status, _, body) = call_node(
            &client,
            &base,
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(json!({"session_id": id, "edge_mcp_id": "edge"})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    // The client: executions and reads through every node but the one
    // being restarted (`avoid`).
    let avoid = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let executed: std::sync::Arc<std::sync::Mutex<HashMap<String, u64>>> = Default::default();
    let failures: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let mut workers = Vec::new();
    for w in 0..3 {
        let (client, bases, avoid, stop, executed, failures, ids) = (
            client.clone(),
            bases.clone(),
            avoid.clone(),
            stop.clone(),
            executed.clone(),
            failures.clone(),
            ids.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let skip = avoid.load(std::sync::atomic::Ordering::Acquire);
                let node = (0..3).map(|k| (i + k) % 3).find(|k| *k != skip).unwrap();
                let base = bases.lock().unwrap()[node].clone();
                let id = &ids[i % ids.len()];
                let (status, _, body) = if i % 2 == 0 {
                    call_node(
                        &client,
                        &base,
                        Method::POST,
                        &format!("/api/v1/sessions/{id}/tools/execute"),
                        KEY_A,
                        Some(execution(i)),
                    )
                    .await
                } else {
                    call_node(
                        &client,
                        &base,
                        Method::GET,
                        &format!("/api/v1/sessions/{id}"),
                        KEY_A,
                        None,
                    )
                    .await
                };
                if status.is_success() {
                    if i % 2 == 0 {
                        *executed.lock().unwrap().entry(id.clone()).or_default() += 1;
                    }
                } else {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{status} on node {node}: {body}"));
                }
                i += 3;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for k in 0..3 {
        avoid.store(k, std::sync::atomic::Ordering::Release);
        // Calls already sent to it finish first.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let node = nodes[k].take().unwrap();
        logs.push(node.logs.clone());
        let status = node.terminate();
        assert!(status.success(), "node {k} exited with {status}");
        let restarted = start_node(&configs[k]).await;
        bases.lock().unwrap()[k] = restarted.base.clone();
        nodes[k] = Some(restarted);
        let any = bases.lock().unwrap()[(k + 1) % 3].clone();
        wait_balanced(&client, &any, 3).await;
        avoid.store(usize::MAX, std::sync::atomic::Ordering::Release);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    if !failures.is_empty() {
        logs.extend(nodes.iter().flatten().map(|n| n.logs.clone()));
        for failure in &failures {
            let Some(id) = failure
                .split("request_id\":\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
            else {
                continue;
            };
            for node_logs in &logs {
                for line in node_logs.lock().unwrap().iter().filter(|l| l.contains(id)) {
                    eprintln!("{line}");
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} calls failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    // Nothing lost: every acknowledged execution is counted.
    let executed = executed.lock().unwrap().clone();
    let base = bases.lock().unwrap()[0].clone();
    for (id, count) in &executed {
        let (status, _, metrics) = call_node(
            &client,
            &base,
            Method::GET,
            &format!("/api/v1/sessions/{id}/metrics"),
            KEY_A,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            metrics["tool_execution_count"].as_u64(),
            Some(*count),
            "{id}: {metrics}"
        );
    }
    eprintln!(
        "rolling restart: {} executions acknowledged, none failed",
        executed.values().sum::<u64>()
    );
    for node in nodes.into_iter().flatten() {
        assert!(node.terminate().success());
    }
}

/// A tenant's limit holds across the cluster: limit 30, 90 concurrent
/// creates spread over three nodes, exactly 30 admitted (and 30 live in
/// PostgreSQL); after some end, as many can be created again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_limit_holds_across_the_cluster() {
    let pg = TempPostgres::start();
    let root = tempfile::tempdir().unwrap();
    let (nodes, bases, client) = three_nodes(root.path(), &pg, 30).await;
    let creates = (0..90).map(|i| {
        let (client, base) = (client.clone(), bases[i % 3].clone());
        async move {
            call_node(
                &client,
                &base,
                Method::POST,
                "/api/v1/sessions",
                KEY_A,
                Some(json!({"edge_mcp_id": "edge"})),
            )
            .await
        }
    });
    let answers = futures::future::join_all(creates).await;
    let created: Vec<String> = answers
        .iter()
        .filter(|(status, _, _)| *status == StatusCode::CREATED)
        .map(|(_, _, body)| body["session_id"].as_str().unwrap().to_owned())
        .collect();
    for (status, _, body) in &answers {
        assert!(
            *status == StatusCode::CREATED
                || (*status == StatusCode::TOO_MANY_REQUESTS
                    && body["code"] == "tenant_session_limit"),
            "{status}: {body}"
        );
    }
    assert_eq!(created.len(), 30, "exactly the limit is admitted");
    assert_eq!(
        pg.scalar(&format!(
            "SELECT count(*) FROM mcp.edge_mcp_sessions WHERE tenant_id = '{TENANT_A}' AND status IN ('active', 'idle')"
        )),
        30
    );
    // Another tenant is not limited by A's sessions.
    let (status, _, _) = call_node(
        &client,
        &bases[1],
        Method::POST,
        "/api/v1/sessions",
        KEY_B,
        Some(json!({"edge_mcp_id": "edge"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    // Five end (through any node); five more fit, and no more.
    for (i, id) in created.iter().take(5).enumerate() {
        let (status, _, _) = call_node(
            &client,
            &bases[i % 3],
            Method::DELETE,
            &format!("/api/v1/sessions/{id}"),
            KEY_A,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    // The room they leave is found again (reservations nobody uses go
    // back within a lease), and not more.
    let mut again = 0;
    let started = Instant::now();
    let mut i = 0;
    while again < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "only {again} of 5 created again"
        );
        let (status, _, body) = call_node(
            &client,
            &bases[i % 3],
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(json!({"edge_mcp_id": "edge"})),
        )
        .await;
        match status {
            StatusCode::CREATED => again += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(body["code"], "tenant_session_limit");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("{other}: {body}"),
        }
        i += 1;
    }
    for base in &bases {
        let (status, _, body) = call_node(
            &client,
            base,
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(json!({"edge_mcp_id": "edge"})),
        )
        .await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    }
    assert_eq!(
        pg.scalar(&format!(
            "SELECT count(*) FROM mcp.edge_mcp_sessions WHERE tenant_id = '{TENANT_A}' AND status IN ('active', 'idle')"
        )),
        25 + again
    );
    for node in nodes {
        assert!(node.terminate().success());
    }
}

fn signal(node: &ChildServer, signal: &str) {
    let pid = node.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap()
        .success());
}

/// An owner frozen (SIGSTOP) past its lease loses its shards; changes made
/// through the others meanwhile stay: once woken (SIGCONT) it never
/// answers from its stale state, and never overwrites PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_owner_woken_up_never_answers_stale_nor_overwrites() {
    let pg = TempPostgres::start();
    let root = tempfile::tempdir().unwrap();
    let (nodes, bases, client) = three_nodes(root.path(), &pg, 1000).await;
    let mut frozen_ids = Vec::new();
    for i in 0..30 {
        let id = format!("ses-f-{i}");
        let (status, node, body) = call_node(
            &client,
            &bases[i % 3],
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(json!({"session_id": id, "edge_mcp_id": "edge", "client_name": "before"})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        if node.as_deref() == Some("n1") {
            frozen_ids.push(id);
        }
    }
    assert!(!frozen_ids.is_empty());
    signal(&nodes[0], "-STOP");
    // Through the others, once they took the shards over: every session
    // of the frozen node is changed.
    let started = Instant::now();
    for id in &frozen_ids {
        loop {
            let (status, node, body) = call_node(
                &client,
                &bases[1],
                Method::PATCH,
                &format!("/api/v1/sessions/{id}"),
                KEY_A,
                Some(json!({"client_name": "after"})),
            )
            .await;
            if status == StatusCode::OK {
                assert_ne!(node.as_deref(), Some("n1"));
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(LEASE_SECONDS + 15),
                "{id}: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    signal(&nodes[0], "-CONT");
    // Asked directly, the woken node answers the new state (forwarded to
    // the new owner) or, while it catches up, 503: never the old one.
    let woke = Instant::now();
    while woke.elapsed() < Duration::from_secs(3) {
        for id in &frozen_ids {
            let (status, _, body) = call_node(
                &client,
                &bases[0],
                Method::GET,
                &format!("/api/v1/sessions/{id}"),
                KEY_A,
                None,
            )
            .await;
            match status {
                StatusCode::OK => {
                    assert_eq!(body["client_name"], "after", "{id} answered stale: {body}")
                }
                StatusCode::SERVICE_UNAVAILABLE => {}
                other => panic!("{id}: {other} {body}"),
            }
        }
    }
    // PostgreSQL keeps the changes: the woken node wrote nothing over them.
    tokio::time::sleep(Duration::from_secs(LEASE_SECONDS)).await;
    for id in &frozen_ids {
        let name = pg.psql(&format!(
            "SELECT client_name FROM mcp.edge_mcp_sessions WHERE session_id = '{id}'"
        ));
        assert!(
            name.contains("after") && !name.contains("before"),
            "{id}: {name}"
        );
    }
    for node in nodes {
        assert!(node.terminate().success());
    }
}

/// A node that joins later gets shards, and every session stays reachable
/// through every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joining_later_gets_shards_and_every_session_stays_reachable() {
    let pg = TempPostgres::start();
    let root = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for name in ["n1", "n2"] {
        nodes.push(start_node(&node_config(root.path(), name, &pg, 1000)).await);
    }
    let client = common::client();
    wait_balanced(&client, &nodes[0].base, 2).await;
    let ids: Vec<String> = (0..40).map(|i| format!("ses-j-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let (status, _, body) = call_node(
            &client,
            &nodes[i % 2].base,
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(json!({"session_id": id, "edge_mcp_id": "edge"})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    // Some end before the join: they stay readable wherever their shard
    // goes (within the retention).
    let ended: Vec<&String> = ids.iter().step_by(4).collect();
    for id in &ended {
        let (status, _, _) = call_node(
            &client,
            &nodes[0].base,
            Method::DELETE,
            &format!("/api/v1/sessions/{id}"),
            KEY_A,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    nodes.push(start_node(&node_config(root.path(), "n3", &pg, 1000)).await);
    let view = wait_balanced(&client, &nodes[2].base, 3).await;
    let n3 = view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == "n3")
        .unwrap()
        .clone();
    assert!(n3["shards"].as_u64().unwrap() > 0, "{view}");
    let mut on_n3 = 0;
    for id in &ids {
        for node in &nodes {
            let (status, owner, body) = call_node(
                &client,
                &node.base,
                Method::GET,
                &format!("/api/v1/sessions/{id}"),
                KEY_A,
                None,
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{id} on {}: {body}", node.base);
            let expected = if ended.contains(&id) {
                "terminated"
            } else {
                "active"
            };
            assert_eq!(body["status"], expected, "{id} on {}: {body}", node.base);
            if owner.as_deref() == Some("n3") && node.base == nodes[2].base {
                on_n3 += 1;
            }
        }
    }
    assert!(on_n3 > 0, "the new node owns none of the sessions");
    for node in nodes {
        assert!(node.terminate().success());
    }
}

/// PostgreSQL restarted while the cluster works: no acknowledged change is
/// lost, and the cluster answers again without anyone stepping in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_loses_no_acknowledged_change() {
    let pg = TempPostgres::start_own();
    let root = tempfile::tempdir().unwrap();
    let (nodes, bases, client) = three_nodes(root.path(), &pg, 1000).await;
    let ids: Vec<String> = (0..15).map(|i| format!("ses-p-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let (status, _, body) = call_node(
            &client,
            &bases[i % 3],
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(json!({"session_id": id, "edge_mcp_id": "edge"})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let acked: std::sync::Arc<std::sync::Mutex<HashMap<String, (u64, u64)>>> = Default::default();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..3 {
        let (client, bases, acked, stop, ids) = (
            client.clone(),
            bases.clone(),
            acked.clone(),
            stop.clone(),
            ids.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = &ids[i % ids.len()];
                let (status, _, _) = call_node(
                    &client,
                    &bases[i % 3],
                    Method::POST,
                    &format!("/api/v1/sessions/{id}/tools/execute"),
                    KEY_A,
                    Some(execution(i)),
                )
                .await;
                let ok = status == StatusCode::NO_CONTENT;
                {
                    let mut acked = acked.lock().unwrap();
                    let entry = acked.entry(id.clone()).or_default();
                    if ok {
                        entry.0 += 1;
                    } else {
                        entry.1 += 1;
                    }
                }
                if !ok {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                i += 3;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.stop();
    tokio::time::sleep(Duration::from_secs(LEASE_SECONDS + 1)).await;
    pg.restart();
    // The cluster answers again on its own.
    let back = Instant::now();
    loop {
        let (status, _, _) = call_node(
            &client,
            &bases[0],
            Method::GET,
            &format!("/api/v1/sessions/{}", ids[0]),
            KEY_A,
            None,
        )
        .await;
        if status == StatusCode::OK {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "the cluster did not come back: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "the cluster answered again {:?} after PostgreSQL came back",
        back.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    for (id, (acknowledged, failed)) in &acked {
        let stored = pg.scalar(&format!(
            "SELECT count(*) FROM mcp.session_tool_executions e JOIN mcp.edge_mcp_sessions s ON s.id = e.session_id WHERE s.session_id = '{id}'"
        )) as u64;
        assert!(
            stored >= *acknowledged && stored <= acknowledged + failed,
            "{id}: {acknowledged} acknowledged, {failed} failed, {stored} stored"
        );
        let (status, _, metrics) = call_node(
            &client,
            &bases[1],
            Method::GET,
            &format!("/api/v1/sessions/{id}/metrics"),
            KEY_A,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            metrics["tool_execution_count"].as_u64(),
            Some(stored),
            "{id}: {metrics}"
        );
    }
    for node in nodes {
        assert!(node.terminate().success());
    }
}

/// A session expires once, on its owner: one `expired` audit row, one
/// `session.expired` push, through whichever node the socket was opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_expires_once_on_its_owner() {
    let pg = TempPostgres::start();
    let root = tempfile::tempdir().unwrap();
    let (nodes, bases, client) = three_nodes(root.path(), &pg, 1000).await;
    let (status, owner, _) = call_node(
        &client,
        &bases[0],
        Method::POST,
        "/api/v1/sessions",
        KEY_A,
        Some(json!({"session_id": "ses-short", "edge_mcp_id": "edge", "ttl": 2})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let owner = owner.unwrap();
    // Its socket, through a node that does not own it.
    let opener = bases
        .iter()
        .zip(["n1", "n2", "n3"])
        .find(|(_, name)| *name != owner)
        .map(|(base, _)| base.clone())
        .unwrap();
    let (mut socket, _) = open_socket(&opener, "ses-short", KEY_A).await.unwrap();
    let mut pushes = Vec::new();
    let close = loop {
        match next_text(&mut socket).await {
            Ok(push) => pushes.push(push["method"].as_str().unwrap_or_default().to_owned()),
            Err(code) => break code,
        }
    };
    assert_eq!(close, Some(4001), "expired: {pushes:?}");
    assert_eq!(
        pushes.iter().filter(|m| *m == "session.expired").count(),
        1,
        "{pushes:?}"
    );
    let (_, _, read) = call_node(
        &client,
        &bases[2],
        Method::GET,
        "/api/v1/sessions/ses-short",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(read["status"], "expired", "{read}");
    // One audit row, in PostgreSQL, however many nodes there are.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        pg.scalar(
            "SELECT count(*) FROM mcp.session_audit_log a JOIN mcp.edge_mcp_sessions s ON s.id = a.session_id \
             WHERE s.session_id = 'ses-short' AND a.action = 'expired'"
        ),
        1
    );
    for node in nodes {
        assert!(node.terminate().success());
    }
}

/// A cluster refuses to start on what it cannot keep: a durability other
/// than `postgres` (exit 2, naming storage.durability), no secret (naming
/// cluster.secret_file).
#[test]
fn a_cluster_node_refuses_a_config_it_cannot_keep() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("n1");
    let cluster =
        "[postgres]\nurl = \"postgres://edge@127.0.0.1:1/edge\"\n[cluster]\nenabled = true\n";
    let cases = [
        (
            "durability = \"sync\"",
            vec![("EDGE_SESSIONS_CLUSTER_SECRET", SECRET)],
            "storage.durability",
        ),
        ("durability = \"postgres\"", vec![], "cluster.secret_file"),
        (
            "durability = \"postgres\"",
            vec![("EDGE_SESSIONS_CLUSTER_SECRET", "short")],
            "cluster.secret_file",
        ),
    ];
    for (storage, env, key) in cases {
        let path = root.path().join("refused.toml");
        std::fs::write(
            &path,
            common::config_toml_with_storage(&data, 10, storage, cluster),
        )
        .unwrap();
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_edge-sessions"));
        command
            .args(["serve", "--config"])
            .arg(&path)
            .env_remove("EDGE_SESSIONS_CLUSTER_SECRET");
        for (name, value) in &env {
            command.env(name, value);
        }
        let out = command.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{storage} {env:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{key} not named: {stderr}");
    }
}

/// `/readyz` answers 503 until the node has joined (here: PostgreSQL does
/// not answer), while `/healthz` answers from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_not_ready_until_it_has_joined() {
    let root = tempfile::tempdir().unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = root.path().join("n1");
    std::fs::create_dir_all(&data).unwrap();
    let extra = format!(
        "[postgres]\nurl = \"postgres://edge@127.0.0.1:{port}/edge\"\nconnect_timeout_ms = 200\n[cluster]\nenabled = true\nnode_id = \"n1\"\nlease_seconds = {LEASE_SECONDS}\n"
    );
    let path = root.path().join("n1.toml");
    std::fs::write(
        &path,
        common::config_toml_with_storage(&data, 10, "durability = \"postgres\"", &extra),
    )
    .unwrap();
    let node =
        ChildServer::start_with_env(&path, false, &[("EDGE_SESSIONS_CLUSTER_SECRET", SECRET)])
            .await;
    let client = common::client();
    for _ in 0..10 {
        let response = client
            .get(format!("{}/readyz", node.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        // The contract's error body, as every 5xx has.
        let body: Value = response.json().await.unwrap();
        assert!(body["code"].is_string(), "{body}");
        let health = client
            .get(format!("{}/healthz", node.base))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.kill();
}
