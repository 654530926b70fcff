//! Scale run (issue 9's goal table): the 1M-session figures and the RSS per
//! open session WebSocket, on the real release binary.
//!
//! The server is `target/release/edge-sessions` as a child process (as in
//! `benches/compare.rs`): a temporary data dir, a generated config with one
//! tenant and one API key (given as its sha256 hex), every rate limit 0 =
//! unlimited, `storage.durability = "sync"`, and sessions that cannot end
//! during the run (ttl and idle timeout 7 days, `idle_after_seconds` one day,
//! so no session changes state while the run lasts). Everything on
//! 127.0.0.1, client and server on the same cores.
//!
//! Phases:
//!
//! 1. **Creates over HTTP** until `SCALE_SESSIONS` live sessions exist:
//!    `wrk` (2 threads, 64 connections, `--latency`) posting
//!    `POST /api/v1/sessions` with a unique session id per request, in
//!    consecutive rounds of `SCALE_ROUND_SECONDS` (10). Each round's Lua
//!    script carries a request budget (the sessions still missing, split over
//!    the threads), so no round overshoots; a thread that reached its share
//!    stops, and the driver interrupts wrk (SIGINT, wrk then reports the time
//!    it really ran) as soon as the server's live count reaches the target.
//!    The count is the server's (`sessions_active` of `GET /metrics`), never
//!    wrk's. Per round: creates/s (sessions the server gained / wrk's run
//!    time), p99, non-2xx answers and socket errors; overall: the average
//!    creates/s and the worst p99 of any round.
//! 2. **RSS per live session**: the server's `VmRSS` (`/proc/<pid>/status`)
//!    after start, and after all sessions exist (after a settling pause);
//!    the difference divided by the count.
//! 3. **Restart recovery**: SIGTERM (waits for the exit, exit status shown),
//!    a new process on the same data dir, time from spawn to the first 200
//!    of `GET /readyz`; the live count after recovery must equal the count
//!    before (`GET /api/v1/sessions/metrics`, the engine's tenant figures,
//!    and the `sessions_active` gauge).
//! 4. **RSS per open session WebSocket** (`SCALE_SOCKETS`, 0 skips it): a
//!    fresh server, `SCALE_SOCKETS` sessions created over HTTP (their
//!    `session_token`s kept), then one `GET /api/v1/sessions/{id}/ws` per
//!    session, authenticated with `Authorization: Bearer <session_token>`,
//!    one `session.heartbeat` request each and its answer awaited, 200
//!    sockets opening at a time; all kept open while the server's RSS is
//!    read; then all closed, and the RSS read once more.
//!
//! Run: `cargo bench --bench scale` (builds the release binary too). Needs
//! `wrk` (apt package `wrk`). The default run (1,000,000 sessions, 10,000
//! sockets) takes a few minutes and a few GiB of memory and disk; a small
//! one: `SCALE_SESSIONS=20000 SCALE_SOCKETS=1000 cargo bench --bench scale`.
//! The binary does nothing unless cargo bench started it (it checks for the
//! `--bench` argument), so `cargo test --benches` never runs the load.
//!
//! Environment knobs:
//! * `SCALE_SESSIONS` (default 1,000,000): live sessions to create;
//! * `SCALE_SOCKETS` (default 10,000; 0 skips phase 4): open WebSockets;
//! * `SCALE_ROUND_SECONDS` (default 10): length of one wrk round;
//! * `SCALE_CONNECTIONS` (default 64): wrk connections;
//! * `SCALE_CREATE_LIMIT_SECONDS` (default 3600): give up when creating
//!   takes longer than this;
//! * `SCALE_BINARY`: another edge-sessions binary to measure.
//!
//! The open-file limit is raised (setrlimit) to what the sockets need before
//! any child starts, so the server inherits it. Every child (server, wrk) is
//! held by a guard that kills it when dropped (error, panic, early return);
//! SIGINT / SIGTERM kill them too and remove the temp dir; every phase has a
//! deadline.

#[path = "support/mod.rs"]
mod support;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use sha2::Digest as _;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The tenant's API key; the config holds only its sha256 hex.
use support::{
    clean_up_on_signal, find_on_path, free_port, http_call, lua_str, ChildGuard, CLEANUP,
};

const API_KEY: &str = "scale-bench-key";
const TENANT_ID: &str = "5a0e2b7c-3d4f-4e6a-8b9c-0d1e2f3a4b5c";
/// wrk threads: one per core of the 2-core machine this was written for.
const WRK_THREADS: usize = 2;
/// ttl and idle timeout of every session (and the tenant's caps): 7 days.
const SESSION_SECONDS: u32 = 7 * 24 * 3600;
/// WebSockets opening at once.
const WS_CONCURRENCY: usize = 200;
/// Creates in flight while preparing the WebSocket sessions.
const HTTP_CONCURRENCY: usize = 64;
/// Pause before reading the RSS (write-behind, checkpoint and allocator
/// settle).
const SETTLE: Duration = Duration::from_secs(3);
/// The heartbeat every socket sends once.
const HEARTBEAT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"session.heartbeat"}"#;

// ---------------------------------------------------------------------------
// Settings and small helpers

/// The environment knobs (see the module doc).
struct Knobs {
    sessions: u64,
    sockets: usize,
    round_seconds: u64,
    connections: usize,
    create_limit: Duration,
}

impl Knobs {
    fn from_env() -> Result<Self, String> {
        let knobs = Knobs {
            sessions: env_or("SCALE_SESSIONS", 1_000_000)?,
            sockets: env_or("SCALE_SOCKETS", 10_000)?,
            round_seconds: env_or("SCALE_ROUND_SECONDS", 10)?,
            connections: env_or("SCALE_CONNECTIONS", 64)?,
            create_limit: Duration::from_secs(env_or("SCALE_CREATE_LIMIT_SECONDS", 3600)?),
        };
        if knobs.sessions == 0 || knobs.round_seconds == 0 || knobs.connections < WRK_THREADS {
            return Err(format!(
                "SCALE_SESSIONS and SCALE_ROUND_SECONDS must be > 0, SCALE_CONNECTIONS >= {WRK_THREADS}"
            ));
        }
        Ok(knobs)
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(text) if !text.trim().is_empty() => text
            .trim()
            .replace('_', "")
            .parse()
            .map_err(|_| format!("{name}={text:?} is not a valid number")),
        _ => Ok(default),
    }
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1_048_576.0)
}

fn fmt_ms(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.2} ms"))
}

/// A process's resident set (`VmRSS` of `/proc/<pid>/status`), in bytes.
fn rss_bytes(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    status
        .lines()
        .find_map(|line| {
            let kib = line.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?;
            kib.trim().parse::<u64>().ok()
        })
        .map(|kib| kib * 1024)
        .ok_or_else(|| format!("no VmRSS in {path}"))
}

/// Raises this process's open-file limit to `needed` (children inherit it).
/// Answers a line for the report; an error when it stays below `needed`.
fn raise_open_files(needed: libc::rlim_t) -> Result<String, String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit / setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        ));
    }
    if limit.rlim_cur >= needed {
        return Ok(format!(
            "open-file limit {} (soft), enough for {needed}",
            limit.rlim_cur
        ));
    }
    let wanted = libc::rlimit {
        rlim_cur: needed,
        rlim_max: limit.rlim_max.max(needed),
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0 {
        return Ok(format!(
            "open-file limit raised from {} to {needed}",
            limit.rlim_cur
        ));
    }
    let raise_error = std::io::Error::last_os_error();
    // Not allowed above the hard limit (not root): go as far as it allows.
    let capped = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) };
    Err(format!(
        "cannot raise the open-file limit to {needed} ({raise_error}); it is {} (hard limit {}): \
         lower SCALE_SOCKETS or raise the hard limit (ulimit -Hn, as root)",
        limit.rlim_max.max(limit.rlim_cur),
        limit.rlim_max
    ))
}

// ---------------------------------------------------------------------------
// Child processes

// ---------------------------------------------------------------------------
// edge-sessions as a child process

/// The release binary, its address and its last log lines.
struct EdgeServer {
    guard: ChildGuard,
    addr: SocketAddr,
    /// The last log lines (stderr), for an error report.
    logs: Arc<Mutex<VecDeque<String>>>,
    /// How many warn/error lines it logged.
    warnings: Arc<Mutex<u64>>,
}

impl EdgeServer {
    /// Starts the binary on `dir` (data in `dir/data`; the master key is
    /// made at the first start and kept), on a fresh port, and waits at
    /// most `ready_limit` for `/readyz`. Answers the server and the time
    /// from spawn to the first 200.
    fn start(dir: &Path, ready_limit: Duration) -> Result<(Self, Duration), String> {
        let binary = std::env::var_os("SCALE_BINARY").map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_edge-sessions")),
            PathBuf::from,
        );
        if !binary.is_file() {
            return Err(format!(
                "{} is missing: run `cargo build --release` (cargo bench builds it)",
                binary.display()
            ));
        }
        let key_file = dir.join("master.key");
        if !key_file.is_file() {
            let key: [u8; 32] = rand::random();
            std::fs::write(
                &key_file,
                format!(
                    "{}\n",
                    base64::engine::general_purpose::STANDARD.encode(key)
                ),
            )
            .map_err(|e| format!("{}: {e}", key_file.display()))?;
        }
        let port = free_port()?;
        let config = format!(
            r#"# Generated by benches/scale.rs
[server]
listen = "127.0.0.1:{port}"

[storage]
data_dir = {data_dir:?}
durability = "sync"

[sessions]
# Nothing ends or changes state during the run.
default_idle_timeout_seconds = {SESSION_SECONDS}
default_ttl_seconds = {SESSION_SECONDS}
idle_after_seconds = 86400

[security]
master_key_file = {key_file:?}

[rate_limits]
# 0 = unlimited: this measures the server, not a budget.
create_per_second = 0
read_per_second = 0
write_per_second = 0
admin_per_second = 0

[log]
format = "json"
level = "warn"

[[tenants]]
id = "{TENANT_ID}"
name = "scale"
max_active_sessions = 100000000
max_ttl_seconds = {SESSION_SECONDS}
max_idle_timeout_seconds = {SESSION_SECONDS}
  [[tenants.api_keys]]
  sha256 = "{sha}"
  scopes = ["sessions"]
"#,
            data_dir = dir.join("data").display().to_string(),
            key_file = key_file.display().to_string(),
            sha = hex::encode(sha2::Sha256::digest(API_KEY.as_bytes())),
        );
        let config_path = dir.join("edge-sessions.toml");
        std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let spawned = Instant::now();
        let mut guard = ChildGuard::spawn(
            "edge-sessions",
            Command::new(&binary)
                .arg("serve")
                .arg("--config")
                .arg(&config_path)
                .env_remove("RUST_LOG")
                .env_remove("EDGE_SESSIONS_MASTER_KEY")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )?;
        // Drain both pipes for the server's whole life.
        let stdout = guard.child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || for _ in BufReader::new(stdout).lines() {});
        let stderr = guard.child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(VecDeque::new()));
        let warnings = Arc::new(Mutex::new(0u64));
        let (log_sink, warn_sink) = (logs.clone(), warnings.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("\"WARN\"") || line.contains("\"ERROR\"") {
                    *warn_sink.lock().unwrap() += 1;
                }
                let mut logs = log_sink.lock().unwrap();
                if logs.len() == 200 {
                    logs.pop_front();
                }
                logs.push_back(line);
            }
        });
        let mut server = EdgeServer {
            guard,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            logs,
            warnings,
        };
        let deadline = spawned + ready_limit;
        loop {
            server.check_alive()?;
            if let Ok((200, _)) = http_call(
                API_KEY,
                server.addr,
                "GET",
                "/readyz",
                None,
                Duration::from_secs(5),
            ) {
                return Ok((server, spawned.elapsed()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "edge-sessions not ready within {ready_limit:?}{}",
                    server.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.guard.child.id()
    }

    fn rss(&self) -> Result<u64, String> {
        rss_bytes(self.pid())
    }

    fn check_alive(&mut self) -> Result<(), String> {
        self.guard
            .check_alive()
            .map_err(|e| format!("{e}{}", self.log_tail()))
    }

    fn log_tail(&self) -> String {
        let logs = self.logs.lock().unwrap();
        let mut out = String::from("\nlast log lines:\n");
        for line in logs.iter().rev().take(20).rev() {
            let _ = writeln!(out, "  {line}");
        }
        out
    }

    fn warnings(&self) -> u64 {
        *self.warnings.lock().unwrap()
    }

    /// SIGTERM, then waits at most `limit` for the exit; answers how long
    /// it took and the exit status. Past the limit the guard kills it.
    fn stop(mut self, limit: Duration) -> Result<(Duration, ExitStatus), String> {
        let started = Instant::now();
        self.guard.signal(libc::SIGTERM)?;
        loop {
            match self.guard.child.try_wait() {
                Ok(Some(status)) => return Ok((started.elapsed(), status)),
                Ok(None) if started.elapsed() > limit => {
                    return Err(format!(
                        "edge-sessions did not exit within {limit:?} of SIGTERM; killed{}",
                        self.log_tail()
                    ))
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("edge-sessions: {e}")),
            }
        }
    }

    /// Live sessions of the tenant: the `sessions_active` gauge of
    /// `/metrics` (the size of the engine's directory; cheap).
    fn live_sessions(&self) -> Result<u64, String> {
        let wanted = format!("sessions_active{{tenant_id=\"{TENANT_ID}\"}}");
        Ok(self.gauge(&wanted)?.unwrap_or(0.0) as u64)
    }

    /// Open session WebSockets: `websocket_connections_open` of `/metrics`.
    fn open_websockets(&self) -> Result<u64, String> {
        Ok(self.gauge("websocket_connections_open")?.unwrap_or(0.0) as u64)
    }

    /// The value of the sample `name` (with its labels) in `/metrics`.
    fn gauge(&self, name: &str) -> Result<Option<f64>, String> {
        let (status, text) = http_call(
            API_KEY,
            self.addr,
            "GET",
            "/metrics",
            None,
            Duration::from_secs(5),
        )?;
        if status != 200 {
            return Err(format!("GET /metrics: {status} {text}"));
        }
        Ok(text.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(' ')?;
            value.trim().parse::<f64>().ok()
        }))
    }

    /// The engine's own figures (`GET /api/v1/sessions/metrics`), which walk
    /// every session of the tenant: answers them and how long they took.
    fn tenant_metrics(&self, limit: Duration) -> Result<(Value, Duration), String> {
        let started = Instant::now();
        let (status, body) = http_call(
            API_KEY,
            self.addr,
            "GET",
            "/api/v1/sessions/metrics",
            None,
            limit,
        )?;
        if status != 200 {
            return Err(format!("GET /api/v1/sessions/metrics: {status} {body}"));
        }
        let value = serde_json::from_str(&body)
            .map_err(|e| format!("GET /api/v1/sessions/metrics: {e}: {body}"))?;
        Ok((value, started.elapsed()))
    }
}

/// A create body for session `id`: what an edge-mcp sends (≈ 280 bytes).
fn create_body(id: &str) -> String {
    format!(
        r#"{{"session_id":"{id}","edge_mcp_id":"edge-scale-01","client_name":"Claude Code","client_type":"claude-code","client_version":"1.2.3","metadata":{{"workspace":"/home/dev/src/edge-sessions","host":"dev-laptop-01"}},"ttl":{SESSION_SECONDS},"idle_timeout":{SESSION_SECONDS}}}"#
    )
}

// ---------------------------------------------------------------------------
// Phase 1: creates with wrk

/// The round's script: thread `t` sends at most `budgets[t]` creates with
/// ids `prefix-t-n`, then stops itself. wrk calls `request()` once in
/// thread 0 before the run to check the request (never sent), so thread 0
/// gets one more. The `done` hook prints one parseable line.
fn lua_create_round(prefix: &str, budgets: &[u64]) -> String {
    let body = create_body("ID");
    let (head, tail) = body.split_once("ID").expect("placeholder");
    let budgets: Vec<String> = budgets
        .iter()
        .enumerate()
        .map(|(t, b)| (b + u64::from(t == 0)).to_string())
        .collect();
    format!(
        r#"local budgets = {{ {budgets} }}
local next_tid = 0
function setup(thread)
  thread:set("tid", next_tid)
  thread:set("budget", budgets[next_tid + 1])
  next_tid = next_tid + 1
end
local headers = {{ ["Content-Type"] = "application/json", ["X-API-Key"] = {key} }}
local head = {head}
local tail = {tail}
local prefix = {prefix}
local n = 0
function request()
  if n >= budget then
    wrk.thread:stop()
    return ""
  end
  n = n + 1
  return wrk.format("POST", "/api/v1/sessions", headers, head .. prefix .. "-" .. tid .. "-" .. n .. tail)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "SCALE_RESULT requests=%d duration_us=%d p99_us=%d non2xx=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.requests, summary.duration, math.floor(latency:percentile(99)),
    e.status, e.connect, e.read, e.write, e.timeout))
end
"#,
        budgets = budgets.join(", "),
        key = lua_str(API_KEY),
        head = lua_str(head),
        tail = lua_str(tail),
        prefix = lua_str(prefix),
    )
}

/// One round as wrk reported it (the created count comes from the server).
struct WrkReport {
    requests: u64,
    seconds: f64,
    p99_ms: Option<f64>,
    non2xx: u64,
    socket_errors: u64,
    output: String,
}

fn parse_wrk(output: &str) -> Result<WrkReport, String> {
    let line = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("SCALE_RESULT"))
        .ok_or_else(|| format!("no SCALE_RESULT line in wrk's output:\n{output}"))?;
    let field = |name: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    };
    let requests = field("requests").unwrap_or(0);
    Ok(WrkReport {
        requests,
        seconds: field("duration_us").unwrap_or(0) as f64 / 1e6,
        p99_ms: field("p99_us")
            .filter(|_| requests > 0)
            .map(|us| us as f64 / 1000.0),
        non2xx: field("non2xx").unwrap_or(0),
        socket_errors: ["connect", "read", "write", "timeout"]
            .iter()
            .filter_map(|name| field(name))
            .sum(),
        output: output.to_owned(),
    })
}

/// Runs wrk for one round of at most `seconds` and `budget` creates; stops
/// it (SIGINT: it then reports its real run time) once the server holds
/// `target` live sessions. Killed past a deadline.
fn run_round(
    edge: &EdgeServer,
    lua_dir: &Path,
    prefix: &str,
    budget: u64,
    target: u64,
    seconds: u64,
    connections: usize,
) -> Result<WrkReport, String> {
    let threads = WRK_THREADS as u64;
    let budgets: Vec<u64> = (0..threads)
        .map(|t| budget / threads + u64::from(t < budget % threads))
        .collect();
    let path = lua_dir.join(format!("{prefix}.lua"));
    std::fs::write(&path, lua_create_round(prefix, &budgets))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut guard = ChildGuard::spawn(
        "wrk",
        Command::new("wrk")
            .arg(format!("-t{WRK_THREADS}"))
            .arg(format!("-c{connections}"))
            .arg(format!("-d{seconds}s"))
            .args(["--timeout", "10s", "--latency", "-s"])
            .arg(&path)
            .arg(format!("http://{}", edge.addr))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    // Both pipes are drained on threads, so wrk never blocks on a full one.
    let mut stdout = guard.child.stdout.take().expect("piped stdout");
    let mut stderr = guard.child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let limit = Duration::from_secs(seconds + 30);
    let started = Instant::now();
    let mut next_poll = started;
    let mut interrupted = false;
    let status = loop {
        match guard.child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > limit => {
                drop(guard); // kills it; the pipes close, the readers end
                return Err(format!("wrk did not finish within {limit:?}; killed"));
            }
            Ok(None) => {}
            Err(e) => return Err(format!("wrk: {e}")),
        }
        if !interrupted && Instant::now() >= next_poll {
            next_poll = Instant::now() + Duration::from_millis(200);
            if edge.live_sessions().is_ok_and(|live| live >= target) {
                // Ignored when wrk just exited on its own.
                let _ = guard.signal(libc::SIGINT);
                interrupted = true;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    if !status.success() {
        return Err(format!("wrk failed ({status}):\n{out}\n{err}"));
    }
    parse_wrk(&format!("{out}\n{err}"))
}

/// One round of phase 1.
struct Round {
    seconds: f64,
    created: u64,
    wrk_requests: u64,
    p99_ms: Option<f64>,
    non2xx: u64,
    socket_errors: u64,
    live_after: u64,
    rss_after: u64,
}

impl Round {
    fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.created as f64 / self.seconds
        } else {
            0.0
        }
    }
}

fn round_header() -> String {
    format!(
        "  {:>5} {:>8} {:>10} {:>10} {:>10} {:>8} {:>9} {:>11} {:>12}",
        "round",
        "seconds",
        "created",
        "creates/s",
        "p99",
        "non-2xx",
        "sock.err",
        "live after",
        "server RSS"
    )
}

fn round_line(index: usize, round: &Round) -> String {
    format!(
        "  {:>5} {:>8.2} {:>10} {:>10} {:>10} {:>8} {:>9} {:>11} {:>12}",
        index,
        round.seconds,
        thousands(round.created),
        thousands(round.rate().round() as u64),
        fmt_ms(round.p99_ms),
        round.non2xx,
        round.socket_errors,
        thousands(round.live_after),
        mib(round.rss_after),
    )
}

/// Phase 1: rounds of wrk until `target` live sessions exist.
fn create_sessions_with_wrk(
    edge: &mut EdgeServer,
    knobs: &Knobs,
    lua_dir: &Path,
) -> Result<Vec<Round>, String> {
    let target = knobs.sessions;
    let started = Instant::now();
    let mut live = edge.live_sessions()?;
    let mut rounds: Vec<Round> = Vec::new();
    let mut idle_rounds = 0;
    println!("{}", round_header());
    while live < target {
        if started.elapsed() > knobs.create_limit {
            return Err(format!(
                "creating {} sessions took longer than {:?} (SCALE_CREATE_LIMIT_SECONDS); {} exist",
                thousands(target),
                knobs.create_limit,
                thousands(live)
            ));
        }
        let index = rounds.len() + 1;
        let prefix = format!("s{}r{index}", std::process::id());
        let report = run_round(
            edge,
            lua_dir,
            &prefix,
            target - live,
            target,
            knobs.round_seconds,
            knobs.connections,
        )?;
        // Let the creates wrk stopped waiting for land before counting.
        std::thread::sleep(Duration::from_millis(500));
        edge.check_alive()?;
        let now = edge.live_sessions()?;
        let round = Round {
            seconds: report.seconds,
            created: now.saturating_sub(live),
            wrk_requests: report.requests,
            p99_ms: report.p99_ms,
            non2xx: report.non2xx,
            socket_errors: report.socket_errors,
            live_after: now,
            rss_after: edge.rss()?,
        };
        println!("{}", round_line(index, &round));
        if round.non2xx + round.socket_errors > 0 {
            println!("  !! round {index}: wrk said:");
            for line in report.output.lines().filter(|l| !l.trim().is_empty()) {
                println!("     {line}");
            }
        }
        if round.created == 0 {
            idle_rounds += 1;
            if idle_rounds == 2 {
                return Err(format!(
                    "two rounds in a row created no session ({} exist){}",
                    thousands(now),
                    edge.log_tail()
                ));
            }
        } else {
            idle_rounds = 0;
        }
        rounds.push(round);
        live = now;
    }
    Ok(rounds)
}

// ---------------------------------------------------------------------------
// Phase 4: open session WebSockets

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Creates `count` sessions `ws-0 ..` over HTTP; answers (id, session token).
async fn create_ws_sessions(
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<(String, String)>, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("http://{addr}/api/v1/sessions");
    let results: Vec<Result<(String, String), String>> = futures::stream::iter(0..count)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let id = format!("ws-{i}");
                let response = client
                    .post(&url)
                    .header("X-API-Key", API_KEY)
                    .header("Content-Type", "application/json")
                    .body(create_body(&id))
                    .send()
                    .await
                    .map_err(|e| format!("create {id}: {e}"))?;
                let status = response.status();
                let text = response
                    .text()
                    .await
                    .map_err(|e| format!("create {id}: {e}"))?;
                if status != reqwest::StatusCode::CREATED {
                    return Err(format!("create {id}: {status} {text}"));
                }
                let answer: Value =
                    serde_json::from_str(&text).map_err(|e| format!("create {id}: {e}"))?;
                let token = answer["session_token"]
                    .as_str()
                    .ok_or_else(|| format!("create {id}: no session_token in {text}"))?
                    .to_owned();
                Ok((id, token))
            }
        })
        .buffer_unordered(HTTP_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Opens the session's WebSocket with its token, sends one heartbeat and
/// waits for its answer; answers the open socket.
async fn open_socket(addr: SocketAddr, id: String, token: String) -> Result<Socket, String> {
    let url = format!("ws://{addr}/api/v1/sessions/{id}/ws");
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("{url}: {e}"))?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| format!("{id}: token is not a header value"))?,
    );
    let (mut socket, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(request),
    )
    .await
    .map_err(|_| format!("{id}: no upgrade within 10 s"))?
    .map_err(|e| format!("{id}: upgrade: {e}"))?;
    socket
        .send(WsMessage::Text(HEARTBEAT.into()))
        .await
        .map_err(|e| format!("{id}: send: {e}"))?;
    let reply = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.next().await {
                Some(Ok(WsMessage::Text(text))) => return Ok(text),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {}
                Some(Ok(other)) => return Err(format!("{id}: unexpected frame {other:?}")),
                Some(Err(e)) => return Err(format!("{id}: read: {e}")),
                None => return Err(format!("{id}: closed before the heartbeat answer")),
            }
        }
    })
    .await
    .map_err(|_| format!("{id}: no heartbeat answer within 10 s"))??;
    let answer: Value = serde_json::from_str(reply.as_str()).unwrap_or(Value::Null);
    if answer["id"] == 1 && answer["result"]["expires_at"].is_string() {
        Ok(socket)
    } else {
        Err(format!("{id}: heartbeat answered {reply}"))
    }
}

/// Opens all sockets, `WS_CONCURRENCY` at a time; answers the open ones and
/// the failures.
async fn open_sockets(
    addr: SocketAddr,
    sessions: Vec<(String, String)>,
) -> (Vec<Socket>, Vec<String>) {
    let results: Vec<Result<Socket, String>> = futures::stream::iter(sessions)
        .map(|(id, token)| open_socket(addr, id, token))
        .buffer_unordered(WS_CONCURRENCY)
        .collect()
        .await;
    let mut sockets = Vec::with_capacity(results.len());
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(socket) => sockets.push(socket),
            Err(e) => failures.push(e),
        }
    }
    (sockets, failures)
}

/// Closes every socket (close frame, then waits for the server's); answers
/// how many closed cleanly.
async fn close_sockets(sockets: Vec<Socket>) -> usize {
    futures::stream::iter(sockets)
        .map(|mut socket| async move {
            let closed = tokio::time::timeout(Duration::from_secs(5), async {
                socket.close(None).await.ok()?;
                while let Some(frame) = socket.next().await {
                    if frame.is_err() {
                        break;
                    }
                }
                Some(())
            })
            .await;
            matches!(closed, Ok(Some(())))
        })
        .buffer_unordered(WS_CONCURRENCY)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await
}

/// What phase 4 measured.
struct WsResult {
    wanted: usize,
    open: usize,
    failures: Vec<String>,
    open_seconds: f64,
    server_gauge_open: u64,
    rss_before: u64,
    rss_open: u64,
    closed_cleanly: usize,
    server_gauge_after_close: u64,
    rss_after_close: u64,
    warnings: u64,
}

fn websocket_phase(
    client: &tokio::runtime::Runtime,
    dir: &Path,
    sockets: usize,
    nofile: &Result<String, String>,
) -> Result<WsResult, String> {
    if let Err(e) = nofile {
        return Err(e.clone());
    }
    let (mut edge, _) = EdgeServer::start(dir, Duration::from_secs(60))?;
    println!(
        "scale: fresh edge-sessions for the WebSockets on {} (pid {})",
        edge.addr,
        edge.pid()
    );
    let started = Instant::now();
    let limit = Duration::from_secs(300 + sockets as u64 / 50);
    let sessions = client
        .block_on(async {
            tokio::time::timeout(limit, create_ws_sessions(edge.addr, sockets)).await
        })
        .map_err(|_| format!("creating {sockets} sessions took longer than {limit:?}"))??;
    println!(
        "scale: {} sessions created in {:.1} s",
        thousands(sockets as u64),
        started.elapsed().as_secs_f64()
    );
    std::thread::sleep(SETTLE);
    edge.check_alive()?;
    let rss_before = edge.rss()?;

    let started = Instant::now();
    let limit = Duration::from_secs(300 + sockets as u64 / 50);
    let (open, failures) = client
        .block_on(async { tokio::time::timeout(limit, open_sockets(edge.addr, sessions)).await })
        .map_err(|_| format!("opening {sockets} WebSockets took longer than {limit:?}"))?;
    let open_seconds = started.elapsed().as_secs_f64();
    println!(
        "scale: {} WebSockets open, heartbeat answered on each, in {open_seconds:.1} s ({} failed)",
        thousands(open.len() as u64),
        failures.len()
    );
    for failure in failures.iter().take(5) {
        println!("  !! {failure}");
    }
    std::thread::sleep(SETTLE);
    edge.check_alive()?;
    let rss_open = edge.rss()?;
    let server_gauge_open = edge.open_websockets()?;

    let count = open.len();
    let limit = Duration::from_secs(120);
    let closed_cleanly = client
        .block_on(async { tokio::time::timeout(limit, close_sockets(open)).await })
        .map_err(|_| format!("closing {count} WebSockets took longer than {limit:?}"))?;
    std::thread::sleep(SETTLE);
    edge.check_alive()?;
    let rss_after_close = edge.rss()?;
    let server_gauge_after_close = edge.open_websockets()?;
    let warnings = edge.warnings();
    if warnings > 0 {
        println!(
            "scale: the WebSocket server logged {warnings} WARN/ERROR lines;{}",
            edge.log_tail()
        );
    }
    if let Err(e) = edge.stop(Duration::from_secs(120)) {
        println!("  !! stopping the WebSocket server: {e}");
    }
    Ok(WsResult {
        wanted: sockets,
        open: count,
        failures,
        open_seconds,
        server_gauge_open,
        rss_before,
        rss_open,
        closed_cleanly,
        server_gauge_after_close,
        rss_after_close,
        warnings,
    })
}

// ---------------------------------------------------------------------------
// The run

/// What phases 1 to 3 measured.
struct SessionResult {
    rounds: Vec<Round>,
    rss_start: u64,
    rss_full: u64,
    live_before_stop: u64,
    metrics_before: Value,
    metrics_before_seconds: f64,
    metrics_recovered_seconds: f64,
    shutdown_seconds: f64,
    exit_status: ExitStatus,
    ready_seconds: f64,
    live_recovered: u64,
    metrics_recovered: Value,
    rss_recovered: u64,
    warnings: u64,
}

fn session_phases(knobs: &Knobs, dir: &Path, lua_dir: &Path) -> Result<SessionResult, String> {
    let n = knobs.sessions;
    let (mut edge, _) = EdgeServer::start(dir, Duration::from_secs(60))?;
    println!(
        "scale: edge-sessions on {} (pid {}, data in {})",
        edge.addr,
        edge.pid(),
        dir.join("data").display()
    );
    std::thread::sleep(Duration::from_secs(1));
    let rss_start = edge.rss()?;
    println!(
        "scale: phase 1, creating {} sessions: wrk, {WRK_THREADS} threads, {} connections, {} s rounds (server RSS at start {})",
        thousands(n),
        knobs.connections,
        knobs.round_seconds,
        mib(rss_start)
    );
    let rounds = create_sessions_with_wrk(&mut edge, knobs, lua_dir)?;

    std::thread::sleep(SETTLE);
    edge.check_alive()?;
    let rss_full = edge.rss()?;
    let live_before_stop = edge.live_sessions()?;
    let metrics_limit = Duration::from_secs(60 + n / 2000);
    let (metrics_before, metrics_before_took) = edge.tenant_metrics(metrics_limit)?;
    println!(
        "scale: phase 2, server RSS {} with {} live sessions; engine metrics (walked in {:.1} s): {metrics_before}",
        mib(rss_full),
        thousands(live_before_stop),
        metrics_before_took.as_secs_f64()
    );
    let mut warnings = edge.warnings();

    println!("scale: phase 3, SIGTERM and restart on the same data dir");
    let (shutdown, exit_status) = edge.stop(Duration::from_secs(300))?;
    println!(
        "scale: exited after {:.2} s ({exit_status})",
        shutdown.as_secs_f64()
    );
    let (mut edge, ready) = EdgeServer::start(dir, Duration::from_secs(60 + n / 1000))?;
    println!(
        "scale: restarted (pid {}), /readyz 200 after {:.2} s",
        edge.pid(),
        ready.as_secs_f64()
    );
    std::thread::sleep(SETTLE);
    edge.check_alive()?;
    let rss_recovered = edge.rss()?;
    let live_recovered = edge.live_sessions()?;
    let (metrics_recovered, took) = edge.tenant_metrics(metrics_limit)?;
    println!(
        "scale: after recovery: {} live, RSS {}; engine metrics (walked in {:.1} s): {metrics_recovered}",
        thousands(live_recovered),
        mib(rss_recovered),
        took.as_secs_f64()
    );
    warnings += edge.warnings();
    if warnings > 0 {
        println!(
            "scale: edge-sessions logged {warnings} WARN/ERROR lines;{}",
            edge.log_tail()
        );
    }
    // Frees its memory before the WebSocket phase.
    if let Err(e) = edge.stop(Duration::from_secs(300)) {
        println!("  !! stopping the recovered server: {e}");
    }
    Ok(SessionResult {
        rounds,
        rss_start,
        rss_full,
        live_before_stop,
        metrics_before,
        metrics_before_seconds: metrics_before_took.as_secs_f64(),
        metrics_recovered_seconds: took.as_secs_f64(),
        shutdown_seconds: shutdown.as_secs_f64(),
        exit_status,
        ready_seconds: ready.as_secs_f64(),
        live_recovered,
        metrics_recovered,
        rss_recovered,
        warnings,
    })
}

/// A row of the summary.
fn row(label: &str, value: impl std::fmt::Display) {
    println!("  {label:<44} {value}");
}

fn print_summary(knobs: &Knobs, s: &SessionResult, ws: Option<&Result<WsResult, String>>) {
    let n = knobs.sessions;
    let created: u64 = s.rounds.iter().map(|r| r.created).sum();
    let load_seconds: f64 = s.rounds.iter().map(|r| r.seconds).sum();
    let worst = s
        .rounds
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i + 1, r.p99_ms?)))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    let non2xx: u64 = s.rounds.iter().map(|r| r.non2xx).sum();
    let socket_errors: u64 = s.rounds.iter().map(|r| r.socket_errors).sum();
    let wrk_requests: u64 = s.rounds.iter().map(|r| r.wrk_requests).sum();
    let count = |metrics: &Value, key: &str| metrics[key].as_u64().unwrap_or(0);
    let recovered_live = count(&s.metrics_recovered, "active_sessions")
        + count(&s.metrics_recovered, "idle_sessions");

    println!();
    println!(
        "==== scale: summary (durability sync, wrk {WRK_THREADS} threads / {} connections, {} s rounds, all on 127.0.0.1) ====",
        knobs.connections, knobs.round_seconds
    );
    println!("Per round (creates/s = sessions the server gained / wrk's run time):");
    println!("{}", round_header());
    for (i, round) in s.rounds.iter().enumerate() {
        println!("{}", round_line(i + 1, round));
    }
    println!();
    println!("1. creating sessions over HTTP (POST /api/v1/sessions)");
    row(
        "sessions created (server's count)",
        format!(
            "{} of {} in {} rounds, {:.1} s of load",
            thousands(created),
            thousands(n),
            s.rounds.len(),
            load_seconds
        ),
    );
    let average = if load_seconds > 0.0 {
        created as f64 / load_seconds
    } else {
        0.0
    };
    row(
        "average",
        format!("{} creates/s", thousands(average.round() as u64)),
    );
    row(
        "worst p99 of a round",
        worst.map_or("-".to_owned(), |(round, p99)| {
            format!("{p99:.2} ms (round {round})")
        }),
    );
    row(
        "non-2xx / socket errors",
        format!(
            "{non2xx} / {socket_errors} (of {} answers wrk read)",
            thousands(wrk_requests)
        ),
    );
    println!("2. memory per live session");
    row(
        "server RSS at start / with sessions",
        format!("{} / {}", mib(s.rss_start), mib(s.rss_full)),
    );
    row(
        "RSS per live session",
        format!(
            "{} bytes ({} live)",
            thousands(
                (s.rss_full.saturating_sub(s.rss_start) as f64 / s.live_before_stop.max(1) as f64)
                    .round() as u64
            ),
            thousands(s.live_before_stop)
        ),
    );
    println!("3. restart");
    row(
        "SIGTERM to exit",
        format!("{:.2} s ({})", s.shutdown_seconds, s.exit_status),
    );
    row(
        "restart recovery (spawn to /readyz 200)",
        format!("{:.2} s", s.ready_seconds),
    );
    let before_live =
        count(&s.metrics_before, "active_sessions") + count(&s.metrics_before, "idle_sessions");
    let same = s.live_recovered == s.live_before_stop
        && recovered_live == s.live_before_stop
        && before_live == s.live_before_stop
        && s.live_before_stop == n;
    row(
        "live sessions before / after restart",
        format!(
            "{} / {} (engine metrics after: active {} + idle {}, total {}) {}",
            thousands(s.live_before_stop),
            thousands(s.live_recovered),
            thousands(count(&s.metrics_recovered, "active_sessions")),
            thousands(count(&s.metrics_recovered, "idle_sessions")),
            thousands(count(&s.metrics_recovered, "total_sessions")),
            if same { "OK, = N" } else { "!! MISMATCH" }
        ),
    );
    row(
        "server RSS after recovery",
        format!(
            "{} ({} bytes per session over the start RSS)",
            mib(s.rss_recovered),
            thousands(
                (s.rss_recovered.saturating_sub(s.rss_start) as f64
                    / s.live_recovered.max(1) as f64)
                    .round() as u64
            )
        ),
    );
    row(
        "engine metrics walk (GET …/sessions/metrics)",
        format!(
            "{:.1} s before the restart, {:.1} s after",
            s.metrics_before_seconds, s.metrics_recovered_seconds
        ),
    );
    if s.warnings > 0 {
        row("server WARN/ERROR log lines", s.warnings);
    }
    println!("4. open session WebSockets");
    match ws {
        None => row("skipped", "SCALE_SOCKETS=0"),
        Some(Err(e)) => row("FAILED", e),
        Some(Ok(w)) => {
            row(
                "sockets open (heartbeat answered)",
                format!(
                    "{} of {} in {:.1} s; server gauge {}{}",
                    thousands(w.open as u64),
                    thousands(w.wanted as u64),
                    w.open_seconds,
                    thousands(w.server_gauge_open),
                    if w.failures.is_empty() {
                        String::new()
                    } else {
                        format!(" !! {} failed", w.failures.len())
                    }
                ),
            );
            row(
                "server RSS before / with sockets open",
                format!("{} / {}", mib(w.rss_before), mib(w.rss_open)),
            );
            row(
                "RSS per open WebSocket",
                format!(
                    "{:.1} KiB",
                    w.rss_open.saturating_sub(w.rss_before) as f64 / 1024.0 / w.open.max(1) as f64
                ),
            );
            row(
                "after closing all",
                format!(
                    "RSS {} ({} not returned), {} closed cleanly, server gauge {}",
                    mib(w.rss_after_close),
                    mib(w.rss_after_close.saturating_sub(w.rss_before)),
                    thousands(w.closed_cleanly as u64),
                    thousands(w.server_gauge_after_close)
                ),
            );
            if w.warnings > 0 {
                row("server WARN/ERROR log lines", w.warnings);
            }
        }
    }
}

fn run() -> Result<(), String> {
    if find_on_path("wrk").is_none() {
        return Err("`wrk` not found: install it with `apt-get install -y wrk`".into());
    }
    let knobs = Knobs::from_env()?;
    // Before any child starts: the server inherits the limit.
    let needed = libc::rlim_t::try_from(knobs.sockets).unwrap_or(libc::rlim_t::MAX) + 1024;
    let nofile = raise_open_files(needed);
    match &nofile {
        Ok(line) => println!("scale: {line}"),
        Err(e) => println!("scale: !! {e}"),
    }
    // Dropped last (declared first): the children are killed before their
    // directories go.
    let temp = tempfile::Builder::new()
        .prefix("scale-bench-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    let (edge_dir, ws_dir, lua_dir) = (
        temp.path().join("edge"),
        temp.path().join("ws"),
        temp.path().join("lua"),
    );
    for d in [&edge_dir, &ws_dir, &lua_dir] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    println!("scale: temp dir {}", temp.path().display());
    if let Ok(mut cleanup) = CLEANUP.lock() {
        cleanup.1 = Some(temp.path().to_owned());
    }
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("scale-client")
        .build()
        .map_err(|e| e.to_string())?;
    clean_up_on_signal(&client, "scale");

    let sessions = session_phases(&knobs, &edge_dir, &lua_dir)?;
    // Phase 1–3's data is no longer needed: give the disk back before phase 4.
    let _ = std::fs::remove_dir_all(&edge_dir);
    let ws = (knobs.sockets > 0).then(|| {
        println!(
            "scale: phase 4, {} session WebSockets ({WS_CONCURRENCY} opening at a time)",
            thousands(knobs.sockets as u64)
        );
        websocket_phase(&client, &ws_dir, knobs.sockets, &nofile)
    });
    print_summary(&knobs, &sessions, ws.as_ref());
    drop(client);
    match ws {
        Some(Err(e)) => Err(format!("phase 4 failed: {e}")),
        _ => Ok(()),
    }
}

fn main() -> ExitCode {
    // `cargo bench` passes --bench; `cargo test --benches` / `--all-targets`
    // does not, and must not start a million-session load.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("scale: not started by `cargo bench --bench scale`; nothing to do");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("scale: {message}");
            ExitCode::FAILURE
        }
    }
}
