//! Cluster membership and shard leases against a real PostgreSQL: nodes
//! split the shards, a silent node loses them after its lease and is fenced
//! off, a clean leave hands them over at once, a shard cannot change hands
//! under a fenced write.
//!
//! Each test drives several [`Member`]s in one process (the nodes of later
//! tests are real `serve` processes); leases are two seconds, short enough
//! for a fast suite and long enough that rounds driven by hand on a loaded
//! machine keep their shards.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::TempPostgres;
use edge_sessions::cluster::{
    placement, registry, Member, MemberConfig, RegistryError, ShardOwner,
};
use futures::future::BoxFuture;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

const SHARDS: u32 = 64;
const LEASE: Duration = Duration::from_secs(2);

async fn pool(pg: &TempPostgres) -> PgPool {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&pg.url)
        .await
        .expect("connect");
    edge_sessions::persist::postgres::MIGRATOR
        .run(&pool)
        .await
        .expect("migrate");
    pool
}

/// What a [`Recorder`] was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Told {
    Adopt(u32, u64),
    Drain(u32, u64),
    /// A drain ended.
    Drained(u32),
    Lost(u32),
}

/// A [`ShardOwner`] that records what it is told; its drains end once its
/// gate is open.
struct Recorder {
    told: Arc<std::sync::Mutex<Vec<Told>>>,
    gate: tokio::sync::watch::Sender<bool>,
}

impl Recorder {
    fn new(open: bool) -> Arc<Self> {
        Arc::new(Recorder {
            told: Arc::default(),
            gate: tokio::sync::watch::channel(open).0,
        })
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }

    fn told(&self) -> Vec<Told> {
        self.told.lock().unwrap().clone()
    }
}

impl ShardOwner for Recorder {
    fn adopt(&self, shard: u32, epoch: u64) {
        self.told.lock().unwrap().push(Told::Adopt(shard, epoch));
    }

    fn drain(&self, shard: u32, epoch: u64) -> BoxFuture<'static, ()> {
        self.told.lock().unwrap().push(Told::Drain(shard, epoch));
        let (told, mut gate) = (self.told.clone(), self.gate.subscribe());
        Box::pin(async move {
            let _ = gate.wait_for(|open| *open).await;
            told.lock().unwrap().push(Told::Drained(shard));
        })
    }

    fn lost(&self, shard: u32, _epoch: u64) {
        self.told.lock().unwrap().push(Told::Lost(shard));
    }
}

async fn member(pool: &PgPool, name: &str) -> Member {
    member_with(pool, name, Recorder::new(true)).await
}

async fn member_with(pool: &PgPool, name: &str, owner: Arc<Recorder>) -> Member {
    Member::join(
        pool.clone(),
        MemberConfig {
            node_id: name.to_owned(),
            advertise_url: format!("http://{name}.test:8080"),
            shards: SHARDS,
            lease: LEASE,
        },
        owner,
    )
    .await
    .expect("join")
}

/// Runs a round on every member at once, again until no round changes
/// anything (at most `limit`).
async fn settle(members: &[&Member], limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let rounds = futures::future::join_all(members.iter().map(|m| m.round())).await;
        let mut changed = false;
        for round in rounds {
            let round = round.expect("round");
            changed |= !round.acquired.is_empty()
                || !round.draining.is_empty()
                || !round.released.is_empty();
        }
        changed |= members.iter().any(|m| !m.handing_over().is_empty());
        if !changed && members.iter().map(|m| m.held().len() as u32).sum::<u32>() == SHARDS {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no stable split within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `m`'s rounds, a quarter lease apart, until it holds every shard
/// (the others' leases run out meanwhile).
async fn take_everything(m: &Member) {
    let started = Instant::now();
    loop {
        m.round().await.unwrap();
        if m.held().len() as u32 == SHARDS {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{} never took every shard",
            m.node_id()
        );
        tokio::time::sleep(LEASE / 4).await;
    }
}

/// The owner column of every shard row.
async fn owners(pool: &PgPool) -> BTreeMap<u32, Option<String>> {
    registry::shards(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.shard, row.owner))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_split_the_shards_by_rendezvous_and_a_join_moves_about_its_share() {
    let pg = TempPostgres::start();
    let pool = pool(&pg).await;
    let (a, b) = (member(&pool, "node-a").await, member(&pool, "node-b").await);
    settle(&[&a, &b], Duration::from_secs(10)).await;
    let names = vec!["node-a".to_owned(), "node-b".to_owned()];
    let rows = owners(&pool).await;
    for shard in 0..SHARDS {
        let desired = placement::desired_owner(shard, &names).unwrap();
        let holder = if a.holds(shard).is_some() {
            "node-a"
        } else {
            "node-b"
        };
        assert_eq!(holder, desired, "shard {shard}");
        assert!(
            a.holds(shard).is_some() != b.holds(shard).is_some(),
            "shard {shard} held by exactly one node"
        );
        assert_eq!(rows[&shard].as_deref(), Some(desired), "the row agrees");
    }

    // A third node joins: it gets the shards it is the desired owner of,
    // and only those move.
    let before: BTreeMap<u32, u64> = a.held().into_iter().chain(b.held()).collect();
    let c = member(&pool, "node-c").await;
    settle(&[&a, &b, &c], Duration::from_secs(10)).await;
    let names3 = vec![
        "node-a".to_owned(),
        "node-b".to_owned(),
        "node-c".to_owned(),
    ];
    let won: Vec<u32> = (0..SHARDS)
        .filter(|s| placement::desired_owner(*s, &names3) == Some("node-c"))
        .collect();
    assert_eq!(c.held().keys().copied().collect::<Vec<_>>(), won);
    assert!(
        (SHARDS as usize / 6..=SHARDS as usize / 2).contains(&won.len()),
        "node-c won {} of {SHARDS}",
        won.len()
    );
    for (shard, epoch) in a.held().into_iter().chain(b.held()) {
        assert_eq!(before[&shard], epoch, "shard {shard} stayed where it was");
    }
    for (shard, epoch) in c.held() {
        assert!(epoch > before[&shard], "a shard that moved has a new epoch");
    }

    // The node table lists all three alive, with their URLs.
    let nodes = registry::nodes(&pool, LEASE).await.unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(|n| n.alive));
    assert_eq!(nodes[2].advertise_url, "http://node-c.test:8080");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_loses_its_shards_after_its_lease_and_its_old_epochs_are_fenced_off() {
    let pg = TempPostgres::start();
    let pool = pool(&pg).await;
    let a_owner = Recorder::new(true);
    let a = member_with(&pool, "node-a", a_owner.clone()).await;
    let b = member(&pool, "node-b").await;
    settle(&[&a, &b], Duration::from_secs(10)).await;
    let a_had: Vec<(u32, u64)> = a.held().into_iter().collect();
    assert!(!a_had.is_empty());
    // A's fence passes while it holds its shards.
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        registry::fence(&mut *tx, "node-a", &a_had).await.unwrap(),
        Vec::<u32>::new()
    );
    tx.commit().await.unwrap();

    // node-a goes silent (no more rounds); node-b carries on. While
    // node-a's leases run, node-b takes none of its shards.
    let first = b.round().await.unwrap();
    assert!(
        first
            .acquired
            .iter()
            .all(|(s, _)| a_had.iter().all(|(h, _)| h != s)),
        "taken while node-a's lease ran: {first:?}"
    );
    take_everything(&b).await;

    // node-a stopped counting its shards as its own before they moved.
    for (shard, _) in &a_had {
        assert_eq!(a.holds(*shard), None, "shard {shard}");
        assert!(b.holds(*shard).unwrap() > a_had.iter().find(|h| h.0 == *shard).unwrap().1);
    }
    // Its old epochs fail the fence and renew nothing; node-b's pass.
    let mut tx = pool.begin().await.unwrap();
    let stale = registry::fence(&mut *tx, "node-a", &a_had).await.unwrap();
    assert_eq!(stale.len(), a_had.len());
    let b_now: Vec<(u32, u64)> = b.held().into_iter().collect();
    assert!(registry::fence(&mut *tx, "node-b", &b_now)
        .await
        .unwrap()
        .is_empty());
    tx.commit().await.unwrap();
    assert!(registry::renew(&pool, "node-a", &a_had, LEASE)
        .await
        .unwrap()
        .is_empty());
    assert!(registry::release(&pool, "node-a", &a_had)
        .await
        .unwrap()
        .is_empty());

    // When node-a wakes up, its round reports the loss, and its shards
    // come back only through a handover with yet newer epochs.
    let mut round = a.round().await.unwrap();
    round.lost.sort_unstable();
    let had: Vec<u32> = a_had.iter().map(|h| h.0).collect();
    assert_eq!(round.lost, had, "its shards ran out on its own clock");
    for shard in &had {
        assert!(
            a_owner.told().contains(&Told::Lost(*shard)),
            "shard {shard} not told lost"
        );
    }
    assert!(
        round.acquired.iter().all(|(s, _)| !had.contains(s)),
        "{round:?}"
    );
    settle(&[&a, &b], Duration::from_secs(10)).await;
    for (shard, epoch) in a.held() {
        let old = a_had.iter().find(|h| h.0 == shard).unwrap().1;
        assert!(epoch >= old + 2, "shard {shard}: epoch {epoch} after {old}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_leave_hands_the_shards_over_at_the_next_round() {
    let pg = TempPostgres::start();
    let pool = pool(&pg).await;
    let (a, b) = (member(&pool, "node-a").await, member(&pool, "node-b").await);
    // Both run their own loops, as `serve` will.
    let (stop_a, stopped_a) = tokio::sync::watch::channel(false);
    let (stop_b, stopped_b) = tokio::sync::watch::channel(false);
    let a = std::sync::Arc::new(a);
    let b = std::sync::Arc::new(b);
    let runs = [
        tokio::spawn({
            let a = a.clone();
            async move { a.run(stopped_a).await }
        }),
        tokio::spawn({
            let b = b.clone();
            async move { b.run(stopped_b).await }
        }),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut watch_b = b.watch();
    while a.held().len() + b.held().len() != SHARDS as usize || a.held().is_empty() {
        assert!(Instant::now() < deadline, "no split");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    stop_a.send(true).unwrap();
    let left_at = Instant::now();
    runs.into_iter().next().unwrap().await.unwrap();
    assert!(a.held().is_empty());
    // Released, not left to run out: no row names node-a any more.
    let rows = registry::shards(&pool).await.unwrap();
    assert!(
        rows.iter().all(|r| r.owner.as_deref() != Some("node-a")),
        "node-a still holds shards after leaving"
    );
    let rows = registry::nodes(&pool, LEASE).await.unwrap();
    assert!(!rows.iter().find(|n| n.node_id == "node-a").unwrap().alive);
    // node-b has them all well before a lease could have run out.
    while watch_b.borrow_and_update().len() != SHARDS as usize {
        tokio::time::timeout(Duration::from_secs(5), watch_b.changed())
            .await
            .expect("node-b took the shards")
            .unwrap();
    }
    let took = left_at.elapsed();
    assert!(took < LEASE, "took {took:?}: waited for the lease");
    assert!(owners(&pool)
        .await
        .values()
        .all(|o| o.as_deref() == Some("node-b")));
    stop_b.send(true).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_takes_its_own_shards_back_at_once() {
    let pg = TempPostgres::start();
    let pool = pool(&pg).await;
    let a = member(&pool, "node-a").await;
    settle(&[&a], Duration::from_secs(10)).await;
    let before = a.held();
    // The process dies with its leases running; its successor (same node
    // id) does not wait for them to run out, and bumps every epoch.
    drop(a);
    let again = member(&pool, "node-a").await;
    let round = again.round().await.unwrap();
    assert_eq!(round.acquired.len() as u32, SHARDS, "{round:?}");
    for (shard, epoch) in round.acquired {
        assert_eq!(epoch, before[&shard] + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_shard_count_is_refused() {
    let pg = TempPostgres::start();
    let pool = pool(&pg).await;
    member(&pool, "node-a").await;
    let refused = Member::join(
        pool.clone(),
        MemberConfig {
            node_id: "node-b".into(),
            advertise_url: "http://node-b.test:8080".into(),
            shards: SHARDS * 2,
            lease: LEASE,
        },
        Recorder::new(true),
    )
    .await;
    match refused {
        Err(e @ RegistryError::ShardCount { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("cluster.shards is 128") && text.contains("has 64"),
                "{text}"
            );
        }
        other => panic!(
            "joined with another shard count: {:?}",
            other.map(|m| m.node_id().to_owned())
        ),
    }
    // Nothing of node-b was written.
    assert_eq!(registry::nodes(&pool, LEASE).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_cannot_change_hands_under_a_fenced_write_and_nobody_waits_for_it() {
    let pg = TempPostgres::start();
    let pool = pool(&pg).await;
    let a = member(&pool, "node-a").await;
    settle(&[&a], Duration::from_secs(10)).await;
    let shard0 = (0, a.holds(0).unwrap());

    // node-a's write transaction passes the fence, then takes longer than
    // the lease.
    let mut tx = pool.begin().await.unwrap();
    assert!(registry::fence(&mut *tx, "node-a", &[shard0])
        .await
        .unwrap()
        .is_empty());
    // node-a's own renewal skips the row the write holds, without waiting
    // (the shard stays held on node-a's clock until it runs out).
    let started = Instant::now();
    assert!(registry::renew(&pool, "node-a", &[shard0], LEASE)
        .await
        .unwrap()
        .is_empty());
    assert!(
        started.elapsed() < LEASE / 2,
        "the renewal waited for the write"
    );
    tokio::time::sleep(LEASE + Duration::from_millis(300)).await;
    // node-b wants the expired shard: its compare-and-set skips the row the
    // write holds, so it cannot take the shard under the write, and its
    // round is not held up.
    let started = Instant::now();
    let taken = registry::acquire(&pool, "node-b", &[0, 1], LEASE)
        .await
        .unwrap();
    assert!(
        started.elapsed() < LEASE / 2,
        "the acquire waited for the write"
    );
    assert!(
        taken.iter().all(|(s, _)| *s != 0),
        "taken under the write: {taken:?}"
    );
    assert_eq!(taken.len(), 1, "shard 1, expired and unlocked, is taken");
    tx.commit().await.unwrap();
    // Once the write committed, the expired shard is free to take.
    let taken = registry::acquire(&pool, "node-b", &[0], LEASE)
        .await
        .unwrap();
    assert_eq!(taken, vec![(0, shard0.1 + 1)]);
    assert_eq!(a.holds(0), None, "node-a's own clock had let it go");
}

fn session(tenant: uuid::Uuid, id: &str, version: u64) -> edge_sessions::model::Session {
    use edge_sessions::engine::{admission, NewSession, SessionDefaults, TenantLimits};
    let limits = TenantLimits {
        id: tenant,
        name: "test".into(),
        max_active_sessions: usize::MAX,
        max_ttl_seconds: 86_400,
        max_idle_timeout_seconds: 86_400,
    };
    let request = NewSession {
        session_id: Some(id.into()),
        edge_mcp_id: "edge-1".into(),
        ..NewSession::default()
    };
    let defaults = SessionDefaults {
        idle_timeout_seconds: 1800,
        ttl_seconds: 86_400,
    };
    let now = edge_sessions::model::time::now_ms();
    let mut session = admission::build(request, &limits, defaults, now).unwrap();
    session.version = version;
    session
}

fn tier(
    pg: &TempPostgres,
    cluster_shards: Option<u32>,
) -> edge_sessions::persist::postgres::Postgres {
    edge_sessions::persist::postgres::Postgres::new(
        &edge_sessions::persist::postgres::PostgresConfig {
            url: pg.url.clone(),
            max_connections: 2,
            statement_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            cluster_shards,
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_writes_each_session_with_its_shard_and_rebuilds_one_shard_alone() {
    use edge_sessions::persist::outbox::Entry;
    const SHARDS: u32 = 8;
    let pg = TempPostgres::start();
    let node = tier(&pg, Some(SHARDS));
    node.migrate_up().await.unwrap();
    let (t1, t2) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
    let sessions: Vec<_> = (0..60)
        .map(|i| session(if i % 2 == 0 { t1 } else { t2 }, &format!("s-{i}"), 1))
        .collect();
    let entries: Vec<Entry> = sessions
        .iter()
        .cloned()
        .map(|s| Entry::Session(Box::new(s)))
        .collect();
    node.lane().ship(&entries).await.unwrap();

    // Every row carries the shard placement gives it.
    let rows =
        pg.psql("SELECT tenant_id || ' ' || session_id || ' ' || shard FROM mcp.edge_mcp_sessions");
    assert_eq!(
        rows.lines().filter(|l| !l.trim().is_empty()).count(),
        60,
        "{rows}"
    );
    for s in &sessions {
        let shard = placement::shard_of(s.tenant_id, &s.session_id, SHARDS);
        assert!(
            rows.contains(&format!("{} {} {shard}", s.tenant_id, s.session_id)),
            "{} not in shard {shard}: {rows}",
            s.session_id
        );
    }

    // Each shard reads back its own live sessions, page by page, and no
    // other: together all of them, once.
    let mut seen = Vec::new();
    for shard in 0..SHARDS {
        let mut after = uuid::Uuid::nil();
        loop {
            let page = node.live_sessions_of_shard(shard, after, 4).await.unwrap();
            let Some(last) = page.last() else { break };
            after = last.0.id;
            for (s, executions) in &page {
                assert_eq!(
                    placement::shard_of(s.tenant_id, &s.session_id, SHARDS),
                    shard
                );
                assert!(executions.is_empty());
                seen.push(s.session_id.to_string());
            }
        }
    }
    seen.sort();
    let mut all: Vec<String> = sessions.iter().map(|s| s.session_id.to_string()).collect();
    all.sort();
    assert_eq!(seen, all);

    // A node out of a cluster writes no shard, and keeps the one a row has.
    let single = tier(&pg, None);
    let mut newer = sessions[0].clone();
    newer.version = 2;
    let fresh = session(t1, "single-node", 1);
    single
        .lane()
        .ship(&[
            Entry::Session(Box::new(newer)),
            Entry::Session(Box::new(fresh)),
        ])
        .await
        .unwrap();
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.edge_mcp_sessions WHERE session_id = 's-0' AND version = 2 AND shard IS NOT NULL"),
        1
    );
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.edge_mcp_sessions WHERE session_id = 'single-node' AND shard IS NULL"),
        1
    );
    // Ended sessions are not rebuilt.
    let shard0 = placement::shard_of(t1, "s-0", SHARDS);
    pg.psql("UPDATE mcp.edge_mcp_sessions SET status = 'terminated' WHERE session_id = 's-0'");
    let page = node
        .live_sessions_of_shard(shard0, uuid::Uuid::nil(), 100)
        .await
        .unwrap();
    assert!(page.iter().all(|(s, _)| &*s.session_id != "s-0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_batch_is_written_only_while_its_node_holds_the_shard_at_that_epoch() {
    use edge_sessions::persist::outbox::Entry;
    use edge_sessions::persist::postgres::Fence;
    let pg = TempPostgres::start();
    let pool = pool(&pg).await;
    let node = tier(&pg, Some(SHARDS));
    let a = member(&pool, "node-a").await;
    settle(&[&a], Duration::from_secs(10)).await;
    let tenant = uuid::Uuid::from_u128(7);
    let first = session(tenant, "fenced-1", 1);
    let shard = placement::shard_of(tenant, "fenced-1", SHARDS);
    let a_fence = Fence {
        node_id: "node-a".into(),
        held: vec![(shard, a.holds(shard).unwrap())],
    };
    let mut lane = node.lane();
    a.round().await.unwrap();
    lane.ship_fenced(&[Entry::Session(Box::new(first.clone()))], &a_fence)
        .await
        .unwrap();
    let version =
        || pg.scalar("SELECT version FROM mcp.edge_mcp_sessions WHERE session_id = 'fenced-1'");
    assert_eq!(version(), 1);

    // node-b takes every shard while node-a is silent.
    let b = member(&pool, "node-b").await;
    take_everything(&b).await;
    let mut second = first.clone();
    second.version = 2;
    let refused = lane
        .ship_fenced(&[Entry::Session(Box::new(second.clone()))], &a_fence)
        .await
        .unwrap_err();
    assert_eq!(refused.fenced(), &[shard], "{refused}");
    assert!(!refused.is_data());
    assert_eq!(version(), 1, "nothing of a fenced batch is written");

    // The same lane (its connection kept) ships node-b's batch.
    b.round().await.unwrap();
    let b_fence = Fence {
        node_id: "node-b".into(),
        held: vec![(shard, b.holds(shard).unwrap())],
    };
    lane.ship_fenced(&[Entry::Session(Box::new(second))], &b_fence)
        .await
        .unwrap();
    assert_eq!(version(), 2);
    // A fence naming a shard at an epoch never held refuses too.
    let mut third = first.clone();
    third.version = 3;
    // The lease just renewed, so the epoch is what fails.
    b.round().await.unwrap();
    let wrong = Fence {
        node_id: "node-b".into(),
        held: vec![(shard, b.holds(shard).unwrap() + 5)],
    };
    let refused = lane
        .ship_fenced(&[Entry::Session(Box::new(third))], &wrong)
        .await
        .unwrap_err();
    assert_eq!(refused.fenced(), &[shard]);
    assert_eq!(version(), 2);
    // A fence that does not name the shard of a session it writes is a
    // caller's mistake, refused before anything is sent.
    let elsewhere = (shard + 1) % SHARDS;
    let unnamed = Fence {
        node_id: "node-b".into(),
        held: vec![(elsewhere, b.holds(elsewhere).unwrap())],
    };
    let mut fourth = first.clone();
    fourth.version = 4;
    let refused = lane
        .ship_fenced(&[Entry::Session(Box::new(fourth))], &unnamed)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("does not name"), "{refused}");
    assert_eq!(version(), 2);

    // A new session with an execution in the same batch (the path that
    // runs as a transaction): written behind a good fence, not behind a
    // stale one.
    let execution = |seq: u64| Entry::Execution {
        session_row: uuid::Uuid::nil(),
        seq,
        execution: edge_sessions::model::ToolExecution {
            tool_name: "grep".into(),
            tool_id: None,
            arguments: "{}".into(),
            result: "{}".into(),
            error: None,
            duration_ms: 3,
            tokens_used: 1,
            executed_at: 1_700_000_000_000,
            recorded_at: 1_700_000_000_000,
        },
    };
    let with_run = |id: &str| {
        let created = session(tenant, id, 1);
        let mut run = execution(1);
        if let Entry::Execution { session_row, .. } = &mut run {
            *session_row = created.id;
        }
        let shard = placement::shard_of(tenant, id, SHARDS);
        (vec![Entry::Session(Box::new(created)), run], shard)
    };
    b.round().await.unwrap();
    let (entries, shard) = with_run("fenced-2");
    let good = Fence {
        node_id: "node-b".into(),
        held: vec![(shard, b.holds(shard).unwrap())],
    };
    lane.ship_fenced(&entries, &good).await.unwrap();
    let (entries, shard) = with_run("fenced-3");
    let stale = Fence {
        node_id: "node-a".into(),
        held: vec![(shard, 1)],
    };
    let refused = lane.ship_fenced(&entries, &stale).await.unwrap_err();
    assert_eq!(refused.fenced(), &[shard]);
    let rows = |id: &str| {
        pg.scalar(&format!(
            "SELECT count(*) FROM mcp.session_tool_executions e JOIN mcp.edge_mcp_sessions s ON e.session_id = s.id WHERE s.session_id = '{id}'"
        ))
    };
    assert_eq!(rows("fenced-2"), 1);
    assert_eq!(rows("fenced-3"), 0);
    assert_eq!(
        pg.scalar("SELECT count(*) FROM mcp.edge_mcp_sessions WHERE session_id = 'fenced-3'"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_waits_for_the_drain_and_keeps_the_lease_meanwhile() {
    let pg = TempPostgres::start();
    let pool = pool(&pg).await;
    let a_owner = Recorder::new(false);
    let a = member_with(&pool, "node-a", a_owner.clone()).await;
    settle(&[&a], Duration::from_secs(10)).await;
    let adopted = a_owner
        .told()
        .iter()
        .filter(|t| matches!(t, Told::Adopt(..)))
        .count();
    assert_eq!(adopted as u32, SHARDS, "every shard taken was adopted");

    // node-b joins: node-a starts draining what node-b should own.
    let b_owner = Recorder::new(true);
    let b = member_with(&pool, "node-b", b_owner.clone()).await;
    let first = a.round().await.unwrap();
    assert!(
        !first.draining.is_empty() && first.released.is_empty(),
        "{first:?}"
    );
    let mut moving = first.draining.clone();
    moving.sort_unstable();
    assert_eq!(a.handing_over(), moving);
    // For longer than a lease, node-a keeps them (renewed) and node-b
    // cannot take them.
    let until = Instant::now() + LEASE + LEASE / 2;
    while Instant::now() < until {
        let round = a.round().await.unwrap();
        assert!(
            round.released.is_empty() && round.lost.is_empty(),
            "{round:?}"
        );
        let round = b.round().await.unwrap();
        assert!(
            round.acquired.iter().all(|(s, _)| !moving.contains(s)),
            "taken during the drain: {round:?}"
        );
        tokio::time::sleep(LEASE / 4).await;
    }
    let rows = owners(&pool).await;
    assert!(moving.iter().all(|s| rows[s].as_deref() == Some("node-a")));

    // The drains end: the next round releases, node-b's next takes them.
    a_owner.open();
    let started = Instant::now();
    let mut released = Vec::new();
    while released.len() < moving.len() {
        released.extend(a.round().await.unwrap().released);
        assert!(started.elapsed() < Duration::from_secs(5), "never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    released.sort_unstable();
    assert_eq!(released, moving);
    let mut taken = Vec::new();
    while taken.len() < moving.len() {
        taken.extend(b.round().await.unwrap().acquired);
        assert!(started.elapsed() < Duration::from_secs(10), "never taken");
    }
    let mut shards: Vec<u32> = taken.iter().map(|(s, _)| *s).collect();
    shards.sort_unstable();
    assert_eq!(shards, moving);
    // Told in order: each drain ended before its shard was released, and
    // node-b adopted each at its new epoch.
    let told = a_owner.told();
    for shard in &moving {
        let drain = told
            .iter()
            .position(|t| matches!(t, Told::Drain(s, _) if s == shard));
        let drained = told.iter().position(|t| *t == Told::Drained(*shard));
        assert!(drain.unwrap() < drained.unwrap());
    }
    for (shard, epoch) in taken {
        assert!(b_owner.told().contains(&Told::Adopt(shard, epoch)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_drains_every_shard_before_it_releases_them() {
    let pg = TempPostgres::start();
    let pool = pool(&pg).await;
    let a_owner = Recorder::new(false);
    let a = Arc::new(member_with(&pool, "node-a", a_owner.clone()).await);
    settle(&[&a], Duration::from_secs(10)).await;
    let leaving = tokio::spawn({
        let a = a.clone();
        async move { a.leave().await }
    });
    tokio::time::sleep(LEASE / 4).await;
    assert!(!leaving.is_finished(), "left before the drains ended");
    assert!(owners(&pool)
        .await
        .values()
        .all(|o| o.as_deref() == Some("node-a")));
    a_owner.open();
    leaving.await.unwrap().unwrap();
    assert!(
        owners(&pool).await.values().all(Option::is_none),
        "all released"
    );
    let drained = a_owner
        .told()
        .iter()
        .filter(|t| matches!(t, Told::Drained(_)))
        .count();
    assert_eq!(drained as u32, SHARDS);
}
