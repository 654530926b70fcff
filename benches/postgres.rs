//! Shipping throughput of the PostgreSQL tier: how many session rows and
//! tool-execution rows per second the outbox shipper commits, against a
//! throwaway PostgreSQL with durable commits (fsync and synchronous_commit
//! on, as in production).
//!
//! Each phase builds a backlog while PostgreSQL is stopped (so the engine is
//! not what is measured), starts PostgreSQL, and times the drain until the
//! shipping barrier resolves. For comparison it also times the design this
//! replaces: one INSERT statement (one commit) per operation. Last, the
//! price of a cluster node's fence: batches of session updates through one
//! lane, plain and fenced (one transaction that begins with the fence
//! check) alternating.
//!
//! Run with `cargo bench --bench postgres`; figures are printed, not
//! asserted. Needs the PostgreSQL server binaries (see the README).

#[path = "../tests/common/pg.rs"]
#[allow(dead_code)]
mod pg;

use std::time::{Duration, Instant};

use edge_sessions::engine::{
    Engine, EngineConfig, NewSession, PostgresTier, SessionDefaults, TenantLimits,
};
use edge_sessions::model::time::Clock;
use edge_sessions::model::ToolExecution;
use edge_sessions::persist::postgres::{Postgres, PostgresConfig};
use edge_sessions::persist::shipper::ShipperConfig;
use edge_sessions::settings::{Durability, Placement};
use futures::stream::{self, StreamExt};
use uuid::Uuid;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TENANT: Uuid = Uuid::from_u128(0x6f1c_0d3e_8a4b_4c6e_9f10_2b3c_4d5e_6f70);
const SESSIONS: usize = 20_000;
const EXECUTIONS: usize = 100_000;
const BASELINE_OPS: usize = 2_000;
const IN_FLIGHT: usize = 256;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

fn postgres(url: &str) -> Postgres {
    postgres_in(url, None)
}

fn postgres_in(url: &str, cluster_shards: Option<u32>) -> Postgres {
    Postgres::new(&PostgresConfig {
        url: url.to_owned(),
        max_connections: 4,
        statement_timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(5),
        cluster_shards,
    })
    .unwrap()
}

/// The fence phase's node runs no sessions: nothing to adopt or drain.
struct NoSessions;

impl edge_sessions::cluster::ShardOwner for NoSessions {
    fn adopt(&self, _shard: u32, _epoch: u64) {}
    fn drain(&self, _shard: u32, _epoch: u64) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async {})
    }
    fn lost(&self, _shard: u32, _epoch: u64) {}
}

/// Sessions per batch in the fence phase (about a batch of creates at
/// 64 connections).
const FENCE_BATCH: usize = 16;
/// Batches per run of the fence phase.
const FENCE_BATCHES: usize = 200;
/// Runs of each kind, alternating.
const FENCE_RUNS: usize = 5;

/// Ships the same sessions again and again, a version up each time, in
/// batches of [`FENCE_BATCH`] through one lane, alternating plain batches
/// and fenced ones (all shards held by one node); prints the median time
/// per batch of each and their ratio.
async fn fence_phase(url: &str) {
    use edge_sessions::cluster::{placement, Member, MemberConfig};
    use edge_sessions::persist::outbox::Entry;
    use edge_sessions::persist::postgres::Fence;
    const SHARDS: u32 = 256;
    let node = postgres_in(url, Some(SHARDS));
    let member = Member::join(
        node.pool().clone(),
        MemberConfig {
            node_id: "bench-node".into(),
            advertise_url: "http://127.0.0.1:1".into(),
            shards: SHARDS,
            lease: Duration::from_secs(600),
        },
        std::sync::Arc::new(NoSessions),
    )
    .await
    .unwrap();
    member.round().await.unwrap();
    assert_eq!(member.held().len() as u32, SHARDS);
    let mut sessions: Vec<_> = node
        .live_sessions(&[TENANT], Uuid::nil(), FENCE_BATCH * FENCE_BATCHES)
        .await
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    let mut lane = node.lane();
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for run in 0..FENCE_RUNS * 2 {
        let fenced = run % 2 == 1;
        let started = Instant::now();
        for batch in sessions.chunks_mut(FENCE_BATCH) {
            let entries: Vec<Entry> = batch
                .iter_mut()
                .map(|s| {
                    s.version += 1;
                    Entry::Session(Box::new(s.clone()))
                })
                .collect();
            if fenced {
                let mut held: Vec<(u32, u64)> = batch
                    .iter()
                    .map(|s| {
                        let shard = placement::shard_of(s.tenant_id, &s.session_id, SHARDS);
                        (shard, member.holds(shard).unwrap())
                    })
                    .collect();
                held.sort_unstable();
                held.dedup();
                let fence = Fence {
                    node_id: "bench-node".into(),
                    held,
                };
                lane.ship_fenced(&entries, &fence).await.unwrap();
            } else {
                lane.ship(&entries).await.unwrap();
            }
        }
        let batches = sessions.len().div_ceil(FENCE_BATCH);
        times[usize::from(fenced)].push(started.elapsed().as_secs_f64() * 1e3 / batches as f64);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (plain, fenced) = (median(&mut times[0]), median(&mut times[1]));
    println!(
        "the fence: {} sessions per batch, {} batches per run, {FENCE_RUNS} runs each alternating: plain {plain:.3} ms per batch, fenced {fenced:.3} ms ({:.2}x)",
        FENCE_BATCH,
        sessions.len().div_ceil(FENCE_BATCH),
        fenced / plain
    );
}

fn start(dir: &std::path::Path, url: &str) -> Engine {
    let config = EngineConfig {
        data_dir: dir.to_owned(),
        durability: Durability::Async,
        flush_interval: Duration::from_millis(5),
        max_batch: 8192,
        cache_capacity_bytes: 64 << 20,
        checkpoint_interval: Duration::from_secs(1),
        idle_after: Duration::from_secs(300),
        expiring_notice: Duration::from_secs(60),
        retention: Duration::from_secs(86_400),
        sweep_interval: Duration::from_secs(3600),
        defaults: SessionDefaults {
            idle_timeout_seconds: 1800,
            ttl_seconds: 86_400,
        },
        tenants: vec![TenantLimits {
            id: TENANT,
            name: "bench".into(),
            max_active_sessions: usize::MAX,
            max_ttl_seconds: 86_400,
            max_idle_timeout_seconds: 86_400,
        }],
        shards: 2,
        placement: Placement::Session,
        clock: Clock::system(),
        postgres: Some(PostgresTier {
            postgres: postgres(url),
            shipper: ShipperConfig {
                batch_size: 8000,
                lanes: std::env::var("SHIP_CONNECTIONS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(2),
                migrate_on_start: true,
                drain_on_shutdown: Duration::from_secs(30),
            },
            commit_timeout: Duration::from_secs(600),
            rebuild_wait: Duration::from_secs(30),
        }),
        vault: std::sync::Arc::new(edge_sessions::crypto::Vault::ephemeral()),
        salvage: false,
        cluster: None,
        cluster_quota: None,
    };
    Engine::start(config).unwrap()
}

fn execution(i: usize) -> ToolExecution {
    ToolExecution {
        tool_name: format!("tool-{}", i % 8),
        tool_id: None,
        arguments: r#"{"path":"/src/main.rs"}"#.into(),
        result: r#"{"ok":true}"#.into(),
        error: None,
        duration_ms: (i % 50) as u64,
        tokens_used: 10,
        executed_at: 0,
        recorded_at: 0,
    }
}

/// Restarts PostgreSQL and waits for the backlog of `rows` entries to
/// drain. The clock starts at the first committed round (the shipper may
/// still be in its retry backoff when PostgreSQL comes back, which is not
/// shipping time); answers the time and the share of the backlog shipped
/// in it.
async fn restart_and_drain(pg: &pg::TempPostgres, engine: &Engine, rows: u64) -> (Duration, f64) {
    let stats = engine.outbox_stats().unwrap();
    let shipped = || stats.shipped.load(std::sync::atomic::Ordering::Relaxed);
    // Before the restart: the shipper starts as soon as PostgreSQL is up.
    let before = shipped();
    pg.restart();
    while shipped() == before {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let started = Instant::now();
    let first = shipped() - before;
    engine.flush_to_postgres().await.unwrap();
    let took = started.elapsed();
    let total = shipped() - before;
    // Each record's entries count once, when all of it is shipped, retries
    // or not. The flush also queues coalesced session states (a session's
    // counters after its executions), which ship with the backlog.
    assert!(
        total >= rows,
        "the whole backlog shipped: {total} of {rows}"
    );
    assert_eq!(stats.depth(), 0);
    (took, ((total - first) as f64 / rows as f64).min(1.0))
}

async fn run() {
    let pg = pg::TempPostgres::start_own_durable();
    let dir = tempfile::tempdir().unwrap();
    let engine = start(dir.path(), &pg.url);
    engine.recover().await.unwrap();
    engine.flush_to_postgres().await.unwrap(); // migrations applied

    // Phase 1: a backlog of session creates.
    pg.stop();
    let started = Instant::now();
    stream::iter(0..SESSIONS)
        .for_each_concurrent(IN_FLIGHT, |i| {
            let engine = engine.clone();
            async move {
                let request = NewSession {
                    session_id: Some(format!("b-{i}")),
                    edge_mcp_id: "bench".into(),
                    ..NewSession::default()
                };
                engine.create(TENANT, request).await.unwrap();
            }
        })
        .await;
    engine.flush().await.unwrap();
    println!(
        "engine with the outbox on (async, {IN_FLIGHT} in flight, PostgreSQL down): {:.0} creates/s",
        SESSIONS as f64 / started.elapsed().as_secs_f64()
    );
    let rows = engine.outbox_stats().unwrap().depth();
    let (took, share) = restart_and_drain(&pg, &engine, rows).await;
    println!(
        "ship session creates: {SESSIONS} sessions ({rows} outbox entries: rows + audit), {:.0} % of them in {:.2} s = {:.0} sessions/s, {:.0} entries/s",
        share * 100.0,
        took.as_secs_f64(),
        share * SESSIONS as f64 / took.as_secs_f64(),
        share * rows as f64 / took.as_secs_f64()
    );
    let count = pg.scalar("SELECT count(*) FROM mcp.edge_mcp_sessions");
    assert_eq!(count as usize, SESSIONS, "every session arrived once");

    // Phase 2: a backlog of tool executions over those sessions.
    pg.stop();
    let started = Instant::now();
    stream::iter(0..EXECUTIONS)
        .for_each_concurrent(IN_FLIGHT, |i| {
            let engine = engine.clone();
            async move {
                let id = format!("b-{}", i % SESSIONS);
                engine.record_tool(TENANT, &id, execution(i)).await.unwrap();
            }
        })
        .await;
    engine.flush().await.unwrap();
    println!(
        "engine with the outbox on (async, {IN_FLIGHT} in flight, PostgreSQL down): {:.0} tool executions/s",
        EXECUTIONS as f64 / started.elapsed().as_secs_f64()
    );
    // Let the coalesced session-record writes land too.
    tokio::time::sleep(Duration::from_millis(50)).await;
    engine.flush().await.unwrap();
    let rows = engine.outbox_stats().unwrap().depth();
    let (took, share) = restart_and_drain(&pg, &engine, rows).await;
    println!(
        "ship tool executions: {EXECUTIONS} executions ({rows} outbox entries: executions + session updates), {:.0} % of them in {:.2} s = {:.0} executions/s, {:.0} entries/s",
        share * 100.0,
        took.as_secs_f64(),
        share * EXECUTIONS as f64 / took.as_secs_f64(),
        share * rows as f64 / took.as_secs_f64()
    );
    let count = pg.scalar("SELECT count(*) FROM mcp.session_tool_executions");
    assert_eq!(count as usize, EXECUTIONS, "every execution arrived once");
    engine.shutdown().await;

    // A cluster node's batches, plain and fenced.
    fence_phase(&pg.url).await;

    // The replaced design: one statement, one commit per operation.
    let db = postgres(&pg.url);
    let pool = db.pool();
    let started = Instant::now();
    for i in 0..BASELINE_OPS {
        sqlx::query(
            "INSERT INTO mcp.edge_mcp_sessions (id, session_id, tenant_id, edge_mcp_id, client_type, status,
                 created_at, lifetime_started_at, last_activity_at, expires_at, idle_timeout_seconds, ttl_seconds, version)
             VALUES ($1, $2, $3, 'bench', 'cli', 'active', now(), now(), now(), now() + interval '1 day', 1800, 86400, 1)",
        )
        .bind(Uuid::now_v7())
        .bind(format!("one-{i}"))
        .bind(TENANT)
        .execute(pool)
        .await
        .unwrap();
    }
    let took = started.elapsed();
    println!(
        "baseline, one INSERT per session create: {:.0} sessions/s",
        BASELINE_OPS as f64 / took.as_secs_f64()
    );
    let session_row: Uuid = sqlx::query_scalar("SELECT id FROM mcp.edge_mcp_sessions LIMIT 1")
        .fetch_one(pool)
        .await
        .unwrap();
    let started = Instant::now();
    for i in 0..BASELINE_OPS {
        sqlx::query(
            "INSERT INTO mcp.session_tool_executions (session_id, seq, tool_name, arguments, result, duration_ms, tokens_used, executed_at, recorded_at)
             VALUES ($1, $2, 'tool', '{}', '{}', 5, 10, now(), now())",
        )
        .bind(session_row)
        .bind(1_000_000 + i as i64)
        .execute(pool)
        .await
        .unwrap();
    }
    let took = started.elapsed();
    println!(
        "baseline, one INSERT per tool execution: {:.0} executions/s",
        BASELINE_OPS as f64 / took.as_secs_f64()
    );
    pool.close().await;
}
