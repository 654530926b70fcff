//! The CLI's side of the admin API: where the server is, the admin key, and
//! calls that turn the contract's error body into one line for the operator.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Which server, with which key, and how to print (shared by every command
/// that drives a running server).
#[derive(Debug, Clone, clap::Args)]
pub struct Remote {
    /// The server's base URL.
    #[arg(
        long,
        env = "EDGE_SESSIONS_URL",
        default_value = "http://127.0.0.1:8081",
        global = true
    )]
    pub url: String,
    /// An admin key (`X-Admin-Key`).
    #[arg(
        long,
        env = "EDGE_SESSIONS_ADMIN_KEY",
        hide_env_values = true,
        global = true
    )]
    pub admin_key: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line or the input is wrong (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The server refused or failed the call.
    #[error("{method} {path}: {status} {code}: {message}")]
    Api {
        /// The call's method.
        method: Method,
        /// The call's path.
        path: String,
        /// The answer's status.
        status: StatusCode,
        /// The error body's `code`.
        code: String,
        /// The error body's `error`.
        message: String,
    },
    /// The server could not be reached, or a file could not be written.
    #[error("{0}")]
    Io(String),
}

impl CliError {
    /// The process exit code: 2 for what the operator can fix in the
    /// command, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Api { status, .. } if status.is_client_error() => 2,
            _ => 1,
        }
    }
}

/// A client of one server's admin API.
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Client {
    /// A client for `remote`; fails without an admin key.
    pub fn new(remote: &Remote) -> Result<Self, CliError> {
        let key = remote
            .admin_key
            .clone()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                CliError::Usage(
                    "no admin key: pass --admin-key or set EDGE_SESSIONS_ADMIN_KEY".to_owned(),
                )
            })?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| CliError::Io(format!("cannot build an HTTP client: {e}")))?;
        Ok(Client {
            http,
            base: remote.url.trim_end_matches('/').to_owned(),
            key,
        })
    }

    /// Sends `method path` with `body`; answers the response once its
    /// status is a success, else the error.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<reqwest::Response, CliError> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .header("X-Admin-Key", &self.key);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| CliError::Io(format!("{method} {}{path}: {e}", self.base)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body: Value = response.json().await.unwrap_or(Value::Null);
        Err(CliError::Api {
            method,
            path: path.to_owned(),
            status,
            code: body["code"].as_str().unwrap_or("unknown").to_owned(),
            message: body["error"].as_str().unwrap_or("no error body").to_owned(),
        })
    }

    /// As [`Client::send`], answering the JSON body (`null` when empty).
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CliError> {
        let response = self.send(method.clone(), path, body).await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|e| CliError::Io(format!("{method} {path}: {e}")))?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| CliError::Io(format!("{method} {path}: the answer is not JSON: {e}")))
    }
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
