//! The PostgreSQL tier against a real, throwaway PostgreSQL (see
//! `common::pg`): migrations, rows for what was done over HTTP, an outage in
//! the middle of a run, a SIGKILL with a full outbox, a rebuild from
//! PostgreSQL into an empty data dir, `durability = "postgres"`, and a
//! server that cannot be reached.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::pg::TempPostgres;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn postgres_section(url: &str, extra: &str) -> String {
    format!("[postgres]\nurl = {url:?}\n{extra}\n")
}

fn write_config(dir: &Path, data: &str, storage: &str, postgres: &str) -> PathBuf {
    let path = dir.join(format!("{data}.toml"));
    std::fs::write(
        &path,
        config_toml_with_storage(&dir.join(data), 1000, storage, postgres),
    )
    .unwrap();
    path
}

fn migrate(url: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-sessions"))
        .arg("migrate")
        .args(args)
        .env("EDGE_SESSIONS__POSTGRES__URL", url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "migrate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn create(client: &reqwest::Client, base: &str, id: &str) {
    let body = json!({"session_id": id, "edge_mcp_id": "edge", "client_type": "claude-code",
                      "passthrough_auth": {"credentials": {"github": {"type": "bearer", "token": "ghp_secret"}}},
                      "metadata": {"k": "v"}});
    let (status, body) = create_with(client, base, body).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

async fn execute(client: &reqwest::Client, base: &str, id: &str, failed: bool) -> StatusCode {
    let body = json!({"tool_name": if failed { "grep" } else { "read" }, "tokens_used": 3,
                      "duration_ms": 7, "arguments": {"q": id},
                      "error": if failed { json!("boom") } else { json!(null) }});
    let path = format!("/api/v1/sessions/{id}/tools/execute");
    call(client, base, Method::POST, &path, KEY_A, Some(body))
        .await
        .0
}

async fn flush(client: &reqwest::Client, base: &str) -> (StatusCode, Value) {
    call(client, base, Method::POST, "/admin/flush", ADMIN_KEY, None).await
}

fn indexes_of(pg: &TempPostgres) -> String {
    pg.psql("SELECT indexname FROM pg_indexes WHERE schemaname = 'mcp' ORDER BY 1")
}

#[test]
fn migrations_go_up_down_and_up_again() {
    let pg = TempPostgres::start();
    let status = migrate(&pg.url, &["status"]);
    assert!(
        status.contains("0001 edge mcp sessions: pending"),
        "{status}"
    );
    migrate(&pg.url, &["up"]);
    migrate(&pg.url, &["up"]); // a no-op the second time
    let tables = pg.psql("\\dt mcp.*");
    for table in [
        "edge_mcp_sessions",
        "session_tool_executions",
        "session_audit_log",
    ] {
        assert!(tables.contains(table), "{table} missing from {tables}");
    }
    assert_eq!(pg.scalar("SELECT count(*) FROM mcp.session_metrics"), 0);
    assert!(migrate(&pg.url, &["status"]).contains(": applied"));

    // The live-session index recovery reads is there, the per-activity
    // ones are not (so a tool call's update can stay on its page).
    let indexes = indexes_of(&pg);
    assert!(indexes.contains("edge_mcp_sessions_live_idx"), "{indexes}");
    assert!(!indexes.contains("last_activity"), "{indexes}");

    // The cluster's tables (migration 0004).
    let cluster_tables = || {
        pg.scalar("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'mcp' AND table_name IN ('cluster', 'cluster_nodes', 'cluster_shards')")
    };
    assert_eq!(cluster_tables(), 3);

    // The sessions' cluster shard (0005), indexed for live rows only.
    assert!(indexes_of(&pg).contains("edge_mcp_sessions_shard_live_idx"));

    // The cluster's quota reservations (0006).
    let quota_table = || {
        pg.scalar("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'mcp' AND table_name = 'cluster_quota'")
    };
    assert_eq!(quota_table(), 1);

    // The index of a shard's ended sessions (0007).
    assert!(indexes_of(&pg).contains("edge_mcp_sessions_shard_ended_idx"));

    // `down` without N undoes one step: that index goes first, then the
    // quota table, then the shard column and its index...
    migrate(&pg.url, &["down"]);
    assert!(!indexes_of(&pg).contains("edge_mcp_sessions_shard_ended_idx"));
    assert_eq!(quota_table(), 1);
    migrate(&pg.url, &["down"]);
    assert_eq!(quota_table(), 0);
    assert!(indexes_of(&pg).contains("edge_mcp_sessions_shard_live_idx"));
    migrate(&pg.url, &["down"]);
    assert!(!indexes_of(&pg).contains("edge_mcp_sessions_shard"));
    assert_eq!(
        pg.scalar("SELECT count(*) FROM information_schema.columns WHERE table_schema = 'mcp' AND table_name = 'edge_mcp_sessions' AND column_name = 'shard'"),
        0
    );
    // ...then the cluster's tables...
    migrate(&pg.url, &["down"]);
    assert_eq!(cluster_tables(), 0);
    assert!(pg.psql("\\dt mcp.*").contains("edge_mcp_sessions"));
    // ...then the indexes come back.
    migrate(&pg.url, &["down"]);
    let indexes = indexes_of(&pg);
    assert!(
        indexes.contains("edge_mcp_sessions_live_expiry_idx"),
        "{indexes}"
    );
    assert!(!indexes.contains("edge_mcp_sessions_live_idx"), "{indexes}");
    // Once more: the token columns go, the tables stay.
    migrate(&pg.url, &["down"]);
    assert_eq!(
        pg.scalar("SELECT count(*) FROM information_schema.columns WHERE table_schema = 'mcp' AND column_name = 'session_token_sha256'"),
        0
    );
    assert!(pg.psql("\\dt mcp.*").contains("edge_mcp_sessions"));
    migrate(&pg.url, &["down", "1"]);
    assert_eq!(
        pg.scalar("SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'mcp'"),
        0,
        "down removes the schema completely"
    );
    assert!(migrate(&pg.url, &["status"]).contains(": pending"));
    migrate(&pg.url, &["up"]);
    assert_eq!(
        pg.scalar("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'mcp' AND table_type = 'BASE TABLE'"),
        7
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_done_over_http_arrives_as_rows() {
    let pg = TempPostgres::start();
    let server = TestServer::start_with(1000, &postgres_section(&pg.url, "")).await;
    let client = &server.client;
    let base = &server.base;
    for i in 0..5 {
        create(client, base, &format!("h-{i}")).await;
    }
    for i in 0..40 {
        assert_eq!(
            execute(client, base, &format!("h-{}", i % 5), i % 4 == 0).await,
            StatusCode::NO_CONTENT
        );
    }
    let (status, _) = server
        .call(
            Method::DELETE,
            "/api/v1/sessions/h-0",
            KEY_A,
            Some(json!({"reason": "done"})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = server
        .call(
            Method::PATCH,
            "/api/v1/sessions/h-1",
            KEY_A,
            Some(json!({"client_name": "renamed"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // A leaked refresh token: rotation, then reuse, revokes (audit: revoked).
    let (_, leaked) = call(
        client,
        base,
        Method::POST,
        "/api/v1/sessions",
        KEY_A,
        Some(json!({"session_id": "h-leak", "edge_mcp_id": "e"})),
    )
    .await;
    let first_refresh = leaked["refresh_token"].as_str().unwrap().to_owned();
    let (status, _) = call(
        client,
        base,
        Method::POST,
        "/api/v1/sessions/h-leak/refresh",
        KEY_A,
        Some(json!({"refresh_token": first_refresh})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(
        client,
        base,
        Method::POST,
        "/api/v1/sessions/h-leak/refresh",
        KEY_A,
        Some(json!({"refresh_token": first_refresh})),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Ended by an operator through the admin API (audit: actor admin).
    create(client, base, "h-admin").await;
    let (status, _) = call(
        client,
        base,
        Method::DELETE,
        &format!("/admin/tenants/{TENANT_A}/sessions/h-admin"),
        ADMIN_KEY,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = flush(client, base).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outbox_depth"], 0);

    assert_eq!(
        pg.psql("SELECT action || ':' || actor || ':' || reason FROM mcp.session_audit_log a JOIN mcp.edge_mcp_sessions s ON s.id = a.session_id WHERE s.session_id = 'h-leak' AND action <> 'created'").trim(),
        "revoked:engine:refresh_token_reuse"
    );
    assert_eq!(
        pg.psql("SELECT action || ':' || actor || ':' || reason FROM mcp.session_audit_log a JOIN mcp.edge_mcp_sessions s ON s.id = a.session_id WHERE s.session_id = 'h-admin' AND action <> 'created'").trim(),
        "terminated:admin:admin_request"
    );
    // Out of the way of the counts below.
    pg.psql("WITH s AS (DELETE FROM mcp.edge_mcp_sessions WHERE session_id IN ('h-leak', 'h-admin') RETURNING id) DELETE FROM mcp.session_audit_log WHERE session_id IN (SELECT id FROM s)");
    assert_eq!(pg.scalar("SELECT count(*) FROM mcp.edge_mcp_sessions"), 5);
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.session_tool_executions"),
        40
    );
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.session_tool_executions WHERE error IS NOT NULL"),
        10
    );
    assert_eq!(
        pg.scalar("SELECT sum(tool_execution_count) FROM mcp.edge_mcp_sessions"),
        40
    );
    assert_eq!(
        pg.scalar("SELECT sum(total_tokens_used) FROM mcp.edge_mcp_sessions"),
        120
    );
    let row = pg.psql(
        "SELECT status, termination_reason, client_type, has_passthrough_auth, passthrough_providers, connection_metadata->>'k', version
         FROM mcp.edge_mcp_sessions WHERE session_id = 'h-0'",
    );
    assert_eq!(row.trim(), "terminated|done|claude-code|t|{github}|v|10");
    assert_eq!(
        pg.psql("SELECT client_name FROM mcp.edge_mcp_sessions WHERE session_id = 'h-1'")
            .trim(),
        "renamed"
    );
    let audit = pg.psql("SELECT action || ':' || actor || ':' || coalesce(reason, '') FROM mcp.session_audit_log a JOIN mcp.edge_mcp_sessions s ON s.id = a.session_id WHERE s.session_id = 'h-0' ORDER BY at");
    assert_eq!(audit.trim(), "created:client:\nterminated:client:done");
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.session_audit_log WHERE action = 'created'"),
        5
    );
    assert_eq!(
        pg.scalar("SELECT total_sessions FROM mcp.session_metrics"),
        5,
        "the view sums per tenant"
    );
    // The credentials arrive sealed, never in plaintext; token hashes too.
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.edge_mcp_sessions WHERE passthrough_auth_encrypted IS NOT NULL AND octet_length(session_token_sha256) = 32"),
        5
    );
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.edge_mcp_sessions WHERE position(convert_to('ghp_secret', 'UTF8') IN passthrough_auth_encrypted) > 0 OR row_to_json(edge_mcp_sessions)::text LIKE '%ghp_secret%'"),
        0
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_loses_nothing_and_duplicates_nothing() {
    let pg = TempPostgres::start_own();
    let server = TestServer::start_with(
        1000,
        &postgres_section(&pg.url, "commit_timeout_ms = 60000"),
    )
    .await;
    let client = &server.client;
    let base = &server.base;
    // A steady run of creates and executions (8 in flight); PostgreSQL is
    // stopped and started again while it goes on.
    let pg = std::sync::Arc::new(pg);
    let outage = {
        let pg = pg.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tokio::task::spawn_blocking({
                let pg = pg.clone();
                move || pg.stop()
            })
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            tokio::task::spawn_blocking(move || pg.restart())
                .await
                .unwrap();
        })
    };
    let mut in_outage_depth = 0;
    let mut executed = 0;
    for round in 0..30 {
        create(client, base, &format!("o-{round}")).await;
        let calls = (0..20).map(|i| {
            let id = format!("o-{round}");
            async move { execute(client, base, &id, i % 7 == 0).await }
        });
        for status in futures::future::join_all(calls).await {
            assert_eq!(status, StatusCode::NO_CONTENT);
            executed += 1;
        }
        in_outage_depth = in_outage_depth.max(outbox_depth(&server).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    outage.await.unwrap();
    assert!(
        in_outage_depth > 20,
        "the outbox held the changes made during the outage (max depth {in_outage_depth})"
    );
    let (status, body) = flush(client, base).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(pg.scalar("SELECT count(*) FROM mcp.edge_mcp_sessions"), 30);
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.session_tool_executions"),
        executed
    );
    assert_eq!(executed, 600);
    assert_eq!(
        pg.scalar("SELECT sum(tool_execution_count) FROM mcp.edge_mcp_sessions"),
        executed
    );
    assert_eq!(pg.scalar("SELECT count(*) FROM mcp.session_audit_log"), 30);
    // The engine's own counts agree.
    let (_, metrics) = server
        .call(Method::GET, "/api/v1/sessions/metrics", KEY_A, None)
        .await;
    assert_eq!(metrics["total_tool_executions"], executed);
    assert_eq!(metrics["total_sessions"], 30);
    server.stop().await;
}

/// The outbox depth `/readyz` reports.
async fn outbox_depth(server: &TestServer) -> u64 {
    let (status, body) = server.call(Method::GET, "/readyz", "", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["postgres"]["outbox_depth"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_engine_ships_its_outbox_after_restart() {
    let pg = TempPostgres::start_own();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "data", "", &postgres_section(&pg.url, ""));
    // First run: schema in place, then PostgreSQL goes away.
    let server = ChildServer::start(&config).await;
    let client = client();
    let (status, _) = flush(&client, &server.base).await;
    assert_eq!(status, StatusCode::OK);
    pg.stop();
    for i in 0..8 {
        create(&client, &server.base, &format!("k-{i}")).await;
    }
    for i in 0..40 {
        assert_eq!(
            execute(&client, &server.base, &format!("k-{}", i % 8), false).await,
            StatusCode::NO_CONTENT
        );
    }
    let (status, body) = call(&client, &server.base, Method::GET, "/readyz", "", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body["postgres"]["outbox_depth"].as_u64().unwrap() >= 48,
        "{body}"
    );
    server.kill();

    pg.restart();
    let server = ChildServer::start(&config).await;
    let (status, body) = flush(&client, &server.base).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outbox_depth"], 0);
    assert_eq!(pg.scalar("SELECT count(*) FROM mcp.edge_mcp_sessions"), 8);
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.session_tool_executions"),
        40
    );
    assert_eq!(
        pg.scalar("SELECT sum(tool_execution_count) FROM mcp.edge_mcp_sessions"),
        40
    );
    assert_eq!(server.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_data_dir_is_rebuilt_from_postgres() {
    let pg = TempPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let first = write_config(dir.path(), "first", "", &postgres_section(&pg.url, ""));
    let server = ChildServer::start(&first).await;
    let client = client();
    let base = server.base.clone();
    for i in 1..6 {
        create(&client, &base, &format!("r-{i}")).await;
    }
    let body = json!({"session_id": "r-0", "edge_mcp_id": "edge",
                      "passthrough_auth": {"credentials": {"github": {"type": "bearer", "token": "ghp_rebuilt"}}}});
    let (status, created) = call(
        &client,
        &base,
        Method::POST,
        "/api/v1/sessions",
        KEY_A,
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let token = created["session_token"].as_str().unwrap().to_owned();
    for i in 0..30 {
        assert_eq!(
            execute(&client, &base, &format!("r-{}", i % 6), i % 3 == 0).await,
            StatusCode::NO_CONTENT
        );
    }
    let (status, _) = call(
        &client,
        &base,
        Method::DELETE,
        "/api/v1/sessions/r-5",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, before) = call(
        &client,
        &base,
        Method::GET,
        "/api/v1/sessions/r-1",
        KEY_A,
        None,
    )
    .await;
    let (_, metrics_before) = call(
        &client,
        &base,
        Method::GET,
        "/api/v1/sessions/r-1/metrics",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(flush(&client, &base).await.0, StatusCode::OK);
    assert_eq!(server.terminate().code(), Some(0));

    // Same PostgreSQL, a brand-new data dir.
    let second = write_config(dir.path(), "second", "", &postgres_section(&pg.url, ""));
    let server = ChildServer::start(&second).await;
    let base = server.base.clone();
    let (status, after) = call(
        &client,
        &base,
        Method::GET,
        "/api/v1/sessions/r-1",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{after}");
    for field in [
        "id",
        "status",
        "tool_execution_count",
        "tool_error_count",
        "total_tokens_used",
        "created_at",
        "expires_at",
        "version",
        "connection_metadata",
        "passthrough_providers",
    ] {
        assert_eq!(after[field], before[field], "{field}");
    }
    let (_, metrics_after) = call(
        &client,
        &base,
        Method::GET,
        "/api/v1/sessions/r-1/metrics",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(metrics_after, metrics_before);
    let (_, executions) = call(
        &client,
        &base,
        Method::GET,
        "/api/v1/sessions/r-1/tools/executions",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(executions["count"], 5);
    // Only live sessions come back; the rebuilt ones keep working.
    let (status, _) = call(
        &client,
        &base,
        Method::GET,
        "/api/v1/sessions/r-5",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        execute(&client, &base, "r-1", false).await,
        StatusCode::NO_CONTENT
    );
    let (_, body) = call(
        &client,
        &base,
        Method::GET,
        "/api/v1/sessions/r-1",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(body["tool_execution_count"], 6);
    // The session token and the sealed credentials came back too.
    let (status, _) = client
        .get(format!("{base}/api/v1/sessions/r-0"))
        .bearer_auth(&token)
        .send()
        .await
        .map(|r| (r.status(), ()))
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let (status, bundle) = call(
        &client,
        &base,
        Method::GET,
        "/api/v1/sessions/r-0/passthrough-auth",
        KEY_A_READER,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(bundle["credentials"]["github"]["token"], "ghp_rebuilt");
    assert_eq!(flush(&client, &base).await.0, StatusCode::OK);
    assert_eq!(
        pg.scalar(
            "SELECT tool_execution_count FROM mcp.edge_mcp_sessions WHERE session_id = 'r-1'"
        ),
        6
    );
    assert_eq!(server.terminate().code(), Some(0));
}

/// A shipping lane keeps its connection from batch to batch; one idle for
/// a second is checked before its next batch, so a PostgreSQL restart
/// while the lanes are idle costs no failed batch (the pool used to check
/// every connection it handed out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_of_postgres_while_the_lanes_idle_fails_no_batch() {
    let pg = TempPostgres::start_own();
    let server = TestServer::start_with_storage(
        1000,
        "durability = \"postgres\"",
        &postgres_section(&pg.url, "commit_timeout_ms = 5000"),
    )
    .await;
    let (client, base) = (&server.client, &server.base);
    for i in 0..4 {
        create(client, base, &format!("before-{i}")).await;
    }
    pg.stop();
    pg.restart();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for i in 0..4 {
        create(client, base, &format!("after-{i}")).await;
    }
    assert_eq!(pg.scalar("SELECT count(*) FROM mcp.edge_mcp_sessions"), 8);
    let (status, stats) = server
        .call(Method::GET, "/admin/stats", ADMIN_KEY, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert_eq!(stats["outbox"]["failures"], 0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_postgres_acknowledges_after_the_commit() {
    let pg = TempPostgres::start_own();
    let server = TestServer::start_with_storage(
        1000,
        "durability = \"postgres\"",
        &postgres_section(&pg.url, "commit_timeout_ms = 1500"),
    )
    .await;
    let client = &server.client;
    let base = &server.base;
    create(client, base, "p-1").await;
    // No flush: the 201 itself means the row is committed.
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.edge_mcp_sessions WHERE session_id = 'p-1'"),
        1
    );
    assert_eq!(
        execute(client, base, "p-1", false).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.session_tool_executions"),
        1
    );

    // PostgreSQL down: the change cannot be acknowledged, so the caller
    // gets a retryable 503; the change itself waits in the outbox.
    pg.stop();
    assert_eq!(
        execute(client, base, "p-1", false).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    pg.restart();
    let (status, body) = flush(client, base).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.session_tool_executions"),
        2
    );
    assert_eq!(
        execute(client, base, "p-1", true).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.session_tool_executions"),
        3
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_that_refuses_the_login_is_logged_and_sled_keeps_serving() {
    let pg = TempPostgres::start_own();
    let dir = tempfile::tempdir().unwrap();
    // A real server that refuses the login (no such role), and an empty
    // data dir: start-up waits briefly for the rebuild, then serves.
    let port = pg
        .url
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let url = format!("postgres://nobody:wrong-password@127.0.0.1:{port}/postgres");
    let config = write_config(
        dir.path(),
        "data",
        "",
        &postgres_section(&url, "connect_timeout_ms = 500\nrebuild_wait_seconds = 1"),
    );
    let server = ChildServer::start(&config).await;
    let client = client();
    create(&client, &server.base, "u-1").await;
    assert_eq!(
        execute(&client, &server.base, "u-1", false).await,
        StatusCode::NO_CONTENT
    );
    let mut logged = false;
    for _ in 0..100 {
        logged = server.logs.lock().unwrap().iter().any(|line| {
            let v: Value = serde_json::from_str(line).unwrap_or_default();
            v["level"] == "ERROR"
                && v["message"].as_str().unwrap_or("").starts_with("postgres:")
                && v["error"].as_str().unwrap_or("").contains("nobody")
        });
        if logged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(logged, "a clear error line naming the refused login");
    assert!(
        !server
            .logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("wrong-password")),
        "the password never reaches the logs"
    );
    assert_eq!(server.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_waits_for_postgres_in_the_background() {
    let pg = TempPostgres::start_own();
    let dir = tempfile::tempdir().unwrap();
    let first = write_config(dir.path(), "first", "", &postgres_section(&pg.url, ""));
    let server = ChildServer::start(&first).await;
    let client = client();
    create(&client, &server.base, "bg-1").await;
    assert_eq!(
        execute(&client, &server.base, "bg-1", true).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(flush(&client, &server.base).await.0, StatusCode::OK);
    assert_eq!(server.terminate().code(), Some(0));

    // A lost data dir while PostgreSQL is down: serving starts after the
    // wait, and the sessions come back once PostgreSQL does.
    pg.stop();
    let second = write_config(
        dir.path(),
        "second",
        "",
        &postgres_section(
            &pg.url,
            "connect_timeout_ms = 300\nrebuild_wait_seconds = 1",
        ),
    );
    let server = ChildServer::start(&second).await;
    let base = server.base.clone();
    create(&client, &base, "bg-2").await;
    let (status, _) = call(
        &client,
        &base,
        Method::GET,
        "/api/v1/sessions/bg-1",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not rebuilt yet");
    pg.restart();
    let mut body = Value::Null;
    for _ in 0..200 {
        let (status, b) = call(
            &client,
            &base,
            Method::GET,
            "/api/v1/sessions/bg-1",
            KEY_A,
            None,
        )
        .await;
        if status == StatusCode::OK {
            body = b;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(body["status"], "active", "rebuilt: {body}");
    assert_eq!(body["tool_error_count"], 1);
    // Readable as soon as it is in the store; its actor follows a moment
    // later (writes meanwhile get a retryable 503).
    let mut executed = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..100 {
        executed = execute(&client, &base, "bg-1", false).await;
        if executed != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(executed, StatusCode::NO_CONTENT);
    let (status, _) = call(
        &client,
        &base,
        Method::GET,
        "/api/v1/sessions/bg-2",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "the session made meanwhile stays");
    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn a_malformed_postgres_url_is_a_config_error_naming_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-sessions"))
        .args(["migrate", "status"])
        .env("EDGE_SESSIONS__POSTGRES__URL", "not a url")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("postgres.url"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_edge-sessions"))
        .args(["serve"])
        .env("EDGE_SESSIONS__STORAGE__DURABILITY", "postgres")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("storage.durability"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_batches_after_an_outage_keep_every_row_and_the_newest_state() {
    // Rounds of three entries split over two connections: a session's row,
    // its executions and its newer states fall into different rounds, which
    // is where replacing an old state by the newest must keep the order.
    let pg = TempPostgres::start_own();
    let server = TestServer::start_with(
        1000,
        &postgres_section(
            &pg.url,
            "batch_size = 3\nship_connections = 2\ncommit_timeout_ms = 60000",
        ),
    )
    .await;
    let client = &server.client;
    let base = &server.base;
    assert_eq!(flush(client, base).await.0, StatusCode::OK);
    pg.stop();
    for i in 0..6 {
        create(client, base, &format!("t-{i}")).await;
    }
    for i in 0..36 {
        let id = format!("t-{}", i % 6);
        assert_eq!(
            execute(client, base, &id, i % 5 == 0).await,
            StatusCode::NO_CONTENT
        );
        if i % 4 == 0 {
            let body = json!({"client_name": format!("n-{i}")});
            let path = format!("/api/v1/sessions/{id}");
            assert_eq!(
                server.call(Method::PATCH, &path, KEY_A, Some(body)).await.0,
                StatusCode::OK
            );
        }
    }
    let (status, _) = server
        .call(Method::DELETE, "/api/v1/sessions/t-3", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Let the coalesced session records reach sled (and the outbox).
    tokio::time::sleep(Duration::from_millis(50)).await;
    pg.restart();
    let (status, body) = flush(client, base).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.session_tool_executions"),
        36
    );
    for i in 0..6 {
        let id = format!("t-{i}");
        let (_, view) = server
            .call(Method::GET, &format!("/api/v1/sessions/{id}"), KEY_A, None)
            .await;
        let row = pg.psql(&format!(
            "SELECT status || '|' || tool_execution_count || '|' || tool_error_count || '|' || coalesce(client_name, '') || '|' || version
             FROM mcp.edge_mcp_sessions WHERE session_id = '{id}'"
        ));
        let expected = format!(
            "{}|{}|{}|{}|{}",
            view["status"].as_str().unwrap(),
            view["tool_execution_count"],
            view["tool_error_count"],
            view["client_name"].as_str().unwrap_or(""),
            view["version"]
        );
        assert_eq!(row.trim(), expected, "{id}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_postgres_refuses_become_dead_letters_and_the_rest_ships() {
    let pg = TempPostgres::start();
    let server = TestServer::start_with(1000, &postgres_section(&pg.url, "")).await;
    let client = &server.client;
    let base = &server.base;
    assert_eq!(flush(client, base).await.0, StatusCode::OK);
    // An operator's constraint the engine knows nothing about.
    pg.psql("ALTER TABLE mcp.session_tool_executions ADD CONSTRAINT no_poison CHECK (tool_name <> 'poison')");
    create(client, base, "d-1").await;
    let execute_named = |name: &'static str, arguments: Value| async move {
        let body = json!({"tool_name": name, "arguments": arguments});
        call(
            client,
            base,
            Method::POST,
            "/api/v1/sessions/d-1/tools/execute",
            KEY_A,
            Some(body),
        )
        .await
        .0
    };
    assert_eq!(
        execute_named("read", json!({"x": "a\u{0}b"})).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        execute_named("poison", json!({})).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        execute_named("write", json!({})).await,
        StatusCode::NO_CONTENT
    );
    let (status, body) = flush(client, base).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outbox_depth"], 0);
    assert_eq!(
        pg.psql("SELECT tool_name FROM mcp.session_tool_executions ORDER BY seq")
            .trim(),
        "read\nwrite"
    );
    // NUL, which PostgreSQL cannot store, arrives as U+FFFD.
    assert_eq!(
        pg.psql("SELECT arguments->>'x' FROM mcp.session_tool_executions WHERE tool_name = 'read'")
            .trim(),
        "a\u{fffd}b"
    );
    let (_, ready) = server.call(Method::GET, "/readyz", "", None).await;
    assert_eq!(ready["postgres"]["dead_letters"], 1, "{ready}");
    server.stop().await;
}

/// A PostgreSQL tier whose final sessions are purged a minute after they end.
fn retention_config(url: &str) -> String {
    format!(
        "[sessions]\nretention_seconds = 60\nsweep_interval_seconds = 1\n{}",
        postgres_section(url, "")
    )
}

/// Session `again` created, executed once, deleted, shipped, and purged
/// from the engine (its row stays in PostgreSQL); answers its row id.
async fn end_and_purge_again(server: &TestServer, pg: &TempPostgres) -> String {
    let (client, base) = (&server.client, &server.base);
    create(client, base, "again").await;
    assert_eq!(
        execute(client, base, "again", false).await,
        StatusCode::NO_CONTENT
    );
    let (status, _) = server
        .call(Method::DELETE, "/api/v1/sessions/again", KEY_A, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(flush(client, base).await.0, StatusCode::OK);
    let old = pg.psql("SELECT id FROM mcp.edge_mcp_sessions WHERE session_id = 'again'");
    server.clock.advance(Duration::from_secs(61));
    let status = poll(
        async || {
            server
                .call(Method::GET, "/api/v1/sessions/again", KEY_A, None)
                .await
                .0
        },
        |status| *status == StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the final session was never purged"
    );
    old.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_reused_after_retention_takes_over_its_row() {
    let pg = TempPostgres::start();
    let server = TestServer::start_with(1000, &retention_config(&pg.url)).await;
    let client = &server.client;
    let base = &server.base;
    let old = end_and_purge_again(&server, &pg).await;
    create(client, base, "again").await;
    let (status, body) = flush(client, base).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // One row for the id: the new session's, with none of the old one's
    // executions.
    let (_, view) = server
        .call(Method::GET, "/api/v1/sessions/again", KEY_A, None)
        .await;
    assert_eq!(
        pg.psql("SELECT id || '|' || status || '|' || tool_execution_count FROM mcp.edge_mcp_sessions WHERE session_id = 'again'")
            .trim(),
        format!("{}|active|0", view["id"].as_str().unwrap())
    );
    assert_ne!(old.trim(), view["id"].as_str().unwrap());
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.session_tool_executions"),
        0
    );
    server.stop().await;
}

/// As above, with executions: the new session's create and executions are
/// made while PostgreSQL is down, then shipped once it is back. (Whether
/// they share a batch is the shipper's choice; in the runs looked at, the
/// create went first, alone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_client_id_with_executions_takes_over_its_row_and_keeps_them() {
    let pg = std::sync::Arc::new(TempPostgres::start_own());
    let server = TestServer::start_with(1000, &retention_config(&pg.url)).await;
    let client = &server.client;
    let base = &server.base;
    let old = end_and_purge_again(&server, &pg).await;
    tokio::task::spawn_blocking({
        let pg = pg.clone();
        move || pg.stop()
    })
    .await
    .unwrap();
    create(client, base, "again").await;
    for failed in [false, true] {
        assert_eq!(
            execute(client, base, "again", failed).await,
            StatusCode::NO_CONTENT
        );
    }
    tokio::task::spawn_blocking({
        let pg = pg.clone();
        move || pg.restart()
    })
    .await
    .unwrap();
    let (status, body) = flush(client, base).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outbox_depth"], 0, "{body}");
    let (_, view) = server
        .call(Method::GET, "/api/v1/sessions/again", KEY_A, None)
        .await;
    let new = view["id"].as_str().unwrap();
    assert_ne!(old, new);
    assert_eq!(
        pg.psql("SELECT id || '|' || status || '|' || tool_execution_count || '|' || tool_error_count FROM mcp.edge_mcp_sessions WHERE session_id = 'again'")
            .trim(),
        format!("{new}|active|2|1")
    );
    // The old session's execution went with its row; the new one's two are
    // there, and so is its created audit row.
    assert_eq!(
        pg.psql("SELECT session_id || ':' || seq FROM mcp.session_tool_executions ORDER BY seq")
            .trim(),
        format!("{new}:1\n{new}:2")
    );
    assert_eq!(
        pg.scalar(&format!(
            "SELECT count(*) FROM mcp.session_audit_log WHERE session_id = '{new}' AND action = 'created'"
        )),
        1
    );
    let (_, ready) = server.call(Method::GET, "/readyz", "", None).await;
    assert_eq!(ready["postgres"]["dead_letters"], 0, "{ready}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_on_an_empty_database_logs_no_error() {
    let pg = TempPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "data", "", &postgres_section(&pg.url, ""));
    let server = ChildServer::start(&config).await;
    // Ready means recovery (the rebuild from PostgreSQL included) is done;
    // then a change is shipped, so the shipper is past its migrations too.
    let client = client();
    create(&client, &server.base, "first-start").await;
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
    let logs = server.logs.clone();
    assert!(server.terminate().success());
    let logs = logs.lock().unwrap();
    assert!(
        logs.iter()
            .any(|l| l.contains("live sessions rebuilt from PostgreSQL")),
        "the rebuild ran: {logs:#?}"
    );
    let errors: Vec<&String> = logs
        .iter()
        .filter(|l| {
            serde_json::from_str::<Value>(l).map_or(l.contains("ERROR"), |v| v["level"] == "ERROR")
        })
        .collect();
    assert!(errors.is_empty(), "a healthy first start: {errors:#?}");
}
