//! The engine's side of a cluster ([`ShardOwner`]): taking a shard over
//! rebuilds its sessions from PostgreSQL and starts their actors; handing
//! one over lets its calls finish and its acknowledged changes commit,
//! then stops its actors; losing one stops them at once.
//!
//! A cluster node's store is a cache of the shards it serves: a session
//! that leaves (its shard handed over or lost) is also taken out of it, so
//! nothing stale is ever read back, and a shard taken again is rebuilt
//! afresh from PostgreSQL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use futures::future::BoxFuture;
use futures::stream::{self, StreamExt};
use uuid::Uuid;

use super::handle::Engine;
use super::session::{Evict, FlushActivity, SessionActor};
use super::shared::FAN_OUT;
use super::tenant;
use crate::cluster::ownership::{SessionKey, Stage};
use crate::cluster::quota::{Taken, RESERVE_LIMIT};
use crate::cluster::{Ownership, RegistryError, ShardOwner};
use crate::model::{Session, SessionError, ToolExecution};
use crate::persist::postgres::Postgres;
use crate::persist::write_behind::purge_ops;
use crate::persist::WriteOp;

/// Sessions read from PostgreSQL per query when a shard is taken over.
const ADOPT_PAGE: usize = 1000;
/// First and longest wait between two tries to read a shard.
const ADOPT_RETRY: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// The engine as a cluster member's [`ShardOwner`].
pub struct EngineShards {
    engine: Engine,
    ownership: Arc<Ownership>,
    postgres: Postgres,
    /// Longest a hand-over waits for calls in flight and for PostgreSQL.
    drain_limit: Duration,
    /// The actors of each shard lost or handed over, until they stopped: a
    /// shard taken again ships nothing they may still write.
    evicted: Arc<Evicted>,
    /// Shards whose sessions are being read from PostgreSQL at once.
    adopting: Arc<tokio::sync::Semaphore>,
}

/// Shards read from PostgreSQL at once when taken over: enough to keep
/// PostgreSQL busy, few enough to leave the pool's other connections to
/// the calls (the cluster's rounds have their own pool).
const ADOPT_READERS: usize = 2;

/// Actors told to stop, by shard.
type Evicted = std::sync::Mutex<HashMap<u32, Vec<Addr<SessionActor>>>>;

impl EngineShards {
    /// The owner of `engine`'s shards (started with `ownership` as its
    /// cluster), reading taken-over shards from `postgres`; a hand-over
    /// waits at most `drain_limit` (within the member's own bound).
    pub fn new(
        engine: Engine,
        postgres: Postgres,
        drain_limit: Duration,
    ) -> Result<Self, SessionError> {
        let ownership = engine.shared.ownership.clone().ok_or_else(|| {
            SessionError::Storage("the engine was not started as a cluster node".into())
        })?;
        Ok(EngineShards {
            engine,
            ownership,
            postgres,
            drain_limit,
            evicted: Arc::default(),
            adopting: Arc::new(tokio::sync::Semaphore::new(ADOPT_READERS)),
        })
    }
}

impl ShardOwner for EngineShards {
    fn adopt(&self, shard: u32, epoch: u64) {
        self.ownership.begin(shard, epoch);
        let (engine, ownership, postgres, evicted, adopting) = (
            self.engine.clone(),
            self.ownership.clone(),
            self.postgres.clone(),
            self.evicted.clone(),
            self.adopting.clone(),
        );
        tokio::spawn(async move {
            engine
                .adopt_shard(&ownership, &postgres, &evicted, &adopting, shard, epoch)
                .await
        });
    }

    fn drain(&self, shard: u32, epoch: u64) -> BoxFuture<'static, ()> {
        let (engine, ownership, evicted, limit) = (
            self.engine.clone(),
            self.ownership.clone(),
            self.evicted.clone(),
            self.drain_limit,
        );
        Box::pin(async move {
            engine
                .drain_shard(&ownership, &evicted, shard, epoch, limit)
                .await
        })
    }

    fn lost(&self, shard: u32, epoch: u64) {
        if let Some(sessions) = self.ownership.end(shard, epoch) {
            tracing::warn!(
                shard,
                epoch,
                sessions = sessions.len(),
                "cluster: shard lost; its sessions are served elsewhere now"
            );
            let stopped = self.engine.evict(sessions);
            remember(&self.evicted, shard, stopped);
        }
    }
}

fn lock(evicted: &Evicted) -> std::sync::MutexGuard<'_, HashMap<u32, Vec<Addr<SessionActor>>>> {
    evicted.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps `stopped`, the actors of `shard` told to stop, until they have;
/// forgets those of every shard that have stopped already (a shard never
/// taken again keeps nothing for long).
fn remember(evicted: &Evicted, shard: u32, stopped: Vec<Addr<SessionActor>>) {
    let mut evicted = lock(evicted);
    evicted.retain(|_, actors| {
        actors.retain(Addr::connected);
        !actors.is_empty()
    });
    if !stopped.is_empty() {
        evicted.entry(shard).or_default().extend(stopped);
    }
}

/// Longest a shard taken again waits for its former actors to stop.
const EVICTED_WAIT: Duration = Duration::from_secs(5);

impl Engine {
    /// Takes `shard` over: waits until the actors it had here before (if
    /// it lost the shard and won it back) have stopped, so nothing they
    /// write can ship; stores the shard's sessions read from PostgreSQL
    /// (live ones, and ended ones within their retention), which never
    /// ship back; from the next log record on, the shard's changes ship
    /// under `epoch`; then starts the live sessions' actors and serves the
    /// shard. Reading PostgreSQL is retried while it fails, for as long as
    /// this node holds the shard at `epoch`.
    async fn adopt_shard(
        &self,
        ownership: &Ownership,
        postgres: &Postgres,
        evicted: &Evicted,
        adopting: &tokio::sync::Semaphore,
        shard: u32,
        epoch: u64,
    ) {
        let started = std::time::Instant::now();
        let former = lock(evicted).remove(&shard).unwrap_or_default();
        let waited = tokio::time::Instant::now() + EVICTED_WAIT;
        while former.iter().any(Addr::connected) && tokio::time::Instant::now() < waited {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A few shards read at a time: a node taking over a dead node's
        // hundred shards must not hold every connection of its pool.
        let Ok(_reading) = adopting.acquire().await else {
            return;
        };
        // Its live sessions, then those that ended within the retention
        // (which stay readable).
        let mut live = Vec::new();
        let ended_since = self.shared.clock.now() - self.shared.retention_ms;
        for ended in [false, true] {
            let mut after = Uuid::nil();
            let mut delay = ADOPT_RETRY.0;
            loop {
                if ownership.tenure(shard).map(|t| t.epoch) != Some(epoch) {
                    return;
                }
                let page = if ended {
                    postgres
                        .ended_sessions_of_shard(shard, ended_since, after, ADOPT_PAGE)
                        .await
                } else {
                    postgres
                        .live_sessions_of_shard(shard, after, ADOPT_PAGE)
                        .await
                };
                match page {
                    Ok(page) => {
                        let Some(last) = page.last().map(|(s, _)| s.id) else {
                            break;
                        };
                        after = last;
                        live.extend(self.store_page(ownership, shard, page));
                        delay = ADOPT_RETRY.0;
                    }
                    Err(e) => {
                        tracing::warn!(shard, error = %e, retry_in_ms = delay.as_millis() as u64, "cluster: reading a shard taken over failed");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(ADOPT_RETRY.1);
                    }
                }
            }
        }
        // In the log (so reads see it) before the shard's changes ship:
        // what was read back is never written back.
        let _ = self.shared.write_behind.local_barrier().await;
        let from = self
            .outbox
            .as_ref()
            .map_or(0, |outbox| outbox.applied_through() + 1);
        if !ownership.ship_from(shard, epoch, from) {
            return;
        }
        let count = live.len();
        let started_all = ownership.while_held(shard, Some(epoch), false, || {
            let mut restorer = tenant::Restorer::new(&self.shared);
            for session in live {
                if let Some(handle) = self.tenants.get(&session.tenant_id) {
                    restorer.restore(handle.limits.id, &handle.link, session);
                }
            }
            restorer.finish();
        });
        if started_all.is_some() && ownership.start_serving(shard, epoch) {
            crate::telemetry::metrics::cluster_handover("adopt", started.elapsed());
            tracing::debug!(
                shard,
                epoch,
                sessions = count,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "cluster: shard served here"
            );
        }
    }

    /// Stores one page of a shard's sessions (records, index entries,
    /// executions) and registers them; answers the live ones, whose actors
    /// start once the shard ships (an overdue one expires in its actor,
    /// and that end ships).
    fn store_page(
        &self,
        ownership: &Ownership,
        shard: u32,
        page: Vec<(Session, Vec<(u64, ToolExecution)>)>,
    ) -> Vec<Session> {
        let mut live = Vec::new();
        let mut ops = Vec::new();
        for (session, executions) in page {
            if !self.tenants.contains_key(&session.tenant_id) {
                continue;
            }
            ownership.register(
                session.id,
                session.tenant_id,
                session.session_id.clone(),
                shard,
            );
            ops.extend(WriteOp::cached(&session));
            for (seq, execution) in &executions {
                ops.push(WriteOp::put_execution(session.id, *seq, execution));
            }
            if !session.status.is_final() {
                live.push(session);
            }
        }
        self.shared.write_behind.submit(ops, false);
        live
    }

    /// Hands `shard` over: no new calls, the calls in flight finish, the
    /// sessions' coalesced writes are queued, everything queued commits to
    /// PostgreSQL (each step within `limit`), then its actors stop.
    async fn drain_shard(
        &self,
        ownership: &Ownership,
        evicted: &Evicted,
        shard: u32,
        epoch: u64,
        limit: Duration,
    ) {
        if !ownership.set_stage(shard, epoch, Stage::Draining) {
            return;
        }
        let started = tokio::time::Instant::now();
        let deadline = started + limit;
        while ownership.calls_in_flight(shard) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let sessions = ownership.sessions_of(shard);
        stream::iter(sessions)
            .for_each_concurrent(FAN_OUT, |(tenant, id)| async move {
                let addr = self
                    .shared
                    .directories
                    .get(&tenant)
                    .and_then(|d| d.get(&*id).map(|a| a.clone()));
                if let Some(addr) = addr {
                    let _ = addr.send(FlushActivity).await;
                }
            })
            .await;
        let committed =
            tokio::time::timeout_at(deadline, self.shared.write_behind.shipped_barrier()).await;
        if !matches!(committed, Ok(Ok(Ok(())))) {
            tracing::warn!(
                shard,
                "cluster: a hand-over did not see every change committed in time"
            );
        }
        if let Some(sessions) = ownership.end(shard, epoch) {
            crate::telemetry::metrics::cluster_handover("drain", started.elapsed());
            tracing::debug!(
                shard,
                sessions = sessions.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "cluster: shard handed over"
            );
            let stopped = self.evict(sessions);
            remember(evicted, shard, stopped);
        }
    }

    /// Stops the actors of `sessions` without a write and takes them out
    /// of the store (a cache of the shards served here); answers the
    /// actors told to stop.
    pub(super) fn evict(&self, sessions: Vec<SessionKey>) -> Vec<Addr<SessionActor>> {
        let mut ops = Vec::new();
        let mut stopped = Vec::new();
        for (tenant, id) in sessions {
            let Some(directory) = self.shared.directories.get(&tenant) else {
                continue;
            };
            if let Some((_, addr)) = directory.remove(&*id) {
                addr.do_send(Evict);
                stopped.push(addr);
            }
            let store = &self.shared.store;
            let purge = store
                .session(tenant, &id)
                .and_then(|stored| stored.map(|s| purge_ops(store, &s)).transpose());
            match purge {
                Ok(purge) => ops.extend(purge.into_iter().flatten()),
                Err(e) => {
                    tracing::warn!(session_id = %id, error = %e, "cluster: a session handed over stays in the cache")
                }
            }
        }
        if !ops.is_empty() {
            self.shared.write_behind.submit(ops, false);
        }
        stopped
    }

    /// On a cluster node, room for one create of `tenant` (limit `max`)
    /// from this node's reservation (see `cluster::quota`); `None`
    /// elsewhere. Waits at most [`RESERVE_LIMIT`] for PostgreSQL, so a
    /// node that forwarded the create waits longer than this.
    pub(super) async fn take_quota(
        &self,
        tenant: Uuid,
        max: usize,
    ) -> Result<Option<Taken>, SessionError> {
        let (Some(quota), Some(postgres)) = (&self.cluster_quota, &self.postgres) else {
            return Ok(None);
        };
        let taken = tokio::time::timeout(RESERVE_LIMIT, quota.take(postgres.pool(), tenant, max))
            .await
            .unwrap_or(Err(RegistryError::Timeout));
        match taken {
            Ok(Some(taken)) => Ok(Some(taken)),
            Ok(None) => Err(SessionError::TenantLimit { limit: max }),
            Err(e) => {
                tracing::warn!(error = %e, "cluster: reserving quota failed");
                Err(SessionError::Unavailable)
            }
        }
    }

    /// Tells the quota how the create `taken` was for ended: committed,
    /// rolled back (the log refused it), or not committed in time (then it
    /// may still be: it stays counted until everything queued before it is
    /// committed or fenced off; a barrier that fails, PostgreSQL still
    /// away, is asked again).
    pub(super) fn settle_quota(&self, taken: Taken, settled: &Result<(), SessionError>) {
        let Some(quota) = &self.cluster_quota else {
            return;
        };
        match settled {
            Ok(()) => quota.settled(taken, true),
            Err(SessionError::StorageUnavailable) => quota.settled(taken, false),
            Err(_) => {
                let (quota, engine) = (quota.clone(), self.clone());
                tokio::spawn(async move {
                    while !matches!(
                        engine.shared.write_behind.shipped_barrier().await,
                        Ok(Ok(()))
                    ) {
                        if engine
                            .shared
                            .shutting_down
                            .load(std::sync::atomic::Ordering::Acquire)
                        {
                            // Never settled: the row counts it until the
                            // node's rows go (it is leaving).
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    quota.settled(taken, true);
                });
            }
        }
    }
}
