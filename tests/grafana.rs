//! The Grafana dashboard (`deploy/grafana/session-management.json`) cannot
//! rot: every metric its queries name appears in the server's `/metrics`
//! output (a server with the PostgreSQL tier on and a WebSocket open, so
//! every metric family exists).

mod common;

use std::collections::BTreeSet;

use common::pg::TempPostgres;
use common::*;
use reqwest::Method;
use serde_json::{json, Value};

/// Metric names in a PromQL expression: identifiers that are not functions,
/// keywords, or label names inside `by (...)` / `{...}`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const NOT_METRICS: [&str; 12] = [
        "sum",
        "rate",
        "irate",
        "increase",
        "histogram_quantile",
        "max",
        "min",
        "avg",
        "by",
        "without",
        "count",
        "le",
    ];
    // Drop label matchers and grouping clauses first.
    let mut cleaned = String::new();
    let mut depth_braces = 0;
    for c in expr.chars() {
        match c {
            '{' => depth_braces += 1,
            '}' => depth_braces -= 1,
            _ if depth_braces > 0 => {}
            _ => cleaned.push(c),
        }
    }
    let mut without_by = String::new();
    let mut rest = cleaned.as_str();
    while let Some(at) = rest.find("by (") {
        without_by.push_str(&rest[..at]);
        let close = rest[at..].find(')').map_or(rest.len(), |i| at + i + 1);
        rest = &rest[close..];
    }
    without_by.push_str(rest);
    let mut names = BTreeSet::new();
    let mut current = String::new();
    for c in without_by.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            current.push(c);
        } else {
            if current
                .chars()
                .next()
                .is_some_and(|f| f.is_ascii_alphabetic())
                && !NOT_METRICS.contains(&current.as_str())
                && !(c == '['
                    && current.chars().all(|x| x.is_ascii_alphanumeric())
                    && current.len() <= 3)
            {
                names.insert(current.clone());
            }
            current.clear();
        }
    }
    // Range selectors like [5m] and [1h] are not names.
    names.retain(|n| {
        !(n.len() <= 3
            && n.chars().last().is_some_and(|c| "smhd".contains(c))
            && n[..n.len() - 1].chars().all(|c| c.is_ascii_digit()))
    });
    names
}

#[test]
fn names_are_found_in_expressions() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le, route) (rate(http_request_duration_seconds_bucket{route=~"x"}[5m])))"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["http_request_duration_seconds_bucket"]
    );
    let names = metric_names(r#"sum(rate(tool_executions_total{tenant_id=~"$tenant"}[5m]))"#);
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["tool_executions_total"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_exists() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/grafana/session-management.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queried.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    assert!(queried.len() >= 15, "{queried:?}");

    let pg = TempPostgres::start();
    let server = TestServer::start_with(1000, &format!("[postgres]\nurl = {:?}\n", pg.url)).await;
    let created = {
        let (_, c) = server
            .call(
                Method::POST,
                "/api/v1/sessions",
                KEY_A,
                Some(json!({"session_id": "g-1", "edge_mcp_id": "e"})),
            )
            .await;
        c
    };
    server
        .call(
            Method::POST,
            "/api/v1/sessions/g-1/tools/execute",
            KEY_A,
            Some(json!({"tool_name": "t", "error": "x"})),
        )
        .await;
    server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(json!({"session_id": "g-2", "edge_mcp_id": "e"})),
        )
        .await;
    server
        .call(Method::DELETE, "/api/v1/sessions/g-2", KEY_A, None)
        .await;
    let token = created["session_token"].as_str().unwrap();
    let url = format!(
        "{}/api/v1/sessions/g-1/ws?token={token}",
        server.base.replacen("http", "ws", 1)
    );
    let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    server
        .call(Method::POST, "/admin/flush", ADMIN_KEY, None)
        .await;
    let text = server.metrics().await;
    let exposed: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<_> = queried
        .iter()
        .filter(|n| !exposed.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "queried by the dashboard but not exposed: {missing:?}"
    );
    drop(socket);
    server.stop().await;
}
