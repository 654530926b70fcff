//! `GET /metrics`: the contract's metrics with their labels and buckets,
//! the engine's own, no session ids in labels, and `promtool check metrics`
//! on the output when promtool (Debian package `prometheus`) is installed;
//! and JSON access log lines carrying the request id.

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_page_has_the_contract_metrics_and_passes_promtool() {
    let server = TestServer::start().await;
    for (i, client_type) in ["claude-code", "ide", "cli"].iter().enumerate() {
        let body =
            json!({"session_id": format!("m-{i}"), "edge_mcp_id": "e", "client_type": client_type});
        let (status, _) = server
            .call(Method::POST, "/api/v1/sessions", KEY_A, Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    for i in 0..4 {
        let body =
            json!({"tool_name": "t", "error": if i == 0 { json!("boom") } else { json!(null) }});
        server
            .call(
                Method::POST,
                "/api/v1/sessions/m-0/tools/execute",
                KEY_A,
                Some(body),
            )
            .await;
    }
    server
        .call(Method::DELETE, "/api/v1/sessions/m-2", KEY_A, None)
        .await;
    server
        .call(Method::GET, "/api/v1/sessions/nope", KEY_A, None)
        .await;

    let response = server
        .client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    let tenant = format!("tenant_id=\"{TENANT_A}\"");
    let has = |needle: &str| {
        text.lines()
            .any(|l| !l.starts_with('#') && l.contains(needle))
    };
    // The contract's three.
    assert!(has("sessions_created_total{") && text.contains("client_type=\"claude-code\""));
    assert!(text
        .lines()
        .any(|l| l.starts_with("sessions_active{") && l.contains(&tenant)));
    for le in [
        "60", "120", "240", "480", "960", "1920", "3840", "7680", "15360", "30720", "+Inf",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("session_duration_seconds_bucket{")
                    && l.contains(&format!("le=\"{le}\""))),
            "bucket {le}"
        );
    }
    // The engine's own.
    for name in [
        "http_requests_total{",
        "http_request_duration_seconds_bucket{",
        "tool_executions_total{",
        "tool_execution_errors_total{",
        "write_behind_queue_depth",
        "write_behind_batch_size_bucket",
        "write_behind_flush_seconds_bucket",
        "write_behind_flush_lag_seconds",
        "session_actors{",
        "sessions_ended_total{",
        // What deploy/prometheus/alerts.yaml reads, and the process.
        "ready ",
        "tenant_max_active_sessions{",
        "build_info{",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(has(name), "{name} missing");
    }
    assert!(
        text.contains(&format!(
            "build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "build_info carries the version"
    );
    assert!(text.lines().any(|l| l == "ready 1"), "ready while serving");
    assert!(text.contains("status=\"404\""), "requests by status");
    assert!(
        text.contains("route=\"/api/v1/sessions/{session_id}\""),
        "routes, not raw paths"
    );
    for id in ["m-0", "m-1", "m-2", "nope"] {
        assert!(!text.contains(id), "a session id ({id}) in a label");
    }

    match Command::new("promtool").arg("--version").output() {
        Err(_) => eprintln!("promtool is not installed (Debian package prometheus): the format check is skipped here; .ci/run installs it"),
        Ok(_) => {
            let mut child = Command::new("promtool")
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_id_in_the_request_span() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edge.toml");
    std::fs::write(&config, config_toml(&dir.path().join("data"), 10, "")).unwrap();
    let server = ChildServer::start(&config).await;
    let response = client()
        .get(format!("{}/api/v1/sessions/nope", server.base))
        .header("X-API-Key", KEY_A)
        .header("X-Request-Id", "trace-me-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-me-123");
    let mut line = None;
    for _ in 0..100 {
        line = server
            .logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "request" && v["span"]["request_id"] == "trace-me-123");
        if line.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let line = line.expect("a JSON access log line in the request's span");
    assert_eq!(line["status"], 404);
    assert_eq!(line["route"], "/api/v1/sessions/{session_id}");
    assert_eq!(line["method"], "GET");
    assert!(line["latency_us"].is_u64());
    assert_eq!(server.terminate().code(), Some(0));
}

/// The shipped alert rules and scrape config pass promtool (syntax, and the
/// rules' unit tests in deploy/prometheus/alerts.test.yaml).
#[test]
fn the_alert_rules_pass_promtool() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!("promtool is not installed (Debian package prometheus): skipped here; .ci/run installs it");
        return;
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");
    for args in [
        vec!["check", "rules", "alerts.yaml"],
        vec!["test", "rules", "alerts.test.yaml"],
        vec!["check", "config", "--syntax-only", "prometheus.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
