//! Side-by-side load comparison on one machine, in one run: edge-sessions
//! against the peers that bound what it could reach.
//!
//! What it measures (every target on 127.0.0.1, every client on the same
//! cores as its server, so these are whole-loop figures of this machine):
//!
//! * **A, edge-sessions**: the real release binary (`target/release/edge-sessions`)
//!   as a child process, with a temporary data dir and a generated config
//!   (one tenant, one API key given as its sha256 hex, every rate limit 0 =
//!   unlimited, `storage.durability = "sync"`). Driven by `wrk` (2 threads,
//!   64 connections, a Lua script written at run time):
//!   - `create`: `POST /api/v1/sessions`, a ~600-byte body with metadata and
//!     a fresh session id per request (run prefix, wrk thread, counter);
//!   - `tool exec`: `POST /api/v1/sessions/{id}/tools/execute` over
//!     pre-created sessions;
//!   - `get`: `GET /api/v1/sessions/{id}` over the same sessions;
//!   - `create, durability = postgres`: the same creates on a second
//!     edge-sessions with `storage.durability = "postgres"`, whose answers
//!     wait for the PostgreSQL commit, on a throwaway PostgreSQL (`initdb`
//!     in the temp dir, fsync and `synchronous_commit` on) sharing the
//!     cores; its server CPU per op counts PostgreSQL's processes too;
//!   - `create, open loop`: creates at half the rate `create` just reached,
//!     sent on a fixed schedule by this process over the same number of
//!     keep-alive connections, each timed from when it was due when its
//!     connection was still busy (no coordinated omission), after one
//!     second of the same load that is not counted (the server settling
//!     from the run before): the p99 the goal "p99 ≤ 5 ms at half of the
//!     maximum rate" names.
//! * **B, the HTTP ceiling**: an axum server in this process, on its own
//!   tokio runtime: `POST /echo` parses a ~266-byte JSON body into a
//!   `serde_json::Value` and answers 201 with it. Same wrk set-up.
//!   With `COMPARE_ONLY=ceiling` (or by default), its durable twin too:
//!   `POST /echo-durable` answers only once the body, re-encoded, is on
//!   disk (one thread appends what queued during its last `fdatasync` in
//!   one write and one `fdatasync`: group commit, as edge-sessions and
//!   Redis do), run with the create body (closed loop and open loop at
//!   half its rate, as A's creates) and with the tool body; and D's
//!   WebSocket echo likewise (`/ws-durable`). They do no work but the
//!   parse, the write and the answer, so they bound what any server that
//!   acknowledges after an fsync reaches on this machine: the `ceiling`
//!   ratios put them against the same peers as edge-sessions.
//! * **C, Redis**: `redis-server` as a child with `--appendonly yes
//!   --appendfsync always` (every write on disk before the reply, as
//!   `durability = "sync"`), driven by `redis-benchmark -c 64`: `SETEX` of a
//!   600-byte value on random keys, and `HINCRBY` on random hashes.
//!   redis-benchmark runs a request count, not a duration: the warm-up's
//!   rate sizes the count so a round lasts about `COMPARE_SECONDS`.
//! * **D, WebSocket** (skip with `COMPARE_WS_SOCKETS=0`): edge-sessions'
//!   JSON-RPC `tool.executed` over `GET /api/v1/sessions/{id}/ws`, against an
//!   axum WebSocket echo in this process; the same tokio-tungstenite client,
//!   N sockets with one request in flight each.
//!
//! Rounds alternate A, B, C, D (each repeated `COMPARE_ROUNDS` times) so a
//! drift of the machine hits every target alike; one short warm-up pass
//! precedes them. The servers live for the whole run, so the edge-sessions
//! and Redis data sets grow from round to round. The table shows every
//! round's ops/s and p99, the medians, and the ratios of the medians:
//! create / Redis SETEX, tool exec / Redis HINCRBY, get / axum echo,
//! create under `postgres` / axum echo, WS tool.executed / WS echo, and
//! the durable echoes against SETEX, HINCRBY and the WS echo.
//!
//! Each run also reads the CPU time (user and system, from `/proc`) the
//! serving side used over the run and a 300 ms settling pause after it:
//! the edge-sessions process, the Redis process, or this process's
//! `echo-server` threads. Divided by the operations (the run's rate times
//! its wall time, which includes the load tool's start), that is what a
//! call costs the server, a figure a busy shared machine moves far less
//! than the rates (which also depend on what the clients and everything
//! else on the cores take).
//!
//! Run: `cargo bench --bench compare` (builds the release binary too).
//! Needs `wrk` (apt package `wrk`), `redis-server` / `redis-benchmark`
//! (apt package `redis-server`, which pulls in `redis-tools`) and, for the
//! `postgres` comparison, PostgreSQL's server binaries (apt package
//! `postgresql`).
//!
//! Environment knobs:
//! * `COMPARE_SECONDS` (default 5): length of one measured round of a phase;
//! * `COMPARE_ROUNDS` (default 3): measured rounds per phase;
//! * `COMPARE_CONNECTIONS` (default 64): wrk, redis-benchmark and open-loop
//!   connections;
//! * `COMPARE_SESSIONS` (default 1000): pre-created sessions for tool exec,
//!   get and WebSocket;
//! * `COMPARE_WS_SOCKETS` (default 100; 0 skips the WebSocket phase);
//! * `COMPARE_BINARY`: another edge-sessions binary to measure instead of
//!   this build's (a before/after against an older release);
//! * `COMPARE_ONLY`: the comparisons to run, by name, comma-separated
//!   (`create`, `tool`, `get`, `postgres`, `ws`, `ceiling`; default all), each with its peer
//!   (`create` with its open-loop run too): for
//!   short alternating before/after runs of one path.
//!
//! Every child process (server, Redis, wrk, redis-benchmark) is held by a
//! guard that kills it when dropped, so an error or a panic leaves nothing
//! running; SIGINT / SIGTERM kill them too (and remove the temp dir); every
//! run of a load tool has a deadline.

#[path = "support/mod.rs"]
mod support;

#[path = "../tests/common/pg.rs"]
#[allow(dead_code)]
mod pg;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message as AxumMessage, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use serde_json::Value;
use sha2::Digest as _;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message as WsMessage;

// The in-process echo servers get the allocator the edge-sessions binary
// uses, so the ceiling is not lowered by glibc malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The tenant's API key; the config holds only its sha256 hex.
use support::{
    clean_up_on_signal, find_on_path, free_port, http_call, http_request, lua_str, status_of,
    ChildGuard, CLEANUP,
};

const API_KEY: &str = "compare-bench-key";
const TENANT_ID: &str = "6f1c0d3e-8a4b-4c6e-9f10-2b3c4d5e6f70";
/// wrk threads: one per core of the 2-core machine this was written for.
const WRK_THREADS: usize = 2;
/// Size of the create body and of the Redis value.
const CREATE_BODY_BYTES: usize = 600;
/// Size of the echo body.
const ECHO_BODY_BYTES: usize = 266;
/// A tool execution, for REST and as the WebSocket `params`.
const TOOL_BODY: &str = r#"{"tool_name":"grep","tool_id":"call-1","duration_ms":12,"tokens_used":42,"arguments":{"pattern":"fn main","path":"src/"},"result":{"matches":3}}"#;
/// Length of a warm-up pass, seconds.
const WARM_UP_SECONDS: u64 = 1;

// ---------------------------------------------------------------------------
// Settings and small helpers

/// The environment knobs (see the module doc).
struct Knobs {
    seconds: u64,
    rounds: usize,
    connections: usize,
    sessions: usize,
    ws_sockets: usize,
    /// The comparisons to run (names of [`RATIOS`]).
    only: Vec<&'static str>,
}

impl Knobs {
    fn from_env() -> Result<Self, String> {
        let knobs = Knobs {
            seconds: env_or("COMPARE_SECONDS", 5)?,
            rounds: env_or("COMPARE_ROUNDS", 3)?,
            connections: env_or("COMPARE_CONNECTIONS", 64)?,
            sessions: env_or("COMPARE_SESSIONS", 1000)?,
            ws_sockets: env_or("COMPARE_WS_SOCKETS", 100)?,
            only: comparisons_named(&std::env::var("COMPARE_ONLY").unwrap_or_default())?,
        };
        if knobs.seconds == 0 || knobs.rounds == 0 || knobs.connections == 0 {
            return Err(
                "COMPARE_SECONDS, COMPARE_ROUNDS and COMPARE_CONNECTIONS must be > 0".into(),
            );
        }
        if knobs.sessions < knobs.ws_sockets.max(1) {
            return Err("COMPARE_SESSIONS must be at least COMPARE_WS_SOCKETS (and 1)".into());
        }
        Ok(knobs)
    }
}

/// The comparisons `list` names (comma-separated); all for an empty list.
fn comparisons_named(list: &str) -> Result<Vec<&'static str>, String> {
    let mut names: Vec<&'static str> = RATIOS.iter().map(|r| r.3).collect();
    names.dedup();
    let mut chosen = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match names.iter().find(|known| **known == name) {
            Some(known) => chosen.push(*known),
            None => return Err(format!("COMPARE_ONLY: {name:?} is not one of {names:?}")),
        }
    }
    Ok(if chosen.is_empty() { names } else { chosen })
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(text) if !text.trim().is_empty() => text
            .trim()
            .parse()
            .map_err(|_| format!("{name}={text:?} is not a valid number")),
        _ => Ok(default),
    }
}

/// A JSON `template` with `PAD` replaced by as many `x` as make it `target`
/// bytes long (when `extra` more bytes are added at run time, e.g. an id).
fn padded(template: &str, target: usize, extra: usize) -> String {
    let without = template.len() - "PAD".len() + extra;
    template.replace("PAD", &"x".repeat(target.saturating_sub(without)))
}

/// The median (mean of the middle two for an even count).
fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 0 {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    })
}

// ---------------------------------------------------------------------------
// Child processes

/// Runs a load tool to its end with a deadline; answers its stdout and
/// stderr. Past the deadline the tool is killed (by its guard).
fn run_bounded(name: &str, command: &mut Command, limit: Duration) -> Result<String, String> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = ChildGuard::spawn(name, command)?;
    // Both pipes are drained on threads, so the tool never blocks on a full one.
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
    let deadline = Instant::now() + limit;
    let status = loop {
        match guard.child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() > deadline => {
                drop(guard); // kills it; the pipes close, the readers end
                return Err(format!("{name} did not finish within {limit:?}; killed"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("{name}: {e}")),
        }
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    if !status.success() {
        return Err(format!("{name} failed ({status}):\n{out}\n{err}"));
    }
    Ok(format!("{out}\n{err}"))
}

// ---------------------------------------------------------------------------
// Results

/// One measured round of one phase.
#[derive(Clone, Copy)]
struct Sample {
    ops_per_second: f64,
    p99_ms: Option<f64>,
    /// Non-2xx/3xx answers, socket errors and failed RPCs.
    errors: u64,
    /// CPU time the serving side used per operation, in µs (user and
    /// system, its background threads included, over the run and the
    /// settling pause after it): what a call costs the server, which a
    /// busy shared machine moves far less than it moves the rates.
    server_cpu_us: Option<f64>,
}

/// The phases, in table order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    EdgeCreate,
    EdgeCreateHalf,
    EdgeTool,
    EdgeGet,
    EdgeCreatePostgres,
    Echo,
    DurableEcho,
    DurableEchoHalf,
    DurableEchoTool,
    RedisSetex,
    RedisHincrby,
    EdgeWs,
    WsEcho,
    WsDurableEcho,
}

impl Phase {
    const ALL: [Phase; 14] = [
        Phase::EdgeCreate,
        Phase::EdgeCreateHalf,
        Phase::EdgeTool,
        Phase::EdgeGet,
        Phase::EdgeCreatePostgres,
        Phase::Echo,
        Phase::DurableEcho,
        Phase::DurableEchoHalf,
        Phase::DurableEchoTool,
        Phase::RedisSetex,
        Phase::RedisHincrby,
        Phase::EdgeWs,
        Phase::WsEcho,
        Phase::WsDurableEcho,
    ];

    fn label(self) -> &'static str {
        match self {
            Phase::EdgeCreate => "A edge create (POST /sessions)",
            Phase::EdgeCreateHalf => "A edge create, open loop at half of A",
            Phase::EdgeTool => "A edge tool exec (POST .../tools/execute)",
            Phase::EdgeGet => "A edge get (GET /sessions/{id})",
            Phase::EdgeCreatePostgres => "A edge create, durability = postgres",
            Phase::Echo => "B axum JSON echo (POST /echo)",
            Phase::DurableEcho => "B echo + fdatasync, create body",
            Phase::DurableEchoHalf => "B same, open loop at half of it",
            Phase::DurableEchoTool => "B echo + fdatasync, tool body",
            Phase::RedisSetex => "C redis SETEX 600 B (fsync always)",
            Phase::RedisHincrby => "C redis HINCRBY (fsync always)",
            Phase::EdgeWs => "D edge WS tool.executed",
            Phase::WsEcho => "D axum WS echo",
            Phase::WsDurableEcho => "D axum WS echo + fdatasync",
        }
    }

    fn index(self) -> usize {
        Phase::ALL.iter().position(|p| *p == self).expect("listed")
    }

    /// The closed-loop phase whose rate an open-loop phase halves.
    fn halving(self) -> Option<Phase> {
        match self {
            Phase::EdgeCreateHalf => Some(Phase::EdgeCreate),
            Phase::DurableEchoHalf => Some(Phase::DurableEcho),
            _ => None,
        }
    }
}

/// The comparisons the table ends with: (edge-sessions phase, peer, what,
/// the name `COMPARE_ONLY` knows it by). The `ceiling` rows put the
/// durable echoes (see [`start_echo`]) against the same peers: what any
/// HTTP or WebSocket server that answers after an fdatasync reaches here.
const RATIOS: [(Phase, Phase, &str, &str); 8] = [
    (
        Phase::EdgeCreate,
        Phase::RedisSetex,
        "create / Redis SETEX",
        "create",
    ),
    (
        Phase::EdgeTool,
        Phase::RedisHincrby,
        "tool exec / Redis HINCRBY",
        "tool",
    ),
    (Phase::EdgeGet, Phase::Echo, "get / axum echo", "get"),
    (
        Phase::EdgeCreatePostgres,
        Phase::Echo,
        "create (postgres) / axum echo",
        "postgres",
    ),
    (
        Phase::EdgeWs,
        Phase::WsEcho,
        "WS tool.executed / WS echo",
        "ws",
    ),
    (
        Phase::DurableEcho,
        Phase::RedisSetex,
        "durable echo / Redis SETEX",
        "ceiling",
    ),
    (
        Phase::DurableEchoTool,
        Phase::RedisHincrby,
        "durable echo / Redis HINCRBY",
        "ceiling",
    ),
    (
        Phase::WsDurableEcho,
        Phase::WsEcho,
        "WS durable echo / WS echo",
        "ceiling",
    ),
];

// ---------------------------------------------------------------------------
// wrk

/// The `done` hook every script ends with: one parseable line (latency in µs).
const WRK_DONE: &str = r#"
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "COMPARE_RESULT requests=%d duration_us=%d p99_us=%d non2xx=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.requests, summary.duration, math.floor(latency:percentile(99)),
    e.status, e.connect, e.read, e.write, e.timeout))
end
"#;

/// Gives every wrk thread its number (`tid`), for unique ids per thread.
const WRK_SETUP: &str = r#"
local next_tid = 0
function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
end
"#;

/// The headers table every edge-sessions script sends.
fn lua_edge_headers() -> String {
    format!(
        "local headers = {{ [\"Content-Type\"] = \"application/json\", [\"X-API-Key\"] = {} }}\n",
        lua_str(API_KEY)
    )
}

/// The create body around its id: `(head, tail)`, sized so a body with an
/// id of `prefix` plus 9 more characters is [`CREATE_BODY_BYTES`] long.
fn create_body_parts(prefix: &str) -> (String, String) {
    // Sized for an id of typical length, e.g. "c1234r1-1-123456".
    let template = r#"{"session_id":"ID","edge_mcp_id":"edge-bench-01","client_name":"compare-bench","client_type":"claude-code","client_version":"1.2.3","metadata":{"project":"edge-sessions","branch":"main","host":"bench-host-01.internal","region":"local","workspace":"/home/dev/src/edge-sessions","tags":["bench","compare","wrk"],"notes":"PAD"}}"#;
    let body = padded(template, CREATE_BODY_BYTES, prefix.len() + 9 - "ID".len());
    let (head, tail) = body.split_once("ID").expect("placeholder");
    (head.to_owned(), tail.to_owned())
}

/// Creates with unique ids: `prefix-tid-counter` (the prefix is new per run
/// and round, so ids never repeat within a server's life), posted to `path`.
fn lua_create(path: &str, prefix: &str) -> String {
    let (head, tail) = create_body_parts(prefix);
    format!(
        "{WRK_SETUP}{headers}local head = {head}\nlocal tail = {tail}\nlocal prefix = {prefix}\nlocal n = 0\n\
         function request()\n  n = n + 1\n  return wrk.format(\"POST\", {path}, headers, head .. prefix .. \"-\" .. tid .. \"-\" .. n .. tail)\nend\n{WRK_DONE}",
        headers = lua_edge_headers(),
        head = lua_str(&head),
        tail = lua_str(&tail),
        prefix = lua_str(prefix),
        path = lua_str(path),
    )
}

/// Requests spread over the pre-created sessions `pre-0 .. pre-(sessions-1)`:
/// `method` on `/api/v1/sessions/{id}{suffix}` with `body` (or none).
fn lua_over_sessions(method: &str, suffix: &str, body: Option<&str>, sessions: usize) -> String {
    format!(
        "{WRK_SETUP}{headers}local body = {body}\nlocal n = 0\n\
         function request()\n  n = n + 1\n  local i = (n * 7 + tid * 3001) % {sessions}\n  \
         return wrk.format({method}, \"/api/v1/sessions/pre-\" .. i .. {suffix}, headers, body)\nend\n{WRK_DONE}",
        headers = lua_edge_headers(),
        body = body.map_or("nil".to_owned(), lua_str),
        method = lua_str(method),
        suffix = lua_str(suffix),
    )
}

/// The echo request; built once per thread, still returned through
/// `request()` so wrk does the same per-request Lua call as for the others.
fn lua_echo(path: &str, body: &str) -> String {
    format!(
        "{WRK_SETUP}local body = {body}\nlocal req = nil\n\
         function request()\n  if req == nil then\n    req = wrk.format(\"POST\", {path}, {{ [\"Content-Type\"] = \"application/json\" }}, body)\n  end\n  return req\nend\n{WRK_DONE}",
        body = lua_str(body),
        path = lua_str(path),
    )
}

/// A latency as wrk prints it ("812.00us", "3.41ms", "1.02s", "1.5m") in ms.
fn parse_wrk_duration(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => value / 1000.0,
        "ms" => value,
        "s" => value * 1000.0,
        "m" => value * 60_000.0,
        "h" => value * 3_600_000.0,
        _ => return None,
    })
}

/// Parses wrk's report: `Requests/sec:`, the `done` line (p99 and error
/// counts), and as fallbacks the `--latency` 99% line and the error lines.
fn parse_wrk(output: &str) -> Result<Sample, String> {
    let mut ops = None;
    let mut p99_ms = None;
    let mut p99_fallback = None;
    let mut errors = None;
    let mut non2xx_line = 0u64;
    let mut socket_line = 0u64;
    for line in output.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            ops = rest.trim().parse::<f64>().ok();
        } else if let Some(rest) = line.strip_prefix("99%") {
            p99_fallback = parse_wrk_duration(rest);
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            non2xx_line = rest.trim().parse().unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 12"
            socket_line = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        } else if let Some(rest) = line.strip_prefix("COMPARE_RESULT") {
            let field = |name: &str| -> Option<u64> {
                rest.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            };
            p99_ms = field("p99_us").map(|us| us as f64 / 1000.0);
            errors = Some(
                ["non2xx", "connect", "read", "write", "timeout"]
                    .iter()
                    .filter_map(|name| field(name))
                    .sum::<u64>(),
            );
        }
    }
    let ops = ops.ok_or_else(|| format!("no Requests/sec in wrk's output:\n{output}"))?;
    Ok(Sample {
        ops_per_second: ops,
        p99_ms: p99_ms.or(p99_fallback),
        errors: errors.unwrap_or(non2xx_line + socket_line),
        server_cpu_us: None,
    })
}

/// One wrk run of `seconds` against `addr` with the Lua `script`.
fn run_wrk(
    name: &str,
    dir: &Path,
    addr: SocketAddr,
    script: &str,
    seconds: u64,
    connections: usize,
) -> Result<Sample, String> {
    let path = dir.join(format!(
        "{}.lua",
        name.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    ));
    std::fs::write(&path, script).map_err(|e| format!("{}: {e}", path.display()))?;
    let output = run_bounded(
        "wrk",
        Command::new("wrk")
            .arg(format!("-t{WRK_THREADS}"))
            .arg(format!("-c{connections}"))
            .arg(format!("-d{seconds}s"))
            .args(["--timeout", "10s", "--latency", "-s"])
            .arg(&path)
            .arg(format!("http://{addr}")),
        Duration::from_secs(seconds + 30),
    )?;
    let sample = parse_wrk(&output)?;
    if sample.errors > 0 {
        // Print wrk's own report, which names the kind of error.
        println!(
            "  !! {name}: {} non-2xx/3xx or socket errors; wrk said:",
            sample.errors
        );
        for line in output.lines().filter(|l| !l.trim().is_empty()) {
            println!("     {line}");
        }
    }
    Ok(sample)
}

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
    /// Starts the binary on data dir `dir`: `durability = "sync"`, or
    /// `"postgres"` on the server at `postgres_url` when given.
    fn start(dir: &Path, postgres_url: Option<&str>) -> Result<Self, String> {
        // Another build (e.g. the previous release, for a before/after).
        let binary = std::env::var_os("COMPARE_BINARY").map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_edge-sessions")),
            PathBuf::from,
        );
        if !binary.is_file() {
            return Err(format!(
                "{} is missing: run `cargo build --release` (cargo bench builds it)",
                binary.display()
            ));
        }
        // The keyring: tenants are configured, so the server needs one.
        let key_file = dir.join("master.key");
        let key: [u8; 32] = rand::random();
        std::fs::write(
            &key_file,
            format!(
                "{}\n",
                base64::engine::general_purpose::STANDARD.encode(key)
            ),
        )
        .map_err(|e| format!("{}: {e}", key_file.display()))?;
        let port = free_port()?;
        let (durability, postgres) = match postgres_url {
            Some(url) => ("postgres", format!("\n[postgres]\nurl = {url:?}\n")),
            None => ("sync", String::new()),
        };
        let config = format!(
            r#"# Generated by benches/compare.rs
[server]
listen = "127.0.0.1:{port}"

[storage]
data_dir = {data_dir:?}
durability = "{durability}"
{postgres}
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
name = "bench"
max_active_sessions = 100000000
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
        server.wait_ready()?;
        Ok(server)
    }

    /// Polls `/readyz` until 200 (recovery done), for at most 60 s.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            self.check_alive()?;
            if let Ok((200, _)) = http_call(
                API_KEY,
                self.addr,
                "GET",
                "/readyz",
                None,
                Duration::from_secs(10),
            ) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "edge-sessions not ready within 60 s{}",
            self.log_tail()
        ))
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

    /// Creates `pre-0 .. pre-(count-1)`, a few connections in parallel.
    fn pre_create(&self, count: usize) -> Result<(), String> {
        let workers = 8.min(count);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    scope.spawn(move || -> Result<(), String> {
                        for i in (w..count).step_by(workers) {
                            let body = format!(
                                r#"{{"session_id":"pre-{i}","edge_mcp_id":"edge-bench-01","client_type":"claude-code","metadata":{{"purpose":"compare bench"}}}}"#
                            );
                            let (status, answer) =
                                http_call(
API_KEY, self.addr,
                                    "POST",
                                    "/api/v1/sessions",
                                    Some(&body),
                                    Duration::from_secs(10),
                                )?;
                            if status != 201 {
                                return Err(format!("create pre-{i}: {status} {answer}"));
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("pre-create panicked".into()))
            })
        })
    }
}

// ---------------------------------------------------------------------------
// Redis

/// `redis-server` as a child, persisting every write before replying.
struct Redis {
    guard: ChildGuard,
    port: u16,
}

impl Redis {
    fn start(dir: &Path) -> Result<Self, String> {
        let port = free_port()?;
        let mut guard = ChildGuard::spawn(
            "redis-server",
            Command::new("redis-server")
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--appendonly", "yes", "--appendfsync", "always"])
                .args(["--save", ""])
                .arg("--dir")
                .arg(dir)
                .args(["--daemonize", "no", "--logfile", ""])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            guard.check_alive()?;
            if redis_ping(port) {
                return Ok(Redis { guard, port });
            }
            if Instant::now() > deadline {
                return Err("redis-server did not answer PING within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One redis-benchmark run of `requests` `command`s; answers rps and p99.
    fn bench(
        &self,
        command: &[&str],
        requests: u64,
        connections: usize,
        limit: Duration,
    ) -> Result<Sample, String> {
        let output = run_bounded(
            "redis-benchmark",
            Command::new("redis-benchmark")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-c", &connections.to_string(), "-n", &requests.to_string()])
                .args(["-r", "1000000", "-d", &CREATE_BODY_BYTES.to_string()])
                .args(["-q", "--csv"])
                .args(command),
            limit,
        )?;
        parse_redis_csv(&output)
    }
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut answer = [0u8; 64];
    stream.write_all(b"PING\r\n").is_ok()
        && stream
            .read(&mut answer)
            .is_ok_and(|n| answer[..n].starts_with(b"+PONG"))
}

/// redis-benchmark `--csv`: a header, then
/// `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"`
/// (Redis 7; older versions print only `"test","rps"`).
fn parse_redis_csv(output: &str) -> Result<Sample, String> {
    let line = output
        .lines()
        .map(str::trim)
        .rfind(|l| l.starts_with('"') && !l.starts_with("\"test\""))
        .ok_or_else(|| format!("no CSV result in redis-benchmark's output:\n{output}"))?;
    let fields: Vec<&str> = line.trim_matches('"').split("\",\"").collect();
    let number = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    let (ops, p99) = if fields.len() >= 8 {
        let n = fields.len();
        (number(n - 7), number(n - 2))
    } else {
        (fields.last().and_then(|f| f.parse().ok()), None)
    };
    Ok(Sample {
        ops_per_second: ops.ok_or_else(|| format!("bad CSV line: {line}"))?,
        p99_ms: p99,
        // redis-benchmark reports no errors here; an error reply to the
        // command would show as a different line and fail the parse above.
        errors: 0,
        server_cpu_us: None,
    })
}

// ---------------------------------------------------------------------------
// The in-process axum peers (HTTP JSON echo and WebSocket echo, each also
// durable: answering only once what it got is on disk)

async fn echo(Json(value): Json<Value>) -> (StatusCode, Json<Value>) {
    (StatusCode::CREATED, Json(value))
}

/// Size of the durable echoes' log file, written round and round.
const GROUP_LOG_BYTES: u64 = 64 << 20;

/// The durable echoes' log: one thread appends what every request queued
/// during its last `fdatasync` in one write and one `fdatasync` (a group
/// commit, as edge-sessions' flusher and Redis's `appendfsync always` do),
/// then releases those requests. The file is written through with zeros
/// first and then reused from its start when full, so an append only
/// overwrites allocated blocks and its `fdatasync` flushes data, not the
/// file's size (edge-sessions' log also writes zeros ahead of itself).
#[derive(Clone)]
struct GroupLog {
    queue: std::sync::mpsc::Sender<(Vec<u8>, tokio::sync::oneshot::Sender<()>)>,
}

impl GroupLog {
    fn start(path: &Path) -> Result<Self, String> {
        use std::os::unix::fs::FileExt as _;
        let fail = |e: std::io::Error| format!("{}: {e}", path.display());
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
            .map_err(fail)?;
        let zeros = vec![0u8; 1 << 20];
        for at in (0..GROUP_LOG_BYTES).step_by(zeros.len()) {
            file.write_all_at(&zeros, at).map_err(fail)?;
        }
        file.sync_all().map_err(fail)?;
        let (queue, requests) =
            std::sync::mpsc::channel::<(Vec<u8>, tokio::sync::oneshot::Sender<()>)>();
        std::thread::Builder::new()
            // Named as the echo runtime's workers, so its CPU counts with theirs.
            .name(ECHO_THREADS.into())
            .spawn(move || {
                let (mut batch, mut waiters, mut at) = (Vec::new(), Vec::new(), 0u64);
                while let Ok(first) = requests.recv() {
                    let mut next = Some(first);
                    while let Some((bytes, waiter)) = next {
                        batch.extend_from_slice(&bytes);
                        waiters.push(waiter);
                        next = requests.try_recv().ok();
                    }
                    if at + batch.len() as u64 > GROUP_LOG_BYTES {
                        at = 0;
                    }
                    let written = file
                        .write_all_at(&batch, at)
                        .and_then(|()| file.sync_data());
                    at += batch.len() as u64;
                    batch.clear();
                    // A failed write drops its waiters: they answer 500.
                    for waiter in waiters.drain(..) {
                        if written.is_ok() {
                            let _ = waiter.send(());
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(GroupLog { queue })
    }

    /// Resolves once `bytes` are on disk.
    async fn append(&self, bytes: Vec<u8>) -> Result<(), ()> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.queue.send((bytes, done)).map_err(|_| ())?;
        wait.await.map_err(|_| ())
    }
}

/// The echo, answering once the request's JSON, re-encoded, is on disk.
async fn durable_echo(
    State(log): State<GroupLog>,
    Json(value): Json<Value>,
) -> Result<(StatusCode, Json<Value>), StatusCode> {
    let bytes = serde_json::to_vec(&value).map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    log.append(bytes)
        .await
        .map_err(|()| StatusCode::INTERNAL_SERVER_ERROR)?;
    Ok((StatusCode::CREATED, Json(value)))
}

/// The WebSocket echo, answering each text message once it is on disk.
async fn ws_durable_echo(State(log): State<GroupLog>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(|mut socket| async move {
        while let Some(Ok(message)) = socket.recv().await {
            let text = match message {
                AxumMessage::Text(text) => text,
                AxumMessage::Close(_) => break,
                _ => continue,
            };
            if log.append(text.as_bytes().to_vec()).await.is_err()
                || socket.send(AxumMessage::Text(text)).await.is_err()
            {
                break;
            }
        }
    })
}

async fn ws_echo(ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(|mut socket| async move {
        // Pings are answered by the library; text and binary go back as sent.
        while let Some(Ok(message)) = socket.recv().await {
            let echoed = matches!(message, AxumMessage::Text(_) | AxumMessage::Binary(_));
            if matches!(message, AxumMessage::Close(_))
                || (echoed && socket.send(message).await.is_err())
            {
                break;
            }
        }
    })
}

/// Starts the echo routes on `runtime`, the durable ones with their log at
/// `log_path`; answers the address.
fn start_echo(runtime: &tokio::runtime::Runtime, log_path: &Path) -> Result<SocketAddr, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let app = Router::new()
        .route("/echo", post(echo))
        .route("/ws", get(ws_echo))
        .route("/echo-durable", post(durable_echo))
        .route("/ws-durable", get(ws_durable_echo))
        .with_state(GroupLog::start(log_path)?);
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        axum::serve(listener, app).await.expect("echo server");
    });
    Ok(addr)
}

// ---------------------------------------------------------------------------
// WebSocket load: N sockets, one JSON-RPC request in flight each

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects to every url (with the API key header), then runs each socket
/// in a loop for `seconds`: send `tool.executed`, wait for the reply with the
/// same id and no `error`. The edge server answers the JSON-RPC result, the
/// echo answers the request itself; both pass the same check.
async fn ws_load(urls: Vec<String>, seconds: u64) -> Result<Sample, String> {
    let mut sockets = Vec::with_capacity(urls.len());
    for url in &urls {
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("{url}: {e}"))?;
        request
            .headers_mut()
            .insert("x-api-key", API_KEY.parse().expect("header value"));
        let (socket, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(request),
        )
        .await
        .map_err(|_| format!("{url}: no upgrade within 10 s"))?
        .map_err(|e| format!("{url}: {e}"))?;
        sockets.push(socket);
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|socket| tokio::spawn(ws_socket_loop(socket, deadline)))
        .collect();
    gather(tasks, started).await
}

/// What a load task answers: its latencies (µs), successes and failures.
type TaskResult = (Histogram<u64>, u64, u64);

/// Waits for every load task and sums them up into a sample whose rate
/// counts the successes since `since`.
async fn gather(
    tasks: Vec<tokio::task::JoinHandle<TaskResult>>,
    since: Instant,
) -> Result<Sample, String> {
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    let (mut done, mut errors) = (0u64, 0u64);
    for task in tasks {
        let (hist, ok, failed) = task.await.map_err(|e| format!("load task: {e}"))?;
        latency.add(&hist).map_err(|e| e.to_string())?;
        done += ok;
        errors += failed;
    }
    Ok(Sample {
        ops_per_second: done as f64 / since.elapsed().as_secs_f64(),
        p99_ms: (!latency.is_empty()).then(|| latency.value_at_quantile(0.99) as f64 / 1000.0),
        errors,
        server_cpu_us: None,
    })
}

/// One socket's loop.
async fn ws_socket_loop(mut socket: Socket, deadline: Instant) -> TaskResult {
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut id = 0u64;
    'requests: while Instant::now() < deadline {
        id += 1;
        let frame = format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tool.executed","params":{TOOL_BODY}}}"#
        );
        let sent = Instant::now();
        if socket.send(WsMessage::Text(frame.into())).await.is_err() {
            failed += 1;
            break;
        }
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), socket.next()).await;
            match next {
                Ok(Some(Ok(WsMessage::Text(text)))) => {
                    let reply: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                    if reply["id"] == id && reply.get("error").is_none() {
                        ok += 1;
                        let _ = latency.record((sent.elapsed().as_micros() as u64).max(1));
                    } else {
                        failed += 1;
                        if failed == 1 {
                            println!("  !! WS reply not a success: {text}");
                        }
                    }
                    continue 'requests;
                }
                Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_)))) => {}
                // Closed, broken or silent: this socket is done.
                _ => {
                    failed += 1;
                    break 'requests;
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
    (latency, ok, failed)
}

// ---------------------------------------------------------------------------
// Open-loop creates: a fixed rate, each request timed from when it was due

/// The open-loop run's first stretch, whose answers are not counted (see
/// [`open_loop_creates`]).
const OPEN_LOOP_SETTLING: Duration = Duration::from_secs(1);
/// The granularity of tokio's timer: a request sent this much after it was
/// due is on time.
const TIMER_SLACK: Duration = Duration::from_millis(1);

/// Sends creates to `path` at `rate` per second for `seconds` over `connections`
/// keep-alive connections. Request `i` is due at `start + i / rate`;
/// connection `c` sends requests `c`, `c + connections`, … one at a time.
/// A request that had to wait for its connection (the server answered the
/// one before it late) is timed from when it was due, so a server falling
/// behind shows in the latency instead of slowing the load down (no
/// coordinated omission, as in wrk2); one sent on time is timed from its
/// send, or from [`TIMER_SLACK`] after it was due if its timer woke later,
/// so the timer's millisecond granularity is not counted against the
/// server but a client kept from its core is. The answers to the first
/// [`OPEN_LOOP_SETTLING`] of requests are not counted (their failures are):
/// the run before this one left the server at its top rate, and what this
/// measures is the steady state at the lower one.
async fn open_loop_creates(
    addr: SocketAddr,
    path: &'static str,
    prefix: &str,
    rate: f64,
    seconds: u64,
    connections: usize,
) -> Result<Sample, String> {
    let (head, tail) = create_body_parts(prefix);
    let (head, tail) = (Arc::new(head), Arc::new(tail));
    let total = (rate * (OPEN_LOOP_SETTLING.as_secs_f64() + seconds as f64)) as u64;
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        streams.push(stream);
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let counted_from = start + OPEN_LOOP_SETTLING;
    let tasks: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(c, mut stream)| {
            let (head, tail) = (head.clone(), tail.clone());
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                let mut latency = Histogram::<u64>::new(3).expect("histogram");
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut answer = Vec::with_capacity(4096);
                for i in (c as u64..total).step_by(connections) {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    let late = tokio::time::Instant::now() > due;
                    tokio::time::sleep_until(due).await;
                    let sent = tokio::time::Instant::now();
                    let body = format!("{head}{prefix}-{c}-{i}{tail}");
                    let request = http_request(API_KEY, addr, "POST", path, &body, true);
                    let answered = tokio::time::timeout(
                        Duration::from_secs(10),
                        exchange(&mut stream, request.as_bytes(), &mut answer),
                    )
                    .await;
                    match answered {
                        Ok(Ok(201)) if due < counted_from => {}
                        Ok(Ok(201)) => {
                            ok += 1;
                            // A wake-up later than the timer's granularity
                            // counts too: client and server share the cores.
                            let from = if late {
                                due
                            } else {
                                sent.min(due + TIMER_SLACK)
                            };
                            let _ = latency.record((from.elapsed().as_micros() as u64).max(1));
                        }
                        Ok(Ok(status)) => {
                            failed += 1;
                            if failed == 1 {
                                println!("  !! open-loop create answered {status}");
                            }
                        }
                        // Broken or silent: this connection is done, and
                        // its requests still to come count as failed.
                        Ok(Err(_)) | Err(_) => {
                            failed += (total - i).div_ceil(connections as u64);
                            break;
                        }
                    }
                }
                (latency, ok, failed)
            })
        })
        .collect();
    gather(tasks, counted_from.into_std()).await
}

/// Writes one HTTP/1.1 request and reads its whole answer (headers and a
/// `Content-Length` body) into `answer`; answers the status.
async fn exchange(
    stream: &mut tokio::net::TcpStream,
    request: &[u8],
    answer: &mut Vec<u8>,
) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    stream.write_all(request).await.map_err(|e| e.to_string())?;
    answer.clear();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&answer[..end]).map_err(|e| e.to_string())?;
            let status = status_of(head).ok_or_else(|| format!("not an HTTP answer: {head:?}"))?;
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .ok_or("an answer without Content-Length")?;
            while answer.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("closed mid-answer".into());
                }
                answer.extend_from_slice(&chunk[..n]);
            }
            return Ok(status);
        }
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before an answer".into());
        }
        answer.extend_from_slice(&chunk[..n]);
    }
}

// ---------------------------------------------------------------------------
// The run

/// A, under `durability = "postgres"`: a second edge-sessions on a
/// throwaway PostgreSQL of its own, with durable commits (fsync and
/// `synchronous_commit` on, as in production).
struct PostgresTarget {
    // Fields drop in order: edge-sessions stops before PostgreSQL.
    edge: EdgeServer,
    server: pg::TempPostgres,
}

impl PostgresTarget {
    fn start(dir: &Path) -> Result<Self, String> {
        let server = pg::TempPostgres::start_own_durable();
        let edge = EdgeServer::start(dir, Some(&server.url))?;
        Ok(PostgresTarget { edge, server })
    }

    /// CPU time used so far by both: the engine's process, and
    /// PostgreSQL's (the postmaster, its living children, and those it
    /// has reaped, e.g. a backend whose connection closed).
    fn cpu(&self) -> Option<Duration> {
        let mut total = process_cpu(self.edge.guard.child.id())?;
        let pids = self.server.pids();
        let (postmaster, children) = pids.split_first()?;
        let stat = std::fs::read_to_string(format!("/proc/{postmaster}/stat")).ok()?;
        total += stat_cpu(&stat)? + reaped_cpu(&stat)?;
        for pid in children {
            // A backend may end between the listing and the read.
            total += process_cpu(*pid).unwrap_or_default();
        }
        Some(total)
    }
}

/// Everything a phase needs; the servers live as long as this.
struct Bench {
    knobs: Knobs,
    dir: PathBuf,
    edge: EdgeServer,
    /// The `postgres` comparison's target, when chosen.
    postgres: Option<PostgresTarget>,
    echo_addr: SocketAddr,
    redis: Redis,
    /// redis-benchmark request counts (SETEX, HINCRBY) sized from the warm-up
    /// so a run lasts about `COMPARE_SECONDS`.
    redis_requests: [u64; 2],
    client: tokio::runtime::Runtime,
    run_id: String,
    echo_body: String,
    /// The last measured rates of the closed-loop phases, which the
    /// open-loop phases halve (see [`Phase::halving`]).
    rates: Vec<f64>,
}

impl Bench {
    fn redis_command(phase: Phase) -> Vec<&'static str> {
        // A 600-byte value, given explicitly (-d applies to the built-in tests only).
        static VALUE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let value = VALUE.get_or_init(|| "v".repeat(CREATE_BODY_BYTES));
        match phase {
            Phase::RedisSetex => vec!["SETEX", "key:__rand_int__", "600", value.as_str()],
            _ => vec!["HINCRBY", "h:__rand_int__", "f", "1"],
        }
    }

    /// Runs one phase for `seconds`; `round` 0 is the warm-up.
    /// CPU time used so far by the side that serves `phase`.
    fn server_cpu(&self, phase: Phase) -> Option<Duration> {
        match phase {
            Phase::EdgeCreate
            | Phase::EdgeCreateHalf
            | Phase::EdgeTool
            | Phase::EdgeGet
            | Phase::EdgeWs => process_cpu(self.edge.guard.child.id()),
            Phase::EdgeCreatePostgres => self.postgres.as_ref()?.cpu(),
            Phase::Echo
            | Phase::DurableEcho
            | Phase::DurableEchoHalf
            | Phase::DurableEchoTool
            | Phase::WsEcho
            | Phase::WsDurableEcho => threads_cpu(ECHO_THREADS),
            Phase::RedisSetex | Phase::RedisHincrby => process_cpu(self.redis.guard.child.id()),
        }
    }

    /// One run of `phase`, then a pause for the server to settle (its
    /// sockets close, its write-behind and checkpoint catch up), which the
    /// server's CPU figure includes.
    fn run(&mut self, phase: Phase, round: usize, seconds: u64) -> Result<Sample, String> {
        let cpu_before = self.server_cpu(phase);
        let started = Instant::now();
        let mut sample = self.load(phase, round, seconds)?;
        let ops = sample.ops_per_second * started.elapsed().as_secs_f64();
        std::thread::sleep(SETTLE);
        if let (Some(before), Some(after)) = (cpu_before, self.server_cpu(phase)) {
            if ops >= 1.0 {
                sample.server_cpu_us = Some((after - before).as_secs_f64() * 1e6 / ops);
            }
        }
        Ok(sample)
    }

    fn load(&mut self, phase: Phase, round: usize, seconds: u64) -> Result<Sample, String> {
        let (conns, sessions) = (self.knobs.connections, self.knobs.sessions);
        let sample = match phase {
            Phase::EdgeCreate => {
                let prefix = format!("{}r{round}", self.run_id);
                run_wrk(
                    "edge-create",
                    &self.dir,
                    self.edge.addr,
                    &lua_create(CREATE_PATH, &prefix),
                    seconds,
                    conns,
                )?
            }
            Phase::EdgeCreateHalf | Phase::DurableEchoHalf => {
                let full = phase.halving().expect("an open-loop phase");
                let rate = self.rates[full.index()];
                if rate < 2.0 {
                    return Err(format!("{:?} needs a rate from {full:?} first", phase));
                }
                // Same id length as the wrk creates ("h" for "r").
                let prefix = format!("{}h{round}", self.run_id);
                let (addr, path) = if phase == Phase::EdgeCreateHalf {
                    (self.edge.addr, CREATE_PATH)
                } else {
                    (self.echo_addr, DURABLE_ECHO_PATH)
                };
                self.client.block_on(open_loop_creates(
                    addr,
                    path,
                    &prefix,
                    rate / 2.0,
                    seconds,
                    conns,
                ))?
            }
            Phase::EdgeTool => {
                let script = lua_over_sessions("POST", "/tools/execute", Some(TOOL_BODY), sessions);
                run_wrk(
                    "edge-tool",
                    &self.dir,
                    self.edge.addr,
                    &script,
                    seconds,
                    conns,
                )?
            }
            Phase::EdgeGet => {
                let script = lua_over_sessions("GET", "", None, sessions);
                run_wrk(
                    "edge-get",
                    &self.dir,
                    self.edge.addr,
                    &script,
                    seconds,
                    conns,
                )?
            }
            Phase::EdgeCreatePostgres => {
                let target = self
                    .postgres
                    .as_ref()
                    .ok_or("the postgres comparison has no server")?;
                let prefix = format!("{}p{round}", self.run_id);
                run_wrk(
                    "edge-create-postgres",
                    &self.dir,
                    target.edge.addr,
                    &lua_create(CREATE_PATH, &prefix),
                    seconds,
                    conns,
                )?
            }
            Phase::Echo => run_wrk(
                "echo",
                &self.dir,
                self.echo_addr,
                &lua_echo("/echo", &self.echo_body),
                seconds,
                conns,
            )?,
            Phase::DurableEcho => {
                let prefix = format!("{}r{round}", self.run_id);
                run_wrk(
                    "echo-durable",
                    &self.dir,
                    self.echo_addr,
                    &lua_create(DURABLE_ECHO_PATH, &prefix),
                    seconds,
                    conns,
                )?
            }
            Phase::DurableEchoTool => run_wrk(
                "echo-durable-tool",
                &self.dir,
                self.echo_addr,
                &lua_echo(DURABLE_ECHO_PATH, TOOL_BODY),
                seconds,
                conns,
            )?,
            Phase::RedisSetex | Phase::RedisHincrby => {
                let slot = usize::from(phase == Phase::RedisHincrby);
                let requests = if round == 0 {
                    20_000
                } else {
                    self.redis_requests[slot]
                };
                let limit = Duration::from_secs(seconds * 6 + 60);
                let sample =
                    self.redis
                        .bench(&Self::redis_command(phase), requests, conns, limit)?;
                if round == 0 {
                    self.redis_requests[slot] =
                        ((sample.ops_per_second * seconds as f64) as u64).clamp(10_000, 20_000_000);
                }
                sample
            }
            Phase::EdgeWs => {
                let urls = (0..self.knobs.ws_sockets)
                    .map(|i| format!("ws://{}/api/v1/sessions/pre-{i}/ws", self.edge.addr))
                    .collect();
                self.client.block_on(ws_load(urls, seconds))?
            }
            Phase::WsEcho | Phase::WsDurableEcho => {
                let path = if phase == Phase::WsEcho {
                    "/ws"
                } else {
                    "/ws-durable"
                };
                let urls = (0..self.knobs.ws_sockets)
                    .map(|_| format!("ws://{}{path}", self.echo_addr))
                    .collect();
                self.client.block_on(ws_load(urls, seconds))?
            }
        };
        self.rates[phase.index()] = sample.ops_per_second;
        if matches!(
            phase,
            Phase::EdgeCreate
                | Phase::EdgeCreateHalf
                | Phase::EdgeTool
                | Phase::EdgeGet
                | Phase::EdgeWs
        ) {
            self.edge.check_alive()?;
        }
        if let (Phase::EdgeCreatePostgres, Some(target)) = (phase, &mut self.postgres) {
            target.edge.check_alive()?;
        }
        Ok(sample)
    }
}

/// Where creates go.
const CREATE_PATH: &str = "/api/v1/sessions";
/// Where the durable HTTP echo answers.
const DURABLE_ECHO_PATH: &str = "/echo-durable";

/// The pause after each run (see [`Bench::run`]).
const SETTLE: Duration = Duration::from_millis(300);

/// Name of the in-process echo servers' threads.
const ECHO_THREADS: &str = "echo-server";

/// The sum of two adjacent clock-tick fields of a `/proc/…/stat` text,
/// from the (1-based) field `first` on.
fn stat_time(stat: &str, first: usize) -> Option<Duration> {
    // The fields after the command name, which is in parentheses and may
    // hold spaces, begin with the 3rd.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(first - 3);
    let ticks: u64 = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// User and system CPU time (`utime`, `stime`: fields 14 and 15).
fn stat_cpu(stat: &str) -> Option<Duration> {
    stat_time(stat, 14)
}

/// The user and system CPU time of a process's reaped children (`cutime`,
/// `cstime`: fields 16 and 17).
fn reaped_cpu(stat: &str) -> Option<Duration> {
    stat_time(stat, 16)
}

/// CPU time used by process `pid` (all its threads, living and ended).
fn process_cpu(pid: u32) -> Option<Duration> {
    stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU time used by this process's threads named `name`.
fn threads_cpu(name: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            total += stat_cpu(&std::fs::read_to_string(task.path().join("stat")).ok()?)?;
        }
    }
    Some(total)
}

fn fmt_ops(ops: f64) -> String {
    if ops >= 10_000.0 {
        format!("{:.1}k", ops / 1000.0)
    } else {
        format!("{ops:.0}")
    }
}

fn fmt_ms(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.2}ms"))
}

fn print_table(knobs: &Knobs, phases: &[Phase], results: &[Vec<Sample>]) {
    println!();
    println!(
        "Results: {} s per round, {} rounds, {} connections ({} wrk threads), {} WS sockets; ops/s and p99 per round",
        knobs.seconds, knobs.rounds, knobs.connections, WRK_THREADS, knobs.ws_sockets
    );
    let mut header = format!("{:<42}", "phase");
    for r in 1..=knobs.rounds {
        let _ = write!(header, " {:>18}", format!("round {r}"));
    }
    let _ = write!(
        header,
        " {:>12} {:>11} {:>14}",
        "median ops/s", "median p99", "server CPU/op"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    for &phase in phases {
        let samples = &results[phase.index()];
        let mut line = format!("{:<42}", phase.label());
        for s in samples {
            let flag = if s.errors > 0 { "!" } else { "" };
            let _ = write!(
                line,
                " {:>18}",
                format!("{} / {}{flag}", fmt_ops(s.ops_per_second), fmt_ms(s.p99_ms))
            );
        }
        let ops = median(&samples.iter().map(|s| s.ops_per_second).collect::<Vec<_>>());
        let p99 = median(&samples.iter().filter_map(|s| s.p99_ms).collect::<Vec<_>>());
        let cpu = median(
            &samples
                .iter()
                .filter_map(|s| s.server_cpu_us)
                .collect::<Vec<_>>(),
        );
        let _ = write!(
            line,
            " {:>12} {:>11} {:>14}",
            ops.map_or("-".into(), |o| format!("{o:.0}")),
            fmt_ms(p99),
            cpu.map_or("-".into(), |c| format!("{c:.1} µs"))
        );
        println!("{line}");
    }
    println!();
    println!("edge-sessions / peer, medians (ops/s ratio; p99 ratio and server CPU per op ratio, above 1 = edge slower or dearer):");
    for (edge, peer, what, _) in RATIOS {
        if !phases.contains(&edge) || !phases.contains(&peer) {
            continue;
        }
        let med = |phase: Phase, f: &dyn Fn(&Sample) -> Option<f64>| {
            median(
                &results[phase.index()]
                    .iter()
                    .filter_map(f)
                    .collect::<Vec<_>>(),
            )
        };
        let ops = |s: &Sample| Some(s.ops_per_second);
        let p99 = |s: &Sample| s.p99_ms;
        let cpu = |s: &Sample| s.server_cpu_us;
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".to_owned(),
        };
        println!(
            "  {:<30} ops/s {:>7}   p99 {:>7}   server CPU/op {:>7}",
            what,
            ratio(med(edge, &ops), med(peer, &ops)),
            ratio(med(edge, &p99), med(peer, &p99)),
            ratio(med(edge, &cpu), med(peer, &cpu)),
        );
    }
    let half_rates = [
        (Phase::EdgeCreateHalf, "create p99 at half of A's rate"),
        (
            Phase::DurableEchoHalf,
            "durable echo p99 at half of its rate, create body",
        ),
    ];
    let mut first = true;
    for (phase, what) in half_rates {
        if !phases.contains(&phase) {
            continue;
        }
        if std::mem::take(&mut first) {
            println!();
        }
        let samples = &results[phase.index()];
        let ops = median(&samples.iter().map(|s| s.ops_per_second).collect::<Vec<_>>());
        let p99 = median(&samples.iter().filter_map(|s| s.p99_ms).collect::<Vec<_>>());
        println!(
            "{what} (open loop, {}/s): {} (the goal for creates: at most 5 ms)",
            ops.map_or("-".into(), |o| format!("{o:.0}")),
            fmt_ms(p99)
        );
    }
    let flagged: Vec<_> = phases
        .iter()
        .filter(|p| results[p.index()].iter().any(|s| s.errors > 0))
        .map(|p| p.label())
        .collect();
    if !flagged.is_empty() {
        println!("\n!! errors (non-2xx/3xx, socket errors or failed RPCs) in: {flagged:?}");
    }
}

/// Checks the external tools; names the apt package of a missing one.
fn check_tools(only: &[&str]) -> Result<(), String> {
    if only.contains(&"postgres") && pg::find_bin_dir().is_none() {
        return Err(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: install them with \
             `apt-get install -y postgresql`, or leave the comparison out (COMPARE_ONLY)"
                .into(),
        );
    }
    let tools = [
        ("wrk", "wrk"),
        ("redis-server", "redis-server"),
        ("redis-benchmark", "redis-tools"),
    ];
    let missing: Vec<String> = tools
        .iter()
        .filter(|(tool, _)| find_on_path(tool).is_none())
        .map(|(tool, package)| {
            format!("  `{tool}` not found: install it with `apt-get install -y {package}`")
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("missing tools:\n{}", missing.join("\n")))
    }
}

fn run() -> Result<(), String> {
    let knobs = Knobs::from_env()?;
    check_tools(&knobs.only)?;
    // Dropped last (declared first): the children are killed before their
    // directories go.
    let temp = tempfile::Builder::new()
        .prefix("compare-bench-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    let (edge_dir, edge_pg_dir, redis_dir, lua_dir) = (
        temp.path().join("edge"),
        temp.path().join("edge-postgres"),
        temp.path().join("redis"),
        temp.path().join("lua"),
    );
    for d in [&edge_dir, &edge_pg_dir, &redis_dir, &lua_dir] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    println!("compare: temp dir {}", temp.path().display());
    if let Ok(mut cleanup) = CLEANUP.lock() {
        cleanup.1 = Some(temp.path().to_owned());
    }

    // B: the echo servers on their own runtime, and a separate runtime for
    // this process's clients (WebSocket, open-loop creates), so the two
    // never share worker threads.
    let echo_runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(ECHO_THREADS)
        .build()
        .map_err(|e| e.to_string())?;
    let client = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ws-client")
        .build()
        .map_err(|e| e.to_string())?;
    clean_up_on_signal(&client, "compare");
    let echo_addr = start_echo(&echo_runtime, &temp.path().join("echo-log"))?;
    println!("compare: axum echo on {echo_addr}");

    let edge = EdgeServer::start(&edge_dir, None)?;
    println!(
        "compare: edge-sessions on {} (data in {})",
        edge.addr,
        edge_dir.display()
    );
    let t = Instant::now();
    edge.pre_create(knobs.sessions)?;
    println!(
        "compare: {} sessions pre-created in {:.1} s",
        knobs.sessions,
        t.elapsed().as_secs_f64()
    );

    let postgres = if knobs.only.contains(&"postgres") {
        let t = Instant::now();
        let target = PostgresTarget::start(&edge_pg_dir)?;
        println!(
            "compare: edge-sessions (durability = postgres) on {}, PostgreSQL ready in {:.1} s",
            target.edge.addr,
            t.elapsed().as_secs_f64()
        );
        Some(target)
    } else {
        None
    };

    let redis = Redis::start(&redis_dir)?;
    println!(
        "compare: redis-server on 127.0.0.1:{} (appendfsync always)",
        redis.port
    );

    let echo_body = padded(
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"grep","arguments":{"pattern":"fn main","path":"src/","include":"*.rs","max_results":50},"_meta":{"client":"claude-code","version":"1.2.3","note":"PAD"}}}"#,
        ECHO_BODY_BYTES,
        0,
    );
    let mut bench = Bench {
        run_id: format!(
            "c{}t{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() % 100_000)
        ),
        knobs,
        dir: lua_dir,
        edge,
        postgres,
        echo_addr,
        redis,
        redis_requests: [0; 2],
        client,
        echo_body,
        rates: vec![0.0; Phase::ALL.len()],
    };

    // The order inside a round: A (edge HTTP), B (echoes), C (Redis), D
    // (WS). An open-loop phase goes with the one whose rate it halves.
    let chosen = |p: &Phase| {
        let p = p.halving().unwrap_or(*p);
        RATIOS
            .iter()
            .any(|r| (r.0 == p || r.1 == p) && bench.knobs.only.contains(&r.3))
    };
    let phases: Vec<Phase> = Phase::ALL
        .into_iter()
        .filter(|p| {
            bench.knobs.ws_sockets > 0
                || !matches!(p, Phase::EdgeWs | Phase::WsEcho | Phase::WsDurableEcho)
        })
        .filter(chosen)
        .collect();

    println!("compare: warm-up, {WARM_UP_SECONDS} s per phase (Redis: 20,000 requests, sizing the rounds)");
    for &phase in &phases {
        bench.run(phase, 0, WARM_UP_SECONDS)?;
    }
    println!(
        "compare: redis-benchmark requests per round: SETEX {}, HINCRBY {}",
        bench.redis_requests[0], bench.redis_requests[1]
    );

    let mut results: Vec<Vec<Sample>> = vec![Vec::new(); Phase::ALL.len()];
    for round in 1..=bench.knobs.rounds {
        for &phase in &phases {
            let sample = bench.run(phase, round, bench.knobs.seconds)?;
            println!(
                "  round {round}  {:<42} {:>10.0} ops/s   p99 {:>9}{}",
                phase.label(),
                sample.ops_per_second,
                fmt_ms(sample.p99_ms),
                if sample.errors > 0 {
                    format!("   errors {}", sample.errors)
                } else {
                    String::new()
                }
            );
            results[phase.index()].push(sample);
        }
    }
    print_table(&bench.knobs, &phases, &results);
    let servers = std::iter::once(("", &bench.edge)).chain(
        bench
            .postgres
            .iter()
            .map(|t| (" (durability = postgres)", &t.edge)),
    );
    for (which, edge) in servers {
        let warnings = *edge.warnings.lock().unwrap();
        if warnings > 0 {
            println!(
                "\nedge-sessions{which} logged {warnings} WARN/ERROR lines;{}",
                edge.log_tail()
            );
        }
    }
    // `bench` (servers, runtimes) drops here, before `temp`.
    drop(bench);
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("compare: {message}");
            ExitCode::FAILURE
        }
    }
}
