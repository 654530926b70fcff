//! The operators' listener and TLS, through the real binary: with
//! `server.admin_listen` the public port answers 404 `not_found` for `/admin/…` and
//! `/metrics` and the admin port serves them (and nothing of the tenants'
//! API); with `server.tls_cert_file` / `tls_key_file` both ports speak
//! HTTPS only, checked with a real TLS client (reqwest on rustls) that
//! trusts the test's own self-signed certificate.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The public and admin addresses the binary logged.
fn addresses(server: &ChildServer) -> (SocketAddr, SocketAddr) {
    let logs = server.logs.lock().unwrap();
    let line = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "listening")
        .expect("a listening line");
    let parse = |field: &str| line[field].as_str().unwrap().parse().unwrap();
    (parse("addr"), parse("admin_addr"))
}

fn write_config(dir: &Path, extra_server: &str) -> std::path::PathBuf {
    let path = dir.join("edge.toml");
    let text = config_toml(&dir.join("data"), 100, "").replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{extra_server}"),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Checks the split of routes between the two listeners.
async fn check_surfaces(client: &reqwest::Client, public: &str, admin: &str) {
    let get = |url: String, header: (&'static str, &'static str)| {
        let request = client.get(url).header(header.0, header.1);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let created = client
        .post(format!("{public}/api/v1/sessions"))
        .header("X-API-Key", KEY_A)
        .json(&json!({"session_id": "over-tls", "edge_mcp_id": "e"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    for path in ["/admin/stats", "/admin/sessions", "/metrics"] {
        let (status, body) = get(format!("{public}{path}"), ("X-Admin-Key", ADMIN_KEY)).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found")),
            "public {path}"
        );
        let (status, _) = get(format!("{admin}{path}"), ("X-Admin-Key", ADMIN_KEY)).await;
        assert_eq!(status, StatusCode::OK, "admin {path}");
    }
    let (status, _) = get(
        format!("{admin}/api/v1/sessions/over-tls"),
        ("X-API-Key", KEY_A),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "no tenant API on the admin port"
    );
    let (_, sessions) = get(
        format!("{admin}/admin/sessions"),
        ("X-Admin-Key", ADMIN_KEY),
    )
    .await;
    assert_eq!(sessions["sessions"][0]["session_id"], "over-tls");
    for base in [public, admin] {
        let (status, _) = get(format!("{base}/readyz"), ("X-Nothing", "")).await;
        assert_eq!(status, StatusCode::OK, "{base}/readyz");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_listener_takes_admin_and_metrics_off_the_public_port() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let server = ChildServer::start(&config).await;
    let (public, admin) = addresses(&server);
    check_surfaces(
        &client(),
        &format!("http://{public}"),
        &format!("http://{admin}"),
    )
    .await;
    assert_eq!(server.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_listeners_speak_tls_to_a_real_client() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_pem = certified.cert.pem();
    std::fs::write(dir.path().join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(
        dir.path().join("key.pem"),
        certified.key_pair.serialize_pem(),
    )
    .unwrap();
    let tls = format!(
        "tls_cert_file = {:?}\ntls_key_file = {:?}\n",
        dir.path().join("cert.pem").display().to_string(),
        dir.path().join("key.pem").display().to_string()
    );
    let config = write_config(dir.path(), &tls);
    let server = ChildServer::start_waiting(&config, false).await;
    let (public, admin) = addresses(&server);
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let public_url = format!("https://localhost:{}", public.port());
    let admin_url = format!("https://localhost:{}", admin.port());
    let mut ready = false;
    for _ in 0..250 {
        if let Ok(response) = trusting.get(format!("{public_url}/readyz")).send().await {
            if response.status() == StatusCode::OK {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready, "ready over TLS");
    check_surfaces(&trusting, &public_url, &admin_url).await;

    // Plain HTTP on a TLS port gets no HTTP answer; a client that does not
    // trust the certificate is refused by its own check.
    for port in [public.port(), admin.port()] {
        assert!(
            client()
                .get(format!("http://127.0.0.1:{port}/healthz"))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .is_err(),
            "plain HTTP on {port}"
        );
    }
    let untrusting = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    assert!(untrusting
        .get(format!("{public_url}/healthz"))
        .send()
        .await
        .is_err());
    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn a_bad_certificate_stops_serve_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
    let tls = format!(
        "tls_cert_file = {:?}\ntls_key_file = {:?}\n",
        dir.path().join("cert.pem").display().to_string(),
        dir.path().join("key.pem").display().to_string()
    );
    let config = write_config(dir.path(), &tls);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-sessions"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.tls_cert_file"), "{stderr}");
    assert!(
        !dir.path().join("data").exists(),
        "the store was not opened"
    );
}
