//! edge-sessions: an actor-based in-memory session engine for MCP edge
//! clients, durable through write-behind to sled.
//!
//! # Layout
//!
//! - [`model`]: sessions, tool statistics, ids, time, audit entries and the
//!   domain error; pure.
//! - [`crypto`]: the passthrough vault (AES-256-GCM under HKDF per-tenant
//!   keys from a rotatable master keyring), session tokens, `Secret`.
//! - [`persist`]: the write-ahead log and its group-commit flusher, the
//!   overlay of logged changes, the checkpointer that folds them into sled
//!   (key layout, record format), and the PostgreSQL tier (the log as
//!   outbox, shipper thread, schema migrations).
//! - [`engine`]: the actors. One [`engine::session::SessionActor`] per live
//!   session, one [`engine::tenant::TenantSupervisor`] per tenant, spread
//!   over one actix arbiter per core; start-up recovery and the sweep.
//! - [`auth`]: API keys and admin keys (hashes only, scopes), where the
//!   master keyring comes from, development credentials.
//! - [`http`]: the connection loop (slow-client timeouts, peer addresses,
//!   TLS, the operators' listener), the axum routes, extractors (keys,
//!   session tokens), the one error mapping, rate limits (failed
//!   authentications per address too), the OpenAPI document, the JSON-RPC
//!   WebSocket, live stats with the dashboard and its 15-minute history,
//!   `/metrics`, the export and the admin API (sessions across tenants,
//!   backup).
//! - [`settings`]: layered configuration; [`telemetry`]: logging,
//!   Prometheus metric names and the process-wide live counters;
//!   [`service`]: wires it all and shuts it down in order.
//! - [`cli`]: the operator's commands beyond `serve` (restore, and the
//!   commands that drive a running server's admin API).
//! - [`cluster`]: several nodes on one PostgreSQL: membership, shard
//!   placement and leases with fencing, what this node serves, the
//!   tenants' quotas across the cluster (the engine's side is
//!   `engine::cluster`, forwarding is [`http::cluster`]).
//!
//! # Threads
//!
//! On two cores every thread that wakes per request costs, so they are few:
//! - one actix arbiter per core (`engine::shards`): HTTP connections and
//!   WebSockets (each served on one arbiter for its lifetime, see
//!   [`http::serve`]), the session actors and the tenant supervisors, and
//!   a task per arbiter that tells its sessions of their due deadlines
//!   every 50 ms (`engine::deadlines`);
//! - the tokio runtime's workers: the accept loop that hands connections to
//!   the arbiters, and background tasks (recovery, sweep, metric upkeep);
//! - `write-behind`: appends each group commit to the log and fsyncs; wakes
//!   per batch, not per change;
//! - `checkpoint`: folds the log into sled about once a second, at a lower
//!   priority; idle when nothing changed;
//! - `outbox-shipper` (PostgreSQL tier only), on its own current-thread
//!   runtime;
//! - `log-writer`: writes log lines, so no request makes a `write` syscall
//!   for its access log line;
//! - sled's own I/O threads, busy only during checkpoints;
//! - at start only, recovery's three threads from tokio's blocking pool: one
//!   walks the stored session records, two decode them (see
//!   [`engine::Engine::recover`]).
//!
//! # How a request flows
//!
//! `http` authenticates the key (tenant), decodes and validates the body,
//! then calls [`engine::Engine`] on the arbiter serving the connection. The
//! engine finds the session's actor in the tenant's `DashMap` directory and
//! sends it one message (no thread crossed when the session lives on this
//! arbiter, which is where its create arrived). The actor changes its
//! state in memory, hands the new record to the write-behind queue and
//! replies with a durability receiver; under `durability = "sync"` the
//! handler awaits it, i.e. the batch's fsync, before answering. A create is
//! admitted against the tenant's atomic live count and its actor started on
//! this arbiter. Layers point one way: `http -> engine -> persist ->
//! model`, with `crypto` beside `model`; `cluster` sits below `persist`
//! (which writes each session's shard and fences a cluster node's
//! batches) and uses PostgreSQL directly, never the engine.

pub mod auth;
pub mod cli;
pub mod cluster;
pub mod crypto;
pub mod engine;
pub mod http;
pub mod model;
pub mod persist;
pub mod service;
pub mod settings;
pub mod telemetry;
