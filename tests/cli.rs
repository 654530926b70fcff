//! The operator CLI against a real server (the binary, twice: the server
//! and the command): sessions list|show|terminate, stats, backup, export,
//! with the URL and admin key from the environment, tables and `--json`.

mod common;

use std::process::{Command, Output};

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const USER: &str = "33333333-3333-4333-8333-333333333333";

fn cli(base: &str, key: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge-sessions"))
        .args(args)
        .env("EDGE_SESSIONS_URL", base)
        .env("EDGE_SESSIONS_ADMIN_KEY", key)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json_of(out: &Output) -> Value {
    serde_json::from_str(&ok(out)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_drive_a_server_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edge.toml");
    std::fs::write(&config, config_toml(&dir.path().join("data"), 1000, "")).unwrap();
    let server = ChildServer::start(&config).await;
    let (c, b) = (client(), server.base.clone());
    for (key, id, user) in [
        (KEY_A, "cli-1", USER),
        (KEY_A, "cli-2", USER),
        (KEY_B, "cli-3", USER),
        (KEY_A, "cli-4", "44444444-4444-4444-8444-444444444444"),
    ] {
        let (status, _) = call(
            &c,
            &b,
            Method::POST,
            "/api/v1/sessions",
            key,
            Some(json!({"session_id": id, "edge_mcp_id": "edge", "user_id": user})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
    }

    // list: JSON and a table; filters; pages.
    let all = json_of(&cli(&b, ADMIN_KEY, &["sessions", "list", "--json"]));
    assert_eq!(all["count"], 4);
    let table = ok(&cli(
        &b,
        ADMIN_KEY,
        &["sessions", "list", "--tenant", TENANT_B],
    ));
    assert!(
        table.contains("cli-3") && !table.contains("cli-1"),
        "{table}"
    );
    let page = ok(&cli(&b, ADMIN_KEY, &["sessions", "list", "--limit", "2"]));
    assert!(page.contains("more: --cursor"), "{page}");
    let every = json_of(&cli(
        &b,
        ADMIN_KEY,
        &["sessions", "list", "--limit", "1", "--all", "--json"],
    ));
    assert_eq!(every["count"], 4, "--all follows the cursors");
    // show
    let one = json_of(&cli(
        &b,
        ADMIN_KEY,
        &["sessions", "show", TENANT_A, "cli-1", "--json"],
    ));
    assert_eq!(one["session_id"], "cli-1");
    let shown = ok(&cli(
        &b,
        ADMIN_KEY,
        &["sessions", "show", TENANT_A, "cli-1"],
    ));
    assert!(
        shown.contains("edge_mcp_id") && shown.contains("cli-1"),
        "{shown}"
    );
    // terminate one, then a user's
    ok(&cli(
        &b,
        ADMIN_KEY,
        &[
            "sessions",
            "terminate",
            TENANT_A,
            "cli-4",
            "--reason",
            "cli drill",
        ],
    ));
    let (_, ended) = call(&c, &b, Method::GET, "/api/v1/sessions/cli-4", KEY_A, None).await;
    assert_eq!(ended["termination_reason"], "cli drill");
    let bulk = ok(&cli(
        &b,
        ADMIN_KEY,
        &["sessions", "terminate", "--user", USER],
    ));
    assert!(bulk.contains("terminated 3 live session(s)"), "{bulk}");
    let left = json_of(&cli(
        &b,
        ADMIN_KEY,
        &["sessions", "list", "--status", "active", "--json"],
    ));
    assert_eq!(left["count"], 0);

    // stats
    let stats = json_of(&cli(&b, ADMIN_KEY, &["stats", "--once", "--json"]));
    assert!(stats["sessions"]["live"].is_number(), "{stats}");
    let view = ok(&cli(&b, ADMIN_KEY, &["stats", "--once"]));
    assert!(
        view.contains("flush lag") && view.contains("top tenants"),
        "{view}"
    );

    // backup and export to files
    let file = dir.path().join("cli.esbk");
    let saved = ok(&cli(&b, ADMIN_KEY, &["backup", file.to_str().unwrap()]));
    assert!(saved.contains("4 sessions"), "{saved}");
    assert!(std::fs::read(&file).unwrap().starts_with(b"ESBACKUP"));
    assert!(!dir.path().join("cli.esbk.partial").exists());
    let export = dir.path().join("sessions.ndjson");
    ok(&cli(
        &b,
        ADMIN_KEY,
        &[
            "export",
            "--format",
            "ndjson",
            "-o",
            export.to_str().unwrap(),
        ],
    ));
    assert_eq!(std::fs::read_to_string(&export).unwrap().lines().count(), 4);
    let csv = ok(&cli(&b, ADMIN_KEY, &["export", "--tenant", TENANT_B]));
    assert!(
        csv.starts_with("session_id,") && csv.contains("cli-3"),
        "{csv}"
    );

    // Mistakes: one line and exit 2.
    for (key, args, says) in [
        ("", vec!["sessions", "list"], "no admin key"),
        ("wrong-key", vec!["sessions", "list"], "401"),
        (
            ADMIN_KEY,
            vec!["sessions", "terminate"],
            "TENANT SESSION_ID",
        ),
        (
            ADMIN_KEY,
            vec!["sessions", "show", "not-a-tenant", "x"],
            "validation_failed",
        ),
        (
            ADMIN_KEY,
            vec!["sessions", "list", "--status", "sleeping"],
            "validation_failed",
        ),
    ] {
        let out = cli(&b, key, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    assert_eq!(server.terminate().code(), Some(0));
}
