//! Shared set-up: a real server on 127.0.0.1:0 (in-process, or the real
//! binary as a child process) with two tenants and an admin key, and a
//! small HTTP client.

#![allow(dead_code)]

pub mod pg;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edge_sessions::auth::hash_key_hex;
use edge_sessions::model::time::Clock;
use edge_sessions::settings::Settings;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::sync::oneshot;

pub const TENANT_A: &str = "6f1c0d3e-8a4b-4c6e-9f10-2b3c4d5e6f70";
pub const TENANT_B: &str = "0b6e4a52-1d7c-4f3e-8a90-5c2d1e0f9a8b";
pub const KEY_A: &str = "key-tenant-a";
pub const KEY_B: &str = "key-tenant-b";
/// Tenant A's credential reader: scopes `sessions` and `passthrough:read`.
pub const KEY_A_READER: &str = "key-tenant-a-reader";
/// Tenant A's key with only `passthrough:read`.
pub const KEY_A_READ_ONLY: &str = "key-tenant-a-read-only";
pub const ADMIN_KEY: &str = "key-admin";

/// A config with two tenants (A limited to `limit_a` live sessions) and
/// `extra` TOML appended.
pub fn config_toml(data_dir: &Path, limit_a: usize, extra: &str) -> String {
    config_toml_with_storage(data_dir, limit_a, "", extra)
}

/// As [`config_toml`], with `storage` lines added to `[storage]`.
pub fn config_toml_with_storage(
    data_dir: &Path,
    limit_a: usize,
    storage: &str,
    extra: &str,
) -> String {
    let key_file = master_key_file(data_dir);
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[storage]
data_dir = {data_dir:?}
{storage}
[security]
master_key_file = {key_file:?}
[admin]
key_sha256 = ["{admin}"]
[[tenants]]
id = "{TENANT_A}"
name = "a"
max_active_sessions = {limit_a}
  [[tenants.api_keys]]
  sha256 = "{a}"
  [[tenants.api_keys]]
  sha256 = "{a_reader}"
  scopes = ["sessions", "passthrough:read"]
  [[tenants.api_keys]]
  sha256 = "{a_read_only}"
  scopes = ["passthrough:read"]
[[tenants]]
id = "{TENANT_B}"
name = "b"
  [[tenants.api_keys]]
  sha256 = "{b}"
{extra}
"#,
        data_dir = data_dir.display().to_string(),
        key_file = key_file.display().to_string(),
        admin = hash_key_hex(ADMIN_KEY),
        a = hash_key_hex(KEY_A),
        b = hash_key_hex(KEY_B),
        a_reader = hash_key_hex(KEY_A_READER),
        a_read_only = hash_key_hex(KEY_A_READ_ONLY),
    )
}

/// The keyring file the test configs use: next to `data_dir` (so servers
/// sharing a parent dir share the key), created once.
pub fn master_key_file(data_dir: &Path) -> PathBuf {
    let path = data_dir
        .parent()
        .unwrap_or(data_dir)
        .join("test-master.key");
    if !path.exists() {
        let keyring = edge_sessions::crypto::MasterKeyring::new(vec![
            edge_sessions::crypto::MasterKey::generate(),
        ])
        .unwrap();
        std::fs::write(&path, keyring.to_file_text().as_bytes()).unwrap();
    }
    path
}

/// An in-process server.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    /// The engine's clock: advance it to jump past deadlines.
    pub clock: Clock,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(1000, "").await
    }

    pub async fn start_with(limit_a: usize, extra: &str) -> Self {
        Self::start_with_storage(limit_a, "", extra).await
    }

    /// A server with `storage` lines added to `[storage]`.
    pub async fn start_with_storage(limit_a: usize, storage: &str, extra: &str) -> Self {
        Self::start_customized(limit_a, storage, extra, |_| {}).await
    }

    /// As [`TestServer::start_with_storage`], with the parsed settings
    /// changed by `customize` (keys of sections the config already has,
    /// such as `[server]`).
    pub async fn start_customized(
        limit_a: usize,
        storage: &str,
        extra: &str,
        customize: impl FnOnce(&mut Settings),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::from_toml(&config_toml_with_storage(
            &dir.path().join("data"),
            limit_a,
            storage,
            extra,
        ))
        .unwrap();
        customize(&mut settings);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let clock = Clock::system();
        let task = tokio::spawn(edge_sessions::service::run_with_clock(
            settings,
            listener,
            async move {
                let _ = stopped.await;
            },
            clock.clone(),
        ));
        let server = TestServer {
            base: format!("http://{addr}"),
            client: client(),
            dir,
            clock,
            stop: Some(stop),
            task: Some(task),
        };
        wait_ready(&server.client, &server.base).await;
        server
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        call(&self.client, &self.base, method, path, key, body).await
    }

    /// The text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Stops the server gracefully and waits until it has flushed.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Sends a request with a tenant key (`X-API-Key`), or an admin key when the
/// path starts with `/admin`. An empty key sends none.
pub async fn call(
    client: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let (status, _, value) = call_with_headers(client, base, method, path, key, body).await;
    (status, value)
}

/// As [`call`], answering the response's headers too.
pub async fn call_with_headers(
    client: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut request = client.request(method, format!("{base}{path}"));
    if !key.is_empty() {
        let header = if path.starts_with("/admin") {
            "X-Admin-Key"
        } else {
            "X-API-Key"
        };
        request = request.header(header, key);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, headers, value)
}

/// Creates a session of tenant A from `body`; answers the status and the
/// answer's body.
pub async fn create_with(client: &reqwest::Client, base: &str, body: Value) -> (StatusCode, Value) {
    call(
        client,
        base,
        Method::POST,
        "/api/v1/sessions",
        KEY_A,
        Some(body),
    )
    .await
}

/// Creates session `id` of tenant A with a minimal body (see [`create_with`]).
pub async fn create_id(client: &reqwest::Client, base: &str, id: &str) -> (StatusCode, Value) {
    create_with(
        client,
        base,
        serde_json::json!({"session_id": id, "edge_mcp_id": "edge"}),
    )
    .await
}

/// Reads with `read` every 20 ms until `done` holds of what it answers, or
/// about 6 s have passed; answers the last reading.
pub async fn poll<T>(mut read: impl AsyncFnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let mut value = read().await;
    for _ in 0..300 {
        if done(&value) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        value = read().await;
    }
    value
}

pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    for _ in 0..500 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status() == StatusCode::OK {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("server at {base} did not become ready");
}

/// The real binary as a child process.
pub struct ChildServer {
    pub child: Child,
    pub base: String,
    pub config: PathBuf,
    /// Every line the binary printed on stdout so far.
    pub stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Every log line (stderr) so far.
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// A test that fails half-way must not leave the binary running.
impl Drop for ChildServer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The address of a text log line `… listening addr=127.0.0.1:…`, with
/// or without colour codes.
fn text_listening_addr(line: &str) -> Option<SocketAddr> {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // An SGR sequence: ESC [ … m.
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let (_, rest) = plain.split_once(" listening addr=")?;
    rest.split_whitespace().next()?.parse().ok()
}

impl ChildServer {
    /// Starts the binary with `config` and waits until it listens and is
    /// ready. Both output streams are read to the end, so the child never
    /// blocks on a full pipe or writes to a closed one.
    pub async fn start(config: &Path) -> Self {
        Self::start_waiting(config, true).await
    }

    /// As [`ChildServer::start`]; with `ready` false it returns once the
    /// binary listens, without waiting for `/readyz`.
    pub async fn start_waiting(config: &Path, ready: bool) -> Self {
        Self::start_with_env(config, ready, &[]).await
    }

    /// As [`ChildServer::start_waiting`], with environment variables set
    /// over the defaults (JSON logs at `info`); text logs work too.
    pub async fn start_with_env(config: &Path, ready: bool, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_edge-sessions"));
        command
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("EDGE_SESSIONS__LOG__FORMAT", "json")
            .env("RUST_LOG", "info");
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout_lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = stdout_lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log_sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log_sink.lock().unwrap().push(line.clone());
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["message"] == "listening" {
                        let addr: SocketAddr = v["addr"].as_str().unwrap().parse().unwrap();
                        let _ = tx.send(addr);
                    }
                } else if let Some(addr) = text_listening_addr(&line) {
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await
            .unwrap()
            .expect("the binary logs its address");
        let base = format!("http://{addr}");
        if ready {
            wait_ready(&client(), &base).await;
        }
        ChildServer {
            child,
            base,
            config: config.to_owned(),
            stdout: stdout_lines,
            logs,
        }
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM and answers the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.child.wait().unwrap()
    }
}
