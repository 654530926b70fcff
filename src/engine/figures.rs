//! Live figures for `/readyz`, `/metrics`, the stats socket and the
//! dashboard.

use std::sync::atomic::Ordering;
use std::time::Duration;

use dashmap::DashMap;
use uuid::Uuid;

use super::handle::Engine;
use super::stats;
use crate::persist::checkpoint::CheckpointStats;
use crate::persist::outbox::{Outbox, OutboxStats};
use crate::persist::WriteBehindStats;

impl Engine {
    /// The write-behind queue's live figures.
    pub fn write_behind_stats(&self) -> &WriteBehindStats {
        self.shared.write_behind.stats()
    }

    /// The checkpointer's live figures.
    pub fn checkpoint_stats(&self) -> &CheckpointStats {
        &self.checkpoints
    }

    /// The outbox's live figures, when the PostgreSQL tier is on.
    pub fn outbox_stats(&self) -> Option<&OutboxStats> {
        self.outbox.as_deref().map(Outbox::stats)
    }

    /// Live sessions across tenants (directory entries).
    pub fn live_sessions(&self) -> usize {
        self.shared.directories.values().map(DashMap::len).sum()
    }

    /// Session actors restarted after a panic.
    pub fn restarts(&self) -> u64 {
        self.shared.restarts.load(Ordering::Relaxed)
    }

    /// Live sessions per configured tenant.
    pub fn live_by_tenant(&self) -> Vec<(Uuid, usize)> {
        self.shared
            .directories
            .iter()
            .map(|(tenant, directory)| (*tenant, directory.len()))
            .collect()
    }

    /// Each configured tenant's `max_active_sessions`.
    pub fn tenant_limits(&self) -> Vec<(Uuid, usize)> {
        self.tenants
            .values()
            .map(|t| (t.limits.id, t.limits.max_active_sessions))
            .collect()
    }

    /// Live session actors per shard.
    pub fn actors_per_shard(&self) -> Vec<i64> {
        self.shared.shards.actor_counts()
    }

    /// Per-shard figures: actors, calls in flight, calls per second, latency.
    pub fn shard_stats(&self) -> Vec<stats::ShardSnapshot> {
        self.shared.stats.shards(&self.actors_per_shard())
    }

    /// Idle sessions of `tenant`.
    pub fn idle_sessions(&self, tenant: Uuid) -> i64 {
        self.shared
            .idle
            .get(&tenant)
            .map_or(0, |n| n.load(Ordering::Relaxed).max(0))
    }

    /// Time since the engine started.
    pub fn uptime(&self) -> Duration {
        self.shared.stats.uptime()
    }

    /// The configured tenants: id and name.
    pub fn tenant_names(&self) -> Vec<(Uuid, String)> {
        self.tenants
            .values()
            .map(|t| (t.limits.id, t.limits.name.clone()))
            .collect()
    }

    /// Rotates the latency windows every [`stats::WINDOW`], forever.
    pub async fn rotate_stats_forever(self) {
        let mut ticker = tokio::time::interval(stats::WINDOW);
        loop {
            ticker.tick().await;
            self.shared.stats.rotate();
        }
    }
}
