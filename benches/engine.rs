//! Engine throughput in-process (no HTTP): create, get, heartbeat and tool
//! execution, sequential (one in flight: the cost of the hop) and with many
//! in flight, under async and sync durability; plus the memory of a live
//! session at 100k sessions (RSS delta / count).
//!
//! Run with `cargo bench --bench engine`; figures are printed, not asserted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, BenchmarkGroup, Criterion, Throughput};
use edge_sessions::engine::{Engine, EngineConfig, NewSession, SessionDefaults, TenantLimits};
use edge_sessions::model::time::Clock;
use edge_sessions::model::ToolExecution;
use edge_sessions::settings::{Durability, Placement};
use futures::stream::{self, StreamExt};
use uuid::Uuid;

// The same allocator as the binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TENANT: Uuid = Uuid::from_u128(0x6f1c_0d3e_8a4b_4c6e_9f10_2b3c_4d5e_6f70);
/// Requests in flight for the concurrent variants.
const IN_FLIGHT: usize = 256;
/// Sessions the get / heartbeat / execution benches spread over.
const WORKING_SET: usize = 1024;

fn start(dir: &std::path::Path, durability: Durability) -> Engine {
    start_placed(dir, durability, Placement::Session)
}

fn start_placed(dir: &std::path::Path, durability: Durability, placement: Placement) -> Engine {
    let config = EngineConfig {
        data_dir: dir.to_owned(),
        durability,
        flush_interval: Duration::from_millis(5),
        max_batch: 8192,
        cache_capacity_bytes: 16 << 20,
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
        shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
        placement,
        clock: Clock::system(),
        postgres: None,
        vault: std::sync::Arc::new(edge_sessions::crypto::Vault::ephemeral()),
        salvage: false,
        cluster: None,
        cluster_quota: None,
    };
    Engine::start(config).expect("engine starts")
}

fn new_session(id: Option<String>) -> NewSession {
    NewSession {
        session_id: id,
        edge_mcp_id: "bench-edge".into(),
        client_name: Some("bench".into()),
        client_type: Some("claude-code".into()),
        ..NewSession::default()
    }
}

fn execution(i: u64) -> ToolExecution {
    ToolExecution {
        tool_name: ["read", "grep", "edit", "bash"][(i % 4) as usize].into(),
        tool_id: None,
        arguments: "{\"path\":\"src/lib.rs\"}".into(),
        result: "{\"ok\":true}".into(),
        error: None,
        duration_ms: i % 97,
        tokens_used: 10,
        executed_at: 0,
        recorded_at: 0,
    }
}

/// Runs `iters` operations with `in_flight` at once; answers the elapsed time.
async fn drive<F, Fut>(iters: u64, in_flight: usize, op: F) -> Duration
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    stream::iter(0..iters)
        .map(&op)
        .buffer_unordered(in_flight)
        .for_each(|()| async {})
        .await;
    started.elapsed()
}

/// The operations measured, each a call on one engine.
#[derive(Clone, Copy)]
enum Op {
    Create,
    ToolExecution,
    Get,
    Heartbeat,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::ToolExecution => "tool_execution",
            Op::Get => "get",
            Op::Heartbeat => "heartbeat",
        }
    }

    /// Call number `i`, on one of `ids` where a session is needed.
    async fn call(self, engine: &Engine, ids: &[String], i: u64) {
        let id = &ids[(i as usize) % ids.len()];
        match self {
            Op::Create => drop(engine.create(TENANT, new_session(None)).await.unwrap()),
            Op::ToolExecution => drop(engine.record_tool(TENANT, id, execution(i)).await.unwrap()),
            Op::Get => drop(engine.get(TENANT, id).await.unwrap()),
            Op::Heartbeat => engine.touch(TENANT, id).await.unwrap(),
        }
    }
}

/// A recovered engine with a working set of live sessions.
fn engine_with_sessions(
    runtime: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    durability: Durability,
    placement: Placement,
) -> (Engine, Arc<Vec<String>>) {
    let engine = start_placed(dir, durability, placement);
    let ids = runtime.block_on(async {
        engine.recover().await.unwrap();
        let mut ids = Vec::with_capacity(WORKING_SET);
        for _ in 0..WORKING_SET {
            ids.push(
                engine
                    .create(TENANT, new_session(None))
                    .await
                    .unwrap()
                    .0
                    .session_id,
            );
        }
        ids
    });
    (engine, Arc::new(ids))
}

/// Measures `op` with `in_flight` calls at a time.
fn bench_op(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &tokio::runtime::Runtime,
    engine: &Engine,
    ids: &Arc<Vec<String>>,
    op: Op,
    in_flight: usize,
) {
    group.bench_function(format!("{}/in_flight={in_flight}", op.name()), |b| {
        b.to_async(runtime).iter_custom(|iters| {
            let (engine, ids) = (engine.clone(), ids.clone());
            async move { drive(iters, in_flight, |i| op.call(&engine, &ids, i)).await }
        })
    });
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(4));
    group.warm_up_time(Duration::from_secs(1));
}

fn bench_engine(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    for (label, durability) in [("async", Durability::Async), ("sync", Durability::Sync)] {
        let dir = tempfile::tempdir().unwrap();
        let (engine, ids) =
            engine_with_sessions(&runtime, dir.path(), durability, Placement::Session);
        let mut group = c.benchmark_group(format!("engine/{label}"));
        configure(&mut group);
        // Reads and heartbeats never wait for the disk: measured once.
        let ops: &[Op] = match durability {
            Durability::Async => &[Op::Create, Op::ToolExecution, Op::Get, Op::Heartbeat],
            _ => &[Op::Create, Op::ToolExecution],
        };
        for in_flight in [1, IN_FLIGHT] {
            for &op in ops {
                bench_op(&mut group, &runtime, &engine, &ids, op, in_flight);
            }
        }
        group.finish();
        runtime.block_on(engine.shutdown());
    }
}

/// Session placement: spread by session id (the default) against kept on
/// the tenant's arbiter, one tenant, async durability.
fn bench_placement(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    for (label, placement) in [
        ("session", Placement::Session),
        ("tenant", Placement::Tenant),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (engine, ids) =
            engine_with_sessions(&runtime, dir.path(), Durability::Async, placement);
        let mut group = c.benchmark_group(format!("placement/{label}"));
        configure(&mut group);
        for op in [Op::Create, Op::Get] {
            bench_op(&mut group, &runtime, &engine, &ids, op, IN_FLIGHT);
        }
        group.finish();
        runtime.block_on(engine.shutdown());
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let resident: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    resident * 4096
}

/// RSS growth per live session at 100k sessions (async durability, so the
/// figure includes sled's share for the records written behind).
fn memory_per_session() {
    const COUNT: u64 = 100_000;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = start(dir.path(), Durability::Async);
    runtime.block_on(async {
        engine.recover().await.unwrap();
        // Warm up allocator arenas and sled before the baseline.
        drive(1000, IN_FLIGHT, |_| {
            let engine = engine.clone();
            async move {
                engine.create(TENANT, new_session(None)).await.unwrap();
            }
        })
        .await;
        engine.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = rss_bytes();
        let started = Instant::now();
        drive(COUNT, IN_FLIGHT, |_| {
            let engine = engine.clone();
            async move {
                engine.create(TENANT, new_session(None)).await.unwrap();
            }
        })
        .await;
        let elapsed = started.elapsed();
        engine.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = rss_bytes();
        println!(
            "memory: {COUNT} live sessions, RSS {:.1} MiB -> {:.1} MiB, {:.0} bytes per live session (created at {:.0}/s)",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0,
            (after.saturating_sub(before)) as f64 / COUNT as f64,
            COUNT as f64 / elapsed.as_secs_f64(),
        );
        assert_eq!(engine.live_sessions() as u64, COUNT + 1000);
        engine.shutdown().await;
    });
}

criterion_group!(benches, bench_engine, bench_placement);

fn main() {
    memory_per_session();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
