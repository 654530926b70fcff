//! This node's part in the cluster: its heartbeat, the shards it holds,
//! and the round that keeps both current.
//!
//! Every round (a quarter of a lease apart, see [`Member::run`]):
//! 1. heartbeat;
//! 2. read the members (alive: a heartbeat younger than a lease) and the
//!    shard rows;
//! 3. renew the leases held; a shard whose renewal fails, or whose lease
//!    ran out on this node's own clock first, is lost at once;
//! 4. take every free or expired shard this node is the desired owner of
//!    ([`placement::desired_owner`]), and any shard that stayed free for a
//!    whole lease (its desired owner is not taking it), so while one node
//!    lives every shard gets an owner;
//! 5. release every shard whose desired owner is another live member, so
//!    it can take the shard at its next round instead of after a lease.
//!
//! **When a shard counts as held.** A lease runs on PostgreSQL's clock from
//! when the statement ran, which is after this node sent it. So this node
//! counts a shard as its own until the send time plus nine tenths of the
//! lease on its own monotonic clock: before PostgreSQL's lease can have
//! run out, with a tenth of a lease to spare for the two clocks' rates.
//! [`Member::holds`] answers from that, with no round trip; every write
//! for the shard is also fenced in PostgreSQL ([`registry::fence`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::watch;

use super::placement;
use super::registry::{self, RegistryError};

/// What a node needs to take part.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    /// This node's unique id.
    pub node_id: String,
    /// How the other nodes reach this one.
    pub advertise_url: String,
    /// The cluster's fixed shard count.
    pub shards: u32,
    /// How long a lease (and a heartbeat) counts.
    pub lease: Duration,
}

/// A shard this node holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: u64,
    /// Until when this node may act as the owner (see the module docs).
    valid_until: Instant,
}

/// What one round changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Round {
    /// Live members, this node included.
    pub members: Vec<String>,
    /// Shards taken, with their new epochs.
    pub acquired: Vec<(u32, u64)>,
    /// Shards handed to their desired owner.
    pub released: Vec<u32>,
    /// Shards whose lease could not be renewed.
    pub lost: Vec<u32>,
}

/// This node in the cluster.
pub struct Member {
    config: MemberConfig,
    pool: PgPool,
    held: Mutex<BTreeMap<u32, Held>>,
    /// The shards held (with their epochs) after each round.
    owned: watch::Sender<BTreeMap<u32, u64>>,
}

impl Member {
    /// Joins the cluster in `pool`'s database (migrated): creates the
    /// cluster on first use, refuses another shard count, marks this node
    /// alive. Holds no shard until its first [`Member::round`].
    pub async fn join(pool: PgPool, config: MemberConfig) -> Result<Self, RegistryError> {
        registry::join(&pool, &config.node_id, &config.advertise_url, config.shards).await?;
        Ok(Member {
            config,
            pool,
            held: Mutex::new(BTreeMap::new()),
            owned: watch::channel(BTreeMap::new()).0,
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    /// The epoch at which this node holds `shard`, if it does.
    pub fn holds(&self, shard: u32) -> Option<u64> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(&shard)
            .filter(|h| h.valid_until > Instant::now())
            .map(|h| h.epoch)
    }

    /// The shards held, with their epochs.
    pub fn held(&self) -> BTreeMap<u32, u64> {
        let now = Instant::now();
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.iter()
            .filter(|(_, h)| h.valid_until > now)
            .map(|(shard, h)| (*shard, h.epoch))
            .collect()
    }

    /// Follows the shards held, updated after every round.
    pub fn watch(&self) -> watch::Receiver<BTreeMap<u32, u64>> {
        self.owned.subscribe()
    }

    fn valid_until(&self, sent: Instant) -> Instant {
        sent + self.config.lease.mul_f64(0.9)
    }

    /// One round (see the module docs).
    pub async fn round(&self) -> Result<Round, RegistryError> {
        let lease = self.config.lease;
        let me = self.config.node_id.as_str();
        let mut round = Round::default();

        registry::heartbeat(&self.pool, me).await?;
        let nodes = registry::nodes(&self.pool, lease).await?;
        round.members = nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.node_id.clone())
            .collect();

        // Renew what is still held; what ran out here first is lost.
        let now = Instant::now();
        let held: Vec<(u32, u64)> = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            held.retain(|shard, h| {
                let valid = h.valid_until > now;
                if !valid {
                    round.lost.push(*shard);
                }
                valid
            });
            held.iter().map(|(s, h)| (*s, h.epoch)).collect()
        };
        if !held.is_empty() {
            let sent = Instant::now();
            let renewed: HashSet<u32> = registry::renew(&self.pool, me, &held, lease)
                .await?
                .into_iter()
                .collect();
            let mut map = self.held.lock().unwrap_or_else(|e| e.into_inner());
            for (shard, _) in &held {
                if renewed.contains(shard) {
                    if let Some(h) = map.get_mut(shard) {
                        h.valid_until = self.valid_until(sent);
                    }
                } else if map.remove(shard).is_some() {
                    round.lost.push(*shard);
                }
            }
        }

        // Take and hand over.
        let rows = registry::shards(&self.pool).await?;
        let mut wanted = Vec::new();
        let mut handover = Vec::new();
        {
            let map = self.held.lock().unwrap_or_else(|e| e.into_inner());
            for row in &rows {
                let desired = placement::desired_owner(row.shard, &round.members);
                let free = row.owner.is_none() || !row.leased;
                if let Some(h) = map.get(&row.shard) {
                    if desired.is_some_and(|d| d != me) {
                        handover.push((row.shard, h.epoch));
                    }
                } else if free && (desired == Some(me) || row.expired_for >= lease) {
                    wanted.push(row.shard);
                }
            }
        }
        if !wanted.is_empty() {
            let sent = Instant::now();
            round.acquired = registry::acquire(&self.pool, me, &wanted, lease).await?;
            let mut map = self.held.lock().unwrap_or_else(|e| e.into_inner());
            for (shard, epoch) in &round.acquired {
                map.insert(
                    *shard,
                    Held {
                        epoch: *epoch,
                        valid_until: self.valid_until(sent),
                    },
                );
            }
        }
        if !handover.is_empty() {
            // Out of the map first: from here on this node no longer acts
            // as the owner, whatever the release answers.
            {
                let mut map = self.held.lock().unwrap_or_else(|e| e.into_inner());
                for (shard, _) in &handover {
                    map.remove(shard);
                }
            }
            round.released = registry::release(&self.pool, me, &handover).await?;
        }
        self.owned.send_replace(self.held());
        Ok(round)
    }

    /// Runs rounds a quarter of a lease apart until `stop` turns true, then
    /// leaves (releases every shard and marks this node gone). A round that
    /// fails (PostgreSQL unreachable) is logged and retried at the next
    /// tick; meanwhile the shards held run out on this node's clock, so it
    /// stops acting as their owner before their leases end.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.config.lease / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|stopped| *stopped) => break,
            }
            match self.round().await {
                Ok(round) => {
                    if !round.acquired.is_empty()
                        || !round.released.is_empty()
                        || !round.lost.is_empty()
                    {
                        tracing::info!(
                            node = %self.config.node_id,
                            members = round.members.len(),
                            acquired = round.acquired.len(),
                            released = round.released.len(),
                            lost = round.lost.len(),
                            "cluster shards changed"
                        );
                    }
                }
                Err(e) => {
                    self.owned.send_replace(self.held());
                    tracing::warn!(node = %self.config.node_id, error = %e, "cluster round failed");
                }
            }
        }
        if let Err(e) = self.leave().await {
            tracing::warn!(node = %self.config.node_id, error = %e, "leaving the cluster failed");
        }
    }

    /// Releases every shard held and marks this node gone, so the others
    /// take its shards at their next round instead of after a lease.
    pub async fn leave(&self) -> Result<(), RegistryError> {
        let held: Vec<(u32, u64)> = {
            let mut map = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let held = map.iter().map(|(s, h)| (*s, h.epoch)).collect();
            map.clear();
            held
        };
        self.owned.send_replace(BTreeMap::new());
        registry::leave(&self.pool, &self.config.node_id).await?;
        if !held.is_empty() {
            registry::release(&self.pool, &self.config.node_id, &held).await?;
        }
        Ok(())
    }
}
