//! Backup and restore through the real binary: `GET /admin/backup` while the
//! server runs, `edge-sessions restore` into an empty data dir, then a new
//! server answers every session as before (ids, fields, counts, executions,
//! metrics, tokens, passthrough credentials); a session that ran out while
//! it was in the backup comes back `expired`; a non-empty data dir and a
//! damaged or cut backup are refused and change nothing.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const SECRET: &str = "ghp_BackupRoundTripSecret0123456789";

fn restore(file: &Path, config: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edge-sessions"))
        .arg("restore")
        .arg(file)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

/// Everything a client can read of session `id`.
async fn observe(base: &str, id: &str) -> Value {
    let c = client();
    let (_, session) = call(
        &c,
        base,
        Method::GET,
        &format!("/api/v1/sessions/{id}"),
        KEY_A,
        None,
    )
    .await;
    let (_, executions) = call(
        &c,
        base,
        Method::GET,
        &format!("/api/v1/sessions/{id}/tools/executions?limit=100"),
        KEY_A,
        None,
    )
    .await;
    let (_, metrics) = call(
        &c,
        base,
        Method::GET,
        &format!("/api/v1/sessions/{id}/metrics"),
        KEY_A,
        None,
    )
    .await;
    json!({"session": session, "executions": executions, "metrics": metrics})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restored_into_an_empty_data_dir_answers_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let write_config = |name: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, config_toml(&dir.path().join(name), 1000, "")).unwrap();
        path
    };
    let original = write_config("original");
    let server = ChildServer::start(&original).await;
    let (c, b) = (client(), server.base.clone());
    let (status, kept) = call(
        &c,
        &b,
        Method::POST,
        "/api/v1/sessions",
        KEY_A,
        Some(json!({"session_id": "kept", "edge_mcp_id": "edge", "user_id": "11111111-1111-4111-8111-111111111111",
                    "metadata": {"k": "v"},
                    "passthrough_auth": {"credentials": {"github": {"type": "bearer", "token": SECRET}}}})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{kept}");
    let token = kept["session_token"].as_str().unwrap().to_owned();
    for i in 0..5 {
        let (status, _) = call(
            &c,
            &b,
            Method::POST,
            "/api/v1/sessions/kept/tools/execute",
            KEY_A,
            Some(json!({"tool_name": format!("tool-{}", i % 2), "duration_ms": 10 + i, "tokens_used": 3,
                        "arguments": {"i": i}, "result": {"ok": true}})),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let short_made = Instant::now();
    for (id, extra) in [("short", json!({"ttl": 2})), ("ended", json!({}))] {
        let mut body = json!({"session_id": id, "edge_mcp_id": "edge"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, _) = call(&c, &b, Method::POST, "/api/v1/sessions", KEY_A, Some(body)).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let (status, _) = call(
        &c,
        &b,
        Method::DELETE,
        "/api/v1/sessions/ended",
        KEY_A,
        Some(json!({"reason": "done"})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(
        &c,
        &b,
        Method::POST,
        "/api/v1/sessions",
        KEY_B,
        Some(json!({"session_id": "other", "edge_mcp_id": "b"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);

    // The backup, while the server serves.
    let response = c
        .get(format!("{b}/admin/backup"))
        .header("X-Admin-Key", ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    assert!(response.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .contains(".esbk"));
    let bytes = response.bytes().await.unwrap();
    assert!(bytes.starts_with(b"ESBACKUP"));
    assert!(
        !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes())
            && !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
        "credentials stay sealed, tokens stay hashes"
    );
    let file = dir.path().join("snapshot.esbk");
    std::fs::write(&file, &bytes).unwrap();
    let (status, _) = call(&c, &b, Method::GET, "/admin/backup", KEY_A, None).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a tenant key is not an admin key"
    );

    let before = observe(&b, "kept").await;
    let (_, credentials) = call(
        &c,
        &b,
        Method::GET,
        "/api/v1/sessions/kept/passthrough-auth",
        KEY_A_READER,
        None,
    )
    .await;
    assert_eq!(credentials["credentials"]["github"]["token"], SECRET);
    let (_, ended_before) = call(&c, &b, Method::GET, "/api/v1/sessions/ended", KEY_A, None).await;
    assert_eq!(server.terminate().code(), Some(0));

    // Refused: the data dir in use (not empty), a damaged and a cut backup.
    let out = restore(&file, &original);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not empty")
            && stderr.contains(&dir.path().join("original").display().to_string()),
        "{stderr}"
    );
    let damaged_config = write_config("damaged");
    let mut damaged = bytes.to_vec();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x10;
    let damaged_file = dir.path().join("damaged.esbk");
    for broken in [&damaged[..], &bytes[..bytes.len() - 10]] {
        std::fs::write(&damaged_file, broken).unwrap();
        let out = restore(&damaged_file, &damaged_config);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a usable backup"));
        assert!(!dir.path().join("damaged").exists(), "nothing was written");
    }

    // Restored into an empty data dir.
    let restored = write_config("restored");
    let out = restore(&file, &restored);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("restored 4 sessions and 5 executions"));
    // The short session's ttl runs out before the restored server starts.
    if let Some(left) = Duration::from_millis(2_300).checked_sub(short_made.elapsed()) {
        tokio::time::sleep(left).await;
    }
    let server = ChildServer::start(&restored).await;
    let b = server.base.clone();
    let mut after = observe(&b, "kept").await;
    let mut expected = before.clone();
    // Times relative to now, and activity times as last written, move;
    // everything else is as it was.
    for view in [&mut after, &mut expected] {
        let session = view["session"].as_object_mut().unwrap();
        for field in [
            "idle_seconds",
            "expires_at",
            "last_activity_at",
            "session_age_seconds",
        ] {
            session.remove(field);
        }
    }
    assert_eq!(after, expected);
    assert_eq!(after["session"]["tool_execution_count"], 5);
    assert_eq!(
        after["executions"]["executions"].as_array().map(Vec::len),
        Some(5),
        "{after}"
    );
    let (_, credentials) = call(
        &c,
        &b,
        Method::GET,
        "/api/v1/sessions/kept/passthrough-auth",
        KEY_A_READER,
        None,
    )
    .await;
    assert_eq!(
        credentials["credentials"]["github"]["token"], SECRET,
        "the same keyring opens them"
    );
    let response = c
        .get(format!("{b}/api/v1/sessions/kept"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the session token still works"
    );
    let (_, short) = call(&c, &b, Method::GET, "/api/v1/sessions/short", KEY_A, None).await;
    assert_eq!(
        (
            short["status"].as_str(),
            short["termination_reason"].as_str()
        ),
        (Some("expired"), Some("ttl_expired")),
        "{short}"
    );
    let (_, ended) = call(&c, &b, Method::GET, "/api/v1/sessions/ended", KEY_A, None).await;
    assert_eq!(ended, ended_before);
    let (status, _) = call(&c, &b, Method::GET, "/api/v1/sessions/other", KEY_B, None).await;
    assert_eq!(status, StatusCode::OK);
    // And it goes on: new calls on a restored session.
    let (status, _) = call(
        &c,
        &b,
        Method::POST,
        "/api/v1/sessions/kept/tools/execute",
        KEY_A,
        Some(json!({"tool_name": "t"})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(server.terminate().code(), Some(0));
}
