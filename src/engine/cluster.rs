//! The engine's side of a cluster ([`ShardOwner`]): taking a shard over
//! rebuilds its sessions from PostgreSQL and starts their actors; handing
//! one over lets its calls finish and its acknowledged changes commit,
//! then stops its actors; losing one stops them at once.
//!
//! A cluster node's store is a cache of the shards it serves: a session
//! that leaves (its shard handed over or lost) is also taken out of it, so
//! nothing stale is ever read back, and a shard taken again is rebuilt
//! afresh from PostgreSQL.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{self, StreamExt};
use uuid::Uuid;

use super::handle::Engine;
use super::recovery::{classify, Found};
use super::session::{Evict, FlushActivity};
use super::shared::FAN_OUT;
use super::tenant;
use crate::cluster::ownership::{SessionKey, Stage};
use crate::cluster::{Ownership, ShardOwner};
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
}

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
        })
    }
}

impl ShardOwner for EngineShards {
    fn adopt(&self, shard: u32, epoch: u64) {
        // Changes logged from here on may ship under this epoch.
        let from = self
            .engine
            .outbox
            .as_ref()
            .map_or(0, |outbox| outbox.applied_through() + 1);
        self.ownership.begin(shard, epoch, from);
        let (engine, ownership, postgres) = (
            self.engine.clone(),
            self.ownership.clone(),
            self.postgres.clone(),
        );
        tokio::spawn(async move {
            engine
                .adopt_shard(&ownership, &postgres, shard, epoch)
                .await
        });
    }

    fn drain(&self, shard: u32, epoch: u64) -> BoxFuture<'static, ()> {
        let (engine, ownership, limit) = (
            self.engine.clone(),
            self.ownership.clone(),
            self.drain_limit,
        );
        Box::pin(async move { engine.drain_shard(&ownership, shard, epoch, limit).await })
    }

    fn lost(&self, shard: u32, epoch: u64) {
        if let Some(sessions) = self.ownership.end(shard, epoch) {
            tracing::warn!(
                shard,
                epoch,
                sessions = sessions.len(),
                "cluster: shard lost; its sessions are served elsewhere now"
            );
            self.engine.evict(sessions);
        }
    }
}

impl Engine {
    /// Rebuilds `shard`'s live sessions from PostgreSQL and starts their
    /// actors, then serves it; retries while PostgreSQL fails, for as long
    /// as this node holds the shard at `epoch`.
    async fn adopt_shard(
        &self,
        ownership: &Ownership,
        postgres: &Postgres,
        shard: u32,
        epoch: u64,
    ) {
        let started = std::time::Instant::now();
        let mut after = Uuid::nil();
        let mut delay = ADOPT_RETRY.0;
        let mut adopted = 0usize;
        loop {
            if ownership.tenure(shard).map(|t| t.epoch) != Some(epoch) {
                return;
            }
            // Sessions that ended within the retention stay readable.
            let ended_since = self.shared.clock.now() - self.shared.retention_ms;
            match postgres
                .live_sessions_of_shard(shard, ended_since, after, ADOPT_PAGE)
                .await
            {
                Ok(page) => {
                    let Some(last) = page.last().map(|(s, _)| s.id) else {
                        break;
                    };
                    after = last;
                    adopted += page.len();
                    self.install(ownership, shard, page);
                    delay = ADOPT_RETRY.0;
                }
                Err(e) => {
                    tracing::warn!(shard, error = %e, retry_in_ms = delay.as_millis() as u64, "cluster: reading a shard taken over failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(ADOPT_RETRY.1);
                }
            }
        }
        // Reads of the store see what was installed before calls come.
        let _ = self.shared.write_behind.local_barrier().await;
        if ownership.set_stage(shard, epoch, Stage::Serving) {
            crate::telemetry::metrics::cluster_handover("adopt", started.elapsed());
            tracing::debug!(
                shard,
                epoch,
                sessions = adopted,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "cluster: shard served here"
            );
        }
    }

    /// Puts one page of a shard's sessions in the store and starts the
    /// live ones (those overdue meanwhile end, expired, here); the ended
    /// ones are only stored, readable for the rest of their retention.
    fn install(
        &self,
        ownership: &Ownership,
        shard: u32,
        page: Vec<(Session, Vec<(u64, ToolExecution)>)>,
    ) {
        let now = self.shared.clock.now();
        let known: HashSet<Uuid> = self.tenants.keys().copied().collect();
        let mut restorer = tenant::Restorer::new(&self.shared);
        let mut ops = Vec::new();
        for (session, executions) in page {
            let Some(handle) = self.tenants.get(&session.tenant_id) else {
                continue;
            };
            if self
                .shared
                .directory(session.tenant_id)
                .contains_key(&*session.session_id)
            {
                // Running here already (created under this tenure).
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
            match classify(session, 0, &known, now, self.shared.idle_after_ms) {
                Found::Expired(session) => ops.extend(WriteOp::final_session(&session)),
                Found::Live(session, _) => {
                    restorer.restore(handle.limits.id, &handle.link, session)
                }
                Found::Final | Found::Orphan => {}
            }
        }
        self.shared.write_behind.submit(ops, false);
        restorer.finish();
    }

    /// Hands `shard` over: no new calls, the calls in flight finish, the
    /// sessions' coalesced writes are queued, everything queued commits to
    /// PostgreSQL (each step within `limit`), then its actors stop.
    async fn drain_shard(&self, ownership: &Ownership, shard: u32, epoch: u64, limit: Duration) {
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
            self.evict(sessions);
        }
    }

    /// Stops the actors of `sessions` without a write and takes them out
    /// of the store (a cache of the shards served here).
    pub(super) fn evict(&self, sessions: Vec<SessionKey>) {
        let mut ops = Vec::new();
        for (tenant, id) in sessions {
            let Some(directory) = self.shared.directories.get(&tenant) else {
                continue;
            };
            if let Some((_, addr)) = directory.remove(&*id) {
                addr.do_send(Evict);
            }
            match self.shared.store.session(tenant, &id) {
                Ok(Some(session)) => match purge_ops(&self.shared.store, &session) {
                    Ok(purge) => ops.extend(purge),
                    Err(e) => {
                        tracing::warn!(session_id = %id, error = %e, "cluster: a session handed over stays in the cache")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(session_id = %id, error = %e, "cluster: a session handed over stays in the cache")
                }
            }
        }
        if !ops.is_empty() {
            self.shared.write_behind.submit(ops, false);
        }
    }

    /// On a cluster node, a fresh session id of a shard this node serves,
    /// so a create without an id is not forwarded; `None` when it serves
    /// none.
    pub(super) fn id_served_here(&self, tenant: Uuid) -> Option<String> {
        let ownership = self.shared.ownership.as_ref()?;
        if ownership.serving() == 0 {
            return None;
        }
        // With this node serving k of n shards, a try succeeds with
        // probability k/n: 64 tries miss only if k/n is tiny.
        (0..64 * ownership.shards()).find_map(|_| {
            let id = crate::model::ids::generate_session_id();
            let shard = ownership.shard_of(tenant, &id);
            (ownership.tenure(shard).map(|t| t.stage) == Some(Stage::Serving)).then_some(id)
        })
    }

    /// On a cluster node, whether it serves `session_id`'s shard now.
    pub(super) fn serves(&self, tenant: Uuid, session_id: &str) -> bool {
        self.shared.ownership.as_ref().is_none_or(|o| {
            o.tenure(o.shard_of(tenant, session_id)).map(|t| t.stage) == Some(Stage::Serving)
        })
    }
}
