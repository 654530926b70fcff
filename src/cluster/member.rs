//! This node's part in the cluster: its heartbeat, the shards it holds,
//! and the round that keeps both current.
//!
//! Every round (a quarter of a lease apart, see [`Member::run`]):
//! 1. read the members (alive: a heartbeat younger than a lease) and the
//!    shard rows;
//! 2. renew the leases held; a shard whose lease ran out on this node's
//!    own clock is lost (one whose renewal did not go through this round
//!    stays held until then: it cannot have changed hands before);
//! 3. take every free or expired shard this node is the desired owner of
//!    ([`placement::desired_owner`]), any shard that stayed free for a
//!    whole lease (its desired owner is not taking it), and any shard the
//!    table gives this node that it does not know it holds (a lost reply,
//!    a restart): so while one node lives every shard gets an owner;
//! 4. release every shard whose desired owner is another live member, so
//!    it can take the shard at its next round instead of after a lease;
//! 5. heartbeat. The heartbeat comes last, so a node whose rounds fail
//!    (it reaches PostgreSQL but cannot take or renew) stops counting as a
//!    member after a lease, and no shard is handed to it.
//!
//! **When a shard counts as held.** A lease runs on PostgreSQL's clock from
//! when the statement ran, which is after this node sent it. So this node
//! counts a shard as its own until the send time plus nine tenths of the
//! lease on its own clock: before PostgreSQL's lease can have run out,
//! with a tenth of a lease to spare for the two clocks' rates. That clock
//! is `CLOCK_BOOTTIME`, which keeps counting while the machine is
//! suspended (a paused VM, a laptop asleep), unlike the monotonic clock
//! behind `Instant`: a node woken after its lease finds its shards gone.
//! [`Member::holds`] answers from that, with no round trip; every write
//! for the shard is also fenced in PostgreSQL ([`registry::fence`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

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
    /// Until when (on [`boot_clock`]) this node may act as the owner (see
    /// the module docs).
    valid_until: Duration,
}

/// Time since boot, suspended time included (`CLOCK_BOOTTIME`).
fn boot_clock() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `now` is.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    assert_eq!(
        status, 0,
        "CLOCK_BOOTTIME is available on every Linux since 2.6.39"
    );
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
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
    /// One round (or the leave) at a time.
    turn: tokio::sync::Mutex<()>,
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
            turn: tokio::sync::Mutex::new(()),
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
            .filter(|h| h.valid_until > boot_clock())
            .map(|h| h.epoch)
    }

    /// The shards held, with their epochs.
    pub fn held(&self) -> BTreeMap<u32, u64> {
        let now = boot_clock();
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

    fn valid_until(&self, sent: Duration) -> Duration {
        sent + self.config.lease.mul_f64(0.9)
    }

    /// One round (see the module docs).
    pub async fn round(&self) -> Result<Round, RegistryError> {
        let _turn = self.turn.lock().await;
        let lease = self.config.lease;
        let me = self.config.node_id.as_str();
        let mut round = Round::default();

        let nodes = registry::nodes(&self.pool, lease).await?;
        round.members = nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.node_id.clone())
            .collect();

        // Renew what is still held; what ran out here is lost. A renewal
        // that does not go through (its row locked by a write) leaves the
        // shard held until it runs out, as it cannot change hands before.
        let now = boot_clock();
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
            let sent = boot_clock();
            let renewed: HashSet<u32> = registry::renew(&self.pool, me, &held, lease)
                .await?
                .into_iter()
                .collect();
            let mut map = self.held.lock().unwrap_or_else(|e| e.into_inner());
            for shard in &renewed {
                if let Some(h) = map.get_mut(shard) {
                    h.valid_until = self.valid_until(sent);
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
                let mine_unknown = row.owner.as_deref() == Some(me);
                if let Some(h) = map.get(&row.shard) {
                    if desired.is_some_and(|d| d != me) {
                        handover.push((row.shard, h.epoch));
                    }
                } else if mine_unknown && desired.is_some_and(|d| d != me) {
                    // Not ours to keep: give it to its owner at once.
                    handover.push((row.shard, row.epoch));
                } else if mine_unknown
                    || (free && (desired == Some(me) || row.expired_for >= lease))
                {
                    wanted.push(row.shard);
                }
            }
        }
        if !wanted.is_empty() {
            let sent = boot_clock();
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
        registry::heartbeat(&self.pool, me).await?;
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
        let _turn = self.turn.lock().await;
        let held: Vec<(u32, u64)> = {
            let mut map = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let held = map.iter().map(|(s, h)| (*s, h.epoch)).collect();
            map.clear();
            held
        };
        self.owned.send_replace(BTreeMap::new());
        registry::leave(&self.pool, &self.config.node_id, &held).await
    }
}
