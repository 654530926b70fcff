//! A data dir written by the release before the write-ahead log (sled only,
//! the PostgreSQL outbox under `O` keys; made by
//! `tests/fixtures/make_data_v1.py` with that release's binary) is read by
//! this one: every session, count, execution, token and credential comes
//! back, and the old outbox still reaches PostgreSQL.

mod common;

use std::path::{Path, PathBuf};

use common::pg::TempPostgres;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// What the old release answered, recorded when the fixture was made.
fn facts() -> Value {
    let text = std::fs::read_to_string(fixture("data-v1.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Unpacks the fixture (`data/` and the keyring next to it) into `dir` and
/// writes a config for it.
fn unpack(dir: &Path, postgres: &str) -> PathBuf {
    let status = std::process::Command::new("tar")
        .arg("xzf")
        .arg(fixture("data-v1.tar.gz"))
        .arg("-C")
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success());
    let config = dir.join("edge-sessions.toml");
    // Sessions live for decades and never turn idle, as when they were made,
    // and the fixture's ended sessions stay readable however long ago it
    // was made (the default retention, a day, would purge them).
    let extra = format!(
        "[sessions]\nidle_after_seconds = 2000000000\nretention_seconds = 2000000000\n{postgres}"
    );
    std::fs::write(&config, config_toml(&dir.join("data"), 1000, &extra)).unwrap();
    config
}

async fn get(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    bearer: &str,
) -> (StatusCode, Value) {
    let response = client
        .get(format!("{base}{path}"))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A view without the fields that follow the clock.
fn timeless(mut view: Value) -> Value {
    let object = view.as_object_mut().unwrap();
    object.remove("idle_seconds");
    object.remove("session_age_seconds");
    view
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_the_previous_format_reads_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let config = unpack(dir.path(), "");
    let server = ChildServer::start(&config).await;
    let client = client();
    let facts = facts();
    let sessions = facts["sessions"].as_object().unwrap();
    for (id, fact) in sessions {
        let key = KEY_A;
        let (status, view) = call(
            &client,
            &server.base,
            Method::GET,
            &format!("/api/v1/sessions/{id}"),
            key,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{id}: {view}");
        assert_eq!(timeless(view), timeless(fact["view"].clone()), "{id}");
        for what in ["metrics", "tools/executions?limit=100"] {
            let (status, body) = call(
                &client,
                &server.base,
                Method::GET,
                &format!("/api/v1/sessions/{id}/{what}"),
                key,
                None,
            )
            .await;
            assert_eq!(status, StatusCode::OK);
            let field = if what == "metrics" {
                "metrics"
            } else {
                "executions"
            };
            assert_eq!(body, fact[field], "{id} {what}");
        }
        // The session token (hash) came along.
        let token = fact["session_token"].as_str().unwrap();
        let (status, view) = get(
            &client,
            &server.base,
            &format!("/api/v1/sessions/{id}"),
            token,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{id} with its token");
        assert_eq!(view["session_id"], id.as_str());
    }
    let (status, _) = call(
        &client,
        &server.base,
        Method::GET,
        "/api/v1/sessions/old-b",
        KEY_B,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "tenant B's session");
    // The credentials open with the same keyring.
    let (status, body) = call(
        &client,
        &server.base,
        Method::GET,
        "/api/v1/sessions/old-0/passthrough-auth",
        KEY_A_READER,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.to_string().contains("ghp_fixture_secret"), "{body}");
    // Live sessions keep working, and the change survives a restart.
    let (status, _) = call(
        &client,
        &server.base,
        Method::POST,
        "/api/v1/sessions/old-4/tools/execute",
        KEY_A,
        Some(serde_json::json!({"tool_name": "after-upgrade"})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(server.terminate().code(), Some(0));
    assert!(
        dir.path().join("data/wal").is_dir(),
        "the new format has its log"
    );
    let server = ChildServer::start(&config).await;
    let (_, view) = call(
        &client,
        &server.base,
        Method::GET,
        "/api/v1/sessions/old-4",
        KEY_A,
        None,
    )
    .await;
    assert_eq!(view["tool_execution_count"], 5);
    assert_eq!(server.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_formats_outbox_still_reaches_postgres() {
    let pg = TempPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let config = unpack(dir.path(), &format!("[postgres]\nurl = {:?}\n", pg.url));
    let server = ChildServer::start(&config).await;
    let client = client();
    let (status, body) = call(
        &client,
        &server.base,
        Method::POST,
        "/admin/flush",
        ADMIN_KEY,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Every session and execution the old release acknowledged, with the
    // counts and states it answered.
    let facts = facts();
    let sessions = facts["sessions"].as_object().unwrap();
    // Tenant A's sessions plus tenant B's `old-b`.
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.edge_mcp_sessions") as usize,
        sessions.len() + 1
    );
    let executions: i64 = sessions
        .values()
        .map(|fact| fact["view"]["tool_execution_count"].as_i64().unwrap())
        .sum();
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.session_tool_executions"),
        executions
    );
    assert_eq!(
        pg.scalar("SELECT sum(tool_execution_count) FROM mcp.edge_mcp_sessions"),
        executions
    );
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.edge_mcp_sessions WHERE session_id = 'old-3' AND status = 'terminated'"),
        1
    );
    let (_, readyz) = call(&client, &server.base, Method::GET, "/readyz", "", None).await;
    assert_eq!(readyz["postgres"]["outbox_depth"], 0, "{readyz}");
    assert_eq!(server.terminate().code(), Some(0));
}
