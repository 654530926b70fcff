//! The hardening rules of the contract (v1.1), through the real port or the
//! real binary: slow clients, file modes, CSV formula quoting, termination
//! reasons and durations, log filtering, browser headers, the
//! failed-authentication limit, and the first-run messages.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use futures::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_cells_that_start_like_formulas_are_quoted() {
    let server = TestServer::start().await;
    let formula = "=HYPERLINK(\"http://evil.example\",\"click\")";
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/sessions",
            KEY_A,
            Some(json!({"session_id": "csv-1", "edge_mcp_id": formula, "client_name": "@SUM(A1)"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let export = |format: &'static str| {
        let server = &server;
        async move {
            let response = server
                .client
                .get(format!(
                    "{}/admin/sessions/export?format={format}&tenant_id={TENANT_A}",
                    server.base
                ))
                .header("X-Admin-Key", ADMIN_KEY)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.text().await.unwrap()
        }
    };
    let csv_text = export("csv").await;
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let headers = reader.headers().unwrap().clone();
    let column = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let row = reader
        .records()
        .map(Result::unwrap)
        .find(|r| &r[0] == "csv-1")
        .unwrap();
    assert_eq!(&row[column("edge_mcp_id")], format!("'{formula}"));
    assert_eq!(&row[column("client_name")], "'@SUM(A1)");
    assert_eq!(&row[column("status")], "active", "other cells unchanged");

    let ndjson = export("ndjson").await;
    let line: Value = ndjson
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["session_id"] == "csv-1")
        .unwrap();
    assert_eq!(line["edge_mcp_id"], formula, "NDJSON is unchanged");
    assert_eq!(line["client_name"], "@SUM(A1)");
}
