//! Crash safety with the real binary as a child process: SIGKILL right
//! after the last acknowledgement loses nothing acknowledged; sessions that
//! became overdue while the process was down come back expired; SIGTERM
//! flushes and exits 0.

mod common;

use std::time::Duration;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn write_config(dir: &std::path::Path, storage: &str) -> std::path::PathBuf {
    let path = dir.join("edge-sessions.toml");
    std::fs::write(
        &path,
        config_toml_with_storage(&dir.join("data"), 1000, storage, ""),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_the_last_ack_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let server = ChildServer::start(&config).await;
    let client = client();
    let base = server.base.clone();

    for i in 0..20 {
        let body = json!({"session_id": format!("c-{i}"), "edge_mcp_id": "edge"});
        let (status, _) = call(
            &client,
            &base,
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(body),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let executions = (0..200).map(|i| {
        let body = json!({"tool_name": "t", "tokens_used": 2, "error": if i % 10 == 0 { json!("failed") } else { json!(null) }});
        let path = format!("/api/v1/sessions/c-{}/tools/execute", i % 20);
        let client = client.clone();
        let base = base.clone();
        async move { call(&client, &base, Method::POST, &path, KEY_A, Some(body)).await }
    });
    for (status, body) in futures::future::join_all(executions).await {
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    let (status, _) = call(
        &client,
        &base,
        Method::PATCH,
        "/api/v1/sessions/c-1",
        KEY_A,
        Some(json!({"initialized": true, "client_name": "patched"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(
        &client,
        &base,
        Method::DELETE,
        "/api/v1/sessions/c-2",
        KEY_A,
        Some(json!({"reason": "done"})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    server.kill();

    let server = ChildServer::start(&config).await;
    let base = server.base.clone();
    let mut total = 0;
    let mut errors = 0;
    for i in 0..20 {
        let (status, session) = call(
            &client,
            &base,
            Method::GET,
            &format!("/api/v1/sessions/c-{i}"),
            KEY_A,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "c-{i} survived");
        assert_eq!(session["tool_execution_count"], 10, "c-{i}");
        assert_eq!(session["total_tokens_used"], 20);
        total += session["tool_execution_count"].as_u64().unwrap();
        errors += session["tool_error_count"].as_u64().unwrap();
        let (_, list) = call(
            &client,
            &base,
            Method::GET,
            &format!("/api/v1/sessions/c-{i}/tools/executions"),
            KEY_A,
            None,
        )
        .await;
        assert_eq!(list["count"], 10, "every execution of c-{i} is stored");
    }
    assert_eq!((total, errors), (200, 20));
    let (_, patched) = call(
        &client,
        &base,
        Method::GET,
        "/api/v1/sessions/c-1",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(
        (
            patched["initialized"].as_bool(),
            patched["client_name"].as_str()
        ),
        (Some(true), Some("patched"))
    );
    assert_eq!(patched["version"], 12, "1 create + 10 executions + 1 patch");
    let (_, ended) = call(
        &client,
        &base,
        Method::GET,
        "/api/v1/sessions/c-2",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(
        (
            ended["status"].as_str(),
            ended["termination_reason"].as_str()
        ),
        (Some("terminated"), Some("done"))
    );
    // Restored sessions are live actors again, and still count against the limit.
    let (status, _) = call(
        &client,
        &base,
        Method::POST,
        "/api/v1/sessions/c-3/tools/execute",
        KEY_A,
        Some(json!({"tool_name": "t"})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, active) = call(
        &client,
        &base,
        Method::GET,
        "/api/v1/sessions/active?limit=100",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(active["count"], 19);
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_timed_out_while_down_comes_back_expired() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let server = ChildServer::start(&config).await;
    let client = client();
    let body = json!({"session_id": "sleeper", "edge_mcp_id": "edge", "idle_timeout": 1});
    let (status, created) = call(
        &client,
        &server.base,
        Method::POST,
        "/api/v1/sessions",
        KEY_A,
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let body = json!({"session_id": "survivor", "edge_mcp_id": "edge", "idle_timeout": 3600});
    call(
        &client,
        &server.base,
        Method::POST,
        "/api/v1/sessions",
        KEY_A,
        Some(body),
    )
    .await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let server = ChildServer::start(&config).await;
    let (_, sleeper) = call(
        &client,
        &server.base,
        Method::GET,
        "/api/v1/sessions/sleeper",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(sleeper["status"], "expired");
    assert_eq!(sleeper["termination_reason"], "idle_timeout");
    assert_eq!(
        sleeper["terminated_at"], created["expires_at"],
        "ended when it was due, not at restart"
    );
    let (_, survivor) = call(
        &client,
        &server.base,
        Method::GET,
        "/api/v1/sessions/survivor",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(survivor["status"], "active");
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_pending_activity_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    // A long flush interval: heartbeats would wait a minute to be written
    // unless shutdown flushes them.
    let config = write_config(dir.path(), "flush_interval_ms = 60000");
    let server = ChildServer::start(&config).await;
    let client = client();
    let body = json!({"session_id": "hb", "edge_mcp_id": "edge"});
    let (_, created) = call(
        &client,
        &server.base,
        Method::POST,
        "/api/v1/sessions",
        KEY_A,
        Some(body),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, _) = call(
        &client,
        &server.base,
        Method::POST,
        "/api/v1/sessions/hb/activity",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, live) = call(
        &client,
        &server.base,
        Method::GET,
        "/api/v1/sessions/hb",
        KEY_A,
        None,
    )
    .await;
    assert_ne!(live["last_activity_at"], created["last_activity_at"]);
    let exit = server.terminate();
    assert!(exit.success(), "graceful shutdown exits 0, got {exit:?}");

    let server = ChildServer::start(&config).await;
    let (_, back) = call(
        &client,
        &server.base,
        Method::GET,
        "/api/v1/sessions/hb",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(
        back["last_activity_at"], live["last_activity_at"],
        "the heartbeat was flushed at shutdown"
    );
    server.kill();
}

/// Answers the status and error code of a create of `id`.
async fn create_code(client: &reqwest::Client, base: &str, id: &str) -> (StatusCode, Value) {
    let (status, body) = create_id(client, base, id).await;
    (status, body["code"].clone())
}

/// Creates `id` and terminates it: its final record is retained.
async fn create_and_end(client: &reqwest::Client, base: &str, id: &str) {
    assert_eq!(create_code(client, base, id).await.0, StatusCode::CREATED);
    let path = format!("/api/v1/sessions/{id}");
    let (status, _) = call(client, base, Method::DELETE, &path, KEY_A, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

/// A create of a new client-chosen id skips the store look-up (the store's
/// session filter says the id cannot be there); an id whose final record
/// is retained must still answer 409 after a restart, whether that record
/// was checkpointed into sled (a clean stop checkpoints) or was only in the
/// log (SIGKILL right after the acknowledgement, with no timed checkpoint
/// for a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_id_answers_409_after_a_restart_from_sled_or_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "checkpoint_interval_ms = 60000");
    let client = client();

    let server = ChildServer::start(&config).await;
    create_and_end(&client, &server.base, "in-sled").await;
    assert!(server.terminate().success());

    let server = ChildServer::start(&config).await;
    create_and_end(&client, &server.base, "in-log").await;
    server.kill();

    let server = ChildServer::start(&config).await;
    for id in ["in-sled", "in-log"] {
        assert_eq!(
            create_code(&client, &server.base, id).await,
            (StatusCode::CONFLICT, json!("session_exists")),
            "{id}"
        );
    }
    // A new id is created, and a second create of it is refused too.
    assert_eq!(
        create_code(&client, &server.base, "fresh").await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        create_code(&client, &server.base, "fresh").await,
        (StatusCode::CONFLICT, json!("session_exists"))
    );
    server.kill();
}

#[test]
fn hash_key_prints_the_sha256_a_config_file_holds() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_edge-sessions"))
        .args(["hash-key", "abc"])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8(output.stdout).unwrap().trim(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    // From stdin (one line, its newline not part of the key).
    use std::io::Write as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edge-sessions"))
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"abc\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8(output.stdout).unwrap().trim(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn an_invalid_config_stops_serve_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[storage]\ndurability = \"sometimes\"\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_edge-sessions"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("storage.durability"), "{stderr}");

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_edge-sessions"))
        .env("EDGE_SESSIONS__SERVER__LISTEN", "not-an-address")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8(output.stderr)
        .unwrap()
        .contains("server.listen"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_run_without_tenants_prints_working_development_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("minimal.toml");
    let data = dir.path().join("data");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndata_dir = {:?}\n",
        data.display().to_string()
    );
    std::fs::write(&path, toml).unwrap();
    let server = ChildServer::start(&path).await;
    // The banner is printed before the server listens; give the reader
    // thread a moment to collect it.
    let mut printed = Vec::new();
    for _ in 0..200 {
        printed = server.stdout.lock().unwrap().clone();
        if printed.iter().any(|l| l.contains("X-Admin-Key):")) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let key_after = |label: &str| {
        let line = printed
            .iter()
            .find(|l| l.contains(label))
            .unwrap_or_else(|| panic!("no {label} in {printed:?}"));
        line.split_whitespace().last().unwrap().to_owned()
    };
    let (api_key, admin_key) = (key_after("X-API-Key):"), key_after("X-Admin-Key):"));
    assert!(api_key.starts_with("esk_dev_") && admin_key.starts_with("esa_dev_"));
    let client = client();
    let body = json!({"edge_mcp_id": "demo"});
    let (status, _) = call(
        &client,
        &server.base,
        Method::POST,
        "/api/v1/sessions",
        &api_key,
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = call(
        &client,
        &server.base,
        Method::POST,
        "/admin/sessions/cleanup",
        &admin_key,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(data.join("dev-credentials.toml").exists());
    server.kill();
}
