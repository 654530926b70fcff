//! A cluster of real `serve` processes (the release binary) on throwaway
//! PostgreSQL servers with durable commits, on this machine:
//!
//! 1. creates per second of a three-node cluster (calls spread over the
//!    nodes) against one node with `durability = "postgres"`, alternating,
//!    medians of three rounds;
//! 2. a call on a session answered by its owner against the same call sent
//!    to another node (forwarded): latency one call at a time, and
//!    throughput with many in flight, alternating;
//! 3. failover after SIGKILL: with 1,000 and then 100,000 sessions on the
//!    killed node, the time from the kill to the first successful call on
//!    one of them through another node, and until a sample of 200 all
//!    answer.
//!
//! Run with `cargo bench --bench cluster`; figures are printed, not
//! asserted. `CLUSTER_BENCH_SECONDS` (default 3) sets a load round's
//! length, `CLUSTER_BENCH_BIG` (default 100000) the larger failover size,
//! `CLUSTER_BENCH_ONLY=failover` runs the failover part alone.
//! Needs the PostgreSQL server binaries (see the README). Every server it
//! starts listens on 127.0.0.1 and is stopped at the end.

#[path = "../tests/common/pg.rs"]
#[allow(dead_code)]
mod pg;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pg::TempPostgres;
use serde_json::{json, Value};

const TENANT: &str = "6f1c0d3e-8a4b-4c6e-9f10-2b3c4d5e6f70";
const KEY: &str = "cluster-bench-key";
const SECRET: &str = "cluster-bench-secret-0123456789";
const IN_FLIGHT: usize = 64;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

fn seconds() -> Duration {
    Duration::from_secs_f64(
        std::env::var("CLUSTER_BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0),
    )
}

/// A `serve` process.
struct Node {
    child: Child,
    base: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    /// Starts the binary with the config at `path` and waits until ready.
    async fn start(path: &Path) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_edge-sessions"))
            .args(["serve", "--config"])
            .arg(path)
            .env("EDGE_SESSIONS__LOG__FORMAT", "json")
            .env("RUST_LOG", "warn,edge_sessions::service=info")
            .env("EDGE_SESSIONS_CLUSTER_SECRET", SECRET)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the release binary starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["message"] == "listening" {
                        let _ = tx.send(v["addr"].as_str().unwrap().to_owned());
                    }
                }
            }
        });
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(60)))
            .await
            .unwrap()
            .expect("the binary logs its address");
        let node = Node {
            child,
            base: format!("http://{addr}"),
        };
        let client = reqwest::Client::new();
        for _ in 0..1500 {
            if let Ok(r) = client.get(format!("{}/readyz", node.base)).send().await {
                if r.status() == 200 {
                    return node;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{} did not become ready", node.base);
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node's config in `dir`: one tenant (key [`KEY`]), durability
/// `postgres`, and with `cluster` the node `name` of a cluster with 2 s
/// leases.
fn config(dir: &Path, name: &str, url: &str, cluster: bool) -> PathBuf {
    let data = dir.join(name);
    std::fs::create_dir_all(&data).unwrap();
    let key_file = dir.join("master.key");
    if !key_file.exists() {
        let keyring = edge_sessions::crypto::MasterKeyring::new(vec![
            edge_sessions::crypto::MasterKey::generate(),
        ])
        .unwrap();
        std::fs::write(&key_file, keyring.to_file_text()).unwrap();
    }
    let cluster = if cluster {
        format!(
            "[cluster]\nenabled = true\nnode_id = \"{name}\"\nshards = 256\nlease_seconds = 2\n"
        )
    } else {
        String::new()
    };
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[storage]
data_dir = {data:?}
durability = "postgres"
[security]
master_key_file = {key_file:?}
[postgres]
url = "{url}"
[rate_limits]
create_per_second = 0
read_per_second = 0
write_per_second = 0
[[tenants]]
id = "{TENANT}"
name = "bench"
max_active_sessions = 1000000
  [[tenants.api_keys]]
  sha256 = "{hash}"
{cluster}
"#,
        data = data.display().to_string(),
        key_file = key_file.display().to_string(),
        hash = edge_sessions::auth::hash_key_hex(KEY),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Creates a session at `base` (`id` or none); answers its id and the node
/// that owns it.
async fn create(
    client: &reqwest::Client,
    base: &str,
    id: Option<&str>,
) -> Option<(String, String)> {
    let body = match id {
        Some(id) => json!({"session_id": id, "edge_mcp_id": "bench"}),
        None => json!({"edge_mcp_id": "bench"}),
    };
    let response = client
        .post(format!("{base}/api/v1/sessions"))
        .header("X-API-Key", KEY)
        .json(&body)
        .send()
        .await
        .ok()?;
    if response.status() != 201 {
        return None;
    }
    let node = response
        .headers()
        .get("x-edge-sessions-node")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body: Value = response.json().await.ok()?;
    Some((body["session_id"].as_str()?.to_owned(), node))
}

/// Calls of `call(i)` kept `IN_FLIGHT` at a time for `length`: answers
/// successes per second and the p50 and p99 latency in ms.
async fn load<F, Fut>(length: Duration, in_flight: usize, call: F) -> (f64, f64, f64)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (call, stop, next) = (call.clone(), stop.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let at = Instant::now();
                    if call(i).await {
                        latencies.push(at.elapsed().as_secs_f64() * 1000.0);
                    }
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    (latencies.len() as f64 / elapsed, at(0.5), at(0.99))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn run() {
    let length = seconds();
    let big: usize = std::env::var("CLUSTER_BENCH_BIG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let client = client();
    let only = std::env::var("CLUSTER_BENCH_ONLY").unwrap_or_default();
    if only == "failover" {
        for (n, size) in [1_000usize, big].into_iter().enumerate() {
            failover(&client, dir.path(), n, size).await;
        }
        return;
    }

    // 1. Creates: three nodes against one.
    println!("# creates per second, {IN_FLIGHT} in flight, {length:?} rounds");
    let cluster_pg = TempPostgres::start_own_durable();
    let single_pg = TempPostgres::start_own_durable();
    let mut nodes = Vec::new();
    for name in ["n1", "n2", "n3"] {
        nodes.push(Node::start(&config(dir.path(), name, &cluster_pg.url, true)).await);
    }
    let single = Node::start(&config(dir.path(), "single", &single_pg.url, false)).await;
    wait_balanced(&client, &nodes[0].base, 3).await;
    let bases: Arc<Vec<String>> = Arc::new(nodes.iter().map(|n| n.base.clone()).collect());
    let (mut three, mut one) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let (c, b) = (client.clone(), bases.clone());
        let (rate, p50, p99) = load(length, IN_FLIGHT, move |i| {
            let (c, b) = (c.clone(), b.clone());
            async move { create(&c, &b[i as usize % 3], None).await.is_some() }
        })
        .await;
        println!("round {round}: 3-node cluster {rate:.0}/s (p50 {p50:.1} ms, p99 {p99:.1} ms)");
        three.push(rate);
        let (c, base) = (client.clone(), single.base.clone());
        let (rate, p50, p99) = load(length, IN_FLIGHT, move |_| {
            let (c, base) = (c.clone(), base.clone());
            async move { create(&c, &base, None).await.is_some() }
        })
        .await;
        println!(
            "round {round}: one node (postgres) {rate:.0}/s (p50 {p50:.1} ms, p99 {p99:.1} ms)"
        );
        one.push(rate);
    }
    let (three, one) = (median(three), median(one));
    println!(
        "creates: 3-node {three:.0}/s, one node {one:.0}/s, ratio {:.2}x",
        three / one
    );
    drop(single);

    // 2. A call on a session through its owner against through another node.
    println!("# a session read: direct to the owner against forwarded");
    let mut owned = Vec::new();
    while owned.len() < 200 {
        if let Some((id, node)) = create(&client, &bases[0], None).await {
            if node == "n1" {
                owned.push(id);
            }
        }
    }
    let owned = Arc::new(owned);
    let read = |base: String, owned: Arc<Vec<String>>, c: reqwest::Client| {
        move |i: u64| {
            let (c, base, owned) = (c.clone(), base.clone(), owned.clone());
            async move {
                let id = &owned[i as usize % owned.len()];
                c.get(format!("{base}/api/v1/sessions/{id}"))
                    .header("X-API-Key", KEY)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            }
        }
    };
    let (mut direct, mut forwarded) = (Vec::new(), Vec::new());
    let (mut direct_p50, mut forwarded_p50) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let (_, p50, p99) = load(
            length / 2,
            1,
            read(bases[0].clone(), owned.clone(), client.clone()),
        )
        .await;
        println!("round {round}: direct, one at a time: p50 {p50:.2} ms, p99 {p99:.2} ms");
        direct_p50.push(p50);
        let (_, p50, p99) = load(
            length / 2,
            1,
            read(bases[1].clone(), owned.clone(), client.clone()),
        )
        .await;
        println!("round {round}: forwarded, one at a time: p50 {p50:.2} ms, p99 {p99:.2} ms");
        forwarded_p50.push(p50);
        let (rate, _, p99) = load(
            length,
            IN_FLIGHT,
            read(bases[0].clone(), owned.clone(), client.clone()),
        )
        .await;
        println!("round {round}: direct, {IN_FLIGHT} in flight: {rate:.0}/s, p99 {p99:.1} ms");
        direct.push(rate);
        let (rate, _, p99) = load(
            length,
            IN_FLIGHT,
            read(bases[1].clone(), owned.clone(), client.clone()),
        )
        .await;
        println!("round {round}: forwarded, {IN_FLIGHT} in flight: {rate:.0}/s, p99 {p99:.1} ms");
        forwarded.push(rate);
    }
    let (direct, forwarded) = (median(direct), median(forwarded));
    let (direct_p50, forwarded_p50) = (median(direct_p50), median(forwarded_p50));
    println!(
        "reads: direct {direct:.0}/s, forwarded {forwarded:.0}/s ({:.2}x); p50 one at a time {direct_p50:.2} ms against {forwarded_p50:.2} ms (+{:.2} ms)",
        forwarded / direct,
        forwarded_p50 - direct_p50
    );
    drop(nodes);
    drop(cluster_pg);
    drop(single_pg);

    // 3. Failover after SIGKILL.
    for (n, size) in [1_000usize, big].into_iter().enumerate() {
        failover(&client, dir.path(), n, size).await;
    }
}

/// Kills a node holding `size` sessions; times their return.
async fn failover(client: &reqwest::Client, dir: &Path, run: usize, size: usize) {
    println!("# failover after SIGKILL, {size} sessions on the killed node");
    let pg = TempPostgres::start_own_durable();
    let names: Vec<String> = (1..=3).map(|i| format!("f{run}-{i}")).collect();
    let mut nodes = Vec::new();
    for name in &names {
        nodes.push(Some(Node::start(&config(dir, name, &pg.url, true)).await));
    }
    let bases: Vec<String> = nodes.iter().flatten().map(|n| n.base.clone()).collect();
    wait_balanced(client, &bases[0], 3).await;
    // Creates without an id at the victim land in its own shards.
    let victim = names[0].clone();
    let started = Instant::now();
    let made = Arc::new(std::sync::Mutex::new(Vec::with_capacity(size)));
    let count = Arc::new(AtomicU64::new(0));
    let creators: Vec<_> = (0..128)
        .map(|_| {
            let (client, base, made, count, victim) = (
                client.clone(),
                bases[0].clone(),
                made.clone(),
                count.clone(),
                victim.clone(),
            );
            tokio::spawn(async move {
                while count.fetch_add(1, Ordering::Relaxed) < size as u64 {
                    match create(&client, &base, None).await {
                        Some((id, node)) if node == victim => made.lock().unwrap().push(id),
                        _ => {
                            count.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for creator in creators {
        creator.await.unwrap();
    }
    let made = made.lock().unwrap().clone();
    println!(
        "{} sessions created on {victim} in {:.1} s",
        made.len(),
        started.elapsed().as_secs_f64()
    );
    let step = (made.len() / 200).max(1);
    let sample: Vec<String> = made.iter().step_by(step).take(200).cloned().collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    nodes[0].take().unwrap().kill();
    // Every sampled session polled on its own, through the two others: a
    // call waits while its shard has no owner (up to two leases), then
    // answers 503 and is sent again.
    let polls: Vec<_> = sample
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (client, base, id) = (client.clone(), bases[1 + i % 2].clone(), id.clone());
            tokio::spawn(async move {
                loop {
                    let ok = client
                        .get(format!("{base}/api/v1/sessions/{id}"))
                        .header("X-API-Key", KEY)
                        .timeout(Duration::from_secs(20))
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == 200);
                    if ok {
                        return Some(killed.elapsed());
                    }
                    if killed.elapsed() > Duration::from_secs(300) {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    let mut back = Vec::new();
    for poll in polls {
        if let Some(after) = poll.await.unwrap() {
            back.push(after.as_secs_f64());
        }
    }
    back.sort_by(f64::total_cmp);
    println!(
        "failover with {size} sessions: first call answered after {:.2} s, median {:.2} s, all {} of {} sampled after {:.2} s (2 s leases)",
        back.first().copied().unwrap_or(f64::NAN),
        back.get(back.len() / 2).copied().unwrap_or(f64::NAN),
        back.len(),
        sample.len(),
        back.last().copied().unwrap_or(f64::NAN),
    );
}

/// Waits until `base` counts `expected` live nodes (its
/// `cluster_nodes{status="alive"}`: the bench configures no admin key for
/// `/admin/cluster`), then three seconds for the hand-overs after the
/// joins (a few rounds of 2 s leases).
async fn wait_balanced(client: &reqwest::Client, base: &str, expected: usize) {
    let started = Instant::now();
    loop {
        let alive = async {
            let text = client
                .get(format!("{base}/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.lines()
                .find_map(|l| l.strip_prefix("cluster_nodes{status=\"alive\"} "))?
                .parse::<f64>()
                .ok()
        }
        .await;
        if alive == Some(expected as f64) {
            tokio::time::sleep(Duration::from_secs(3)).await;
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the cluster did not form"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
