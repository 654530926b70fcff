//! Load over the real HTTP port: the service in-process on 127.0.0.1:0 and
//! a driver with a fixed number of requests in flight, recording every
//! latency in an HdrHistogram. The driver shares the machine's cores with
//! the server, so these are figures for the whole loop, not the server alone.
//!
//! `cargo bench --bench http` (bounded: a fixed request count per phase).

use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_sessions::auth::hash_key_hex;
use edge_sessions::settings::Settings;
use futures::stream::{self, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEY: &str = "bench-key";
const IN_FLIGHT: usize = 64;
const SESSIONS: usize = 1000;
const REQUESTS: u64 = 40_000;

struct Phase {
    name: &'static str,
    ops_per_second: f64,
    latency: Histogram<u64>,
}

async fn run_phase<F, Fut>(name: &'static str, count: u64, op: F) -> Phase
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = reqwest::StatusCode>,
{
    let started = Instant::now();
    let latencies: Vec<u64> = stream::iter(0..count)
        .map(|i| {
            let fut = op(i);
            async move {
                let t = Instant::now();
                let status = fut.await;
                assert!(status.is_success(), "{name}: {status}");
                t.elapsed().as_micros() as u64
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let mut latency = Histogram::<u64>::new(3).unwrap();
    for l in latencies {
        latency.record(l.max(1)).unwrap();
    }
    Phase {
        name,
        ops_per_second: count as f64 / elapsed.as_secs_f64(),
        latency,
    }
}

fn report(phase: &Phase) {
    let l = &phase.latency;
    println!(
        "{:<28} {:>9.0} ops/s   p50 {:>6.2} ms   p99 {:>6.2} ms   p99.9 {:>6.2} ms   max {:>6.2} ms",
        phase.name,
        phase.ops_per_second,
        l.value_at_quantile(0.50) as f64 / 1000.0,
        l.value_at_quantile(0.99) as f64 / 1000.0,
        l.value_at_quantile(0.999) as f64 / 1000.0,
        l.max() as f64 / 1000.0,
    );
}

/// A master keyring for the bench server (tenants are configured, so it
/// needs one).
fn key_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("master.key");
    let keyring = edge_sessions::crypto::MasterKeyring::new(vec![
        edge_sessions::crypto::MasterKey::generate(),
    ])
    .unwrap();
    std::fs::write(&path, keyring.to_file_text().as_bytes()).unwrap();
    path
}

/// Rate limits are off here (a `*_per_second` of 0): this measures the
/// engine and the HTTP stack, not the configured budget.
async fn bench(durability: &str) {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndata_dir = {:?}\ndurability = \"{durability}\"\n[log]\nlevel = \"warn\"\n[security]\nmaster_key_file = {:?}\n[rate_limits]\ncreate_per_second = 0\nread_per_second = 0\nwrite_per_second = 0\n[[tenants]]\nid = \"6f1c0d3e-8a4b-4c6e-9f10-2b3c4d5e6f70\"\nname = \"bench\"\nmax_active_sessions = 10000000\n[[tenants.api_keys]]\nsha256 = \"{}\"",
        dir.path().display().to_string(),
        key_file(dir.path()).display().to_string(),
        hash_key_hex(KEY)
    ))
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/api/v1", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(edge_sessions::service::run(
        settings,
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()
        .unwrap();
    for _ in 0..200 {
        if client
            .get(format!("{base}/sessions?limit=1"))
            .header("X-API-Key", KEY)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let create = |i: u64| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let body = json!({"session_id": format!("s-{i}"), "edge_mcp_id": "bench", "client_type": "claude-code"});
            client
                .post(format!("{base}/sessions"))
                .header("X-API-Key", KEY)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let setup = run_phase("create (setup)", SESSIONS as u64, &create).await;
    let ids = Arc::new((0..SESSIONS).map(|i| format!("s-{i}")).collect::<Vec<_>>());
    let phases = [
        setup,
        run_phase("create", REQUESTS / 4, |i| create(SESSIONS as u64 + i)).await,
        run_phase("get", REQUESTS, |i| {
            let (client, base, ids) = (client.clone(), base.clone(), ids.clone());
            async move {
                let id = &ids[(i as usize) % ids.len()];
                client.get(format!("{base}/sessions/{id}")).header("X-API-Key", KEY).send().await.unwrap().status()
            }
        })
        .await,
        run_phase("heartbeat", REQUESTS, |i| {
            let (client, base, ids) = (client.clone(), base.clone(), ids.clone());
            async move {
                let id = &ids[(i as usize) % ids.len()];
                client.post(format!("{base}/sessions/{id}/activity")).header("X-API-Key", KEY).send().await.unwrap().status()
            }
        })
        .await,
        run_phase("tool execution", REQUESTS, |i| {
            let (client, base, ids) = (client.clone(), base.clone(), ids.clone());
            async move {
                let id = &ids[(i as usize) % ids.len()];
                let body = json!({"tool_name": "grep", "duration_ms": i % 100, "tokens_used": 10, "arguments": {"q": "x"}});
                client.post(format!("{base}/sessions/{id}/tools/execute")).header("X-API-Key", KEY).json(&body).send().await.unwrap().status()
            }
        })
        .await,
    ];
    println!(
        "\nHTTP, durability = {durability}, {IN_FLIGHT} requests in flight, {SESSIONS} sessions"
    );
    for phase in &phases[1..] {
        report(phase);
    }
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        bench("async").await;
        bench("sync").await;
    });
}
