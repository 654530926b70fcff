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
//! 4. hand over every shard whose desired owner is another live member, so
//!    it can take the shard at its next round instead of after a lease: the
//!    [`ShardOwner`] (the engine) first drains it (stops taking calls for
//!    it, lets what it acknowledged be committed) while this node keeps
//!    renewing it, and the round after the drain ends releases it;
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

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

/// What runs a node's shards: told when this node takes one, must hand
/// one over, or lost one.
pub trait ShardOwner: Send + Sync + 'static {
    /// This node took `shard` at `epoch` (the round that took it calls
    /// this before it ends).
    fn adopt(&self, shard: u32, epoch: u64);
    /// `shard` goes to another node: stop taking calls for it and resolve
    /// once everything acknowledged for it is committed. The lease is
    /// renewed meanwhile, and released at the first round after this
    /// resolves: a drain that never resolves keeps the shard here (still
    /// renewed and fenced), so it must be bounded. Called outside every
    /// lock of the member, so it may ask the member anything. The future is
    /// dropped, unfinished, if the shard is lost meanwhile.
    fn drain(&self, shard: u32, epoch: u64) -> BoxFuture<'static, ()>;
    /// `shard`, held at `epoch`, ran out on this node's clock without a
    /// hand-over (rounds failed for most of a lease): stop acting for it
    /// at once.
    fn lost(&self, shard: u32, epoch: u64);
}

/// A shard this node holds.
#[derive(Debug, Clone)]
struct Held {
    epoch: u64,
    /// Until when (on [`boot_clock`]) this node may act as the owner (see
    /// the module docs).
    valid_until: Duration,
    /// Set once its drain for a hand-over has ended (`None` while no
    /// hand-over started).
    drained: Option<Arc<AtomicBool>>,
    /// The task running that drain, aborted if the shard is lost first.
    drain_task: Option<tokio::task::AbortHandle>,
}

/// A shard and the epoch it is held at.
type Shard = (u32, u64);

/// How long a clean stop waits for its drains, in leases.
const LEAVE_DRAIN: f64 = 2.0;

/// Time since boot, suspended time included (`CLOCK_BOOTTIME`).
pub(super) fn boot_clock() -> Duration {
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
    /// Shards whose hand-over began (their drain started).
    pub draining: Vec<u32>,
    /// Shards handed to their desired owner (drained, then released).
    pub released: Vec<u32>,
    /// Shards that ran out on this node's clock (not renewed in time).
    pub lost: Vec<u32>,
}

/// The cluster as this node last read it: the nodes, and each shard's
/// owner while its lease runs. Calls for a shard held elsewhere go to its
/// owner's `advertise_url`.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Every node ever joined, by node id.
    pub nodes: Vec<registry::NodeRow>,
    /// Each shard's owner (index: shard), `None` while it has none.
    pub owners: Vec<Option<String>>,
}

impl View {
    /// Where `shard`'s owner is reached: (node id, advertise URL).
    pub fn owner_of(&self, shard: u32) -> Option<(&str, &str)> {
        let owner = self.owners.get(shard as usize)?.as_deref()?;
        let node = self.nodes.iter().find(|n| n.node_id == owner)?;
        Some((owner, node.advertise_url.as_str()))
    }

    /// How many shards each node owns.
    pub fn shards_of(&self, node_id: &str) -> usize {
        self.owners
            .iter()
            .filter(|o| o.as_deref() == Some(node_id))
            .count()
    }
}

/// This node in the cluster.
pub struct Member {
    config: MemberConfig,
    pool: PgPool,
    owner: Arc<dyn ShardOwner>,
    held: Mutex<BTreeMap<u32, Held>>,
    /// The shards held (with their epochs) after each round.
    owned: watch::Sender<BTreeMap<u32, u64>>,
    /// One round (or the leave) at a time.
    turn: tokio::sync::Mutex<()>,
    /// The cluster as last read.
    view: std::sync::RwLock<Arc<View>>,
    /// When the view was last read (throttles [`Member::refresh_view`]).
    viewed_at: Mutex<Option<std::time::Instant>>,
}

impl Member {
    /// Joins the cluster in `pool`'s database (migrated): creates the
    /// cluster on first use, refuses another shard count, marks this node
    /// alive. Holds no shard until its first [`Member::round`]; `owner`
    /// hears of every shard taken, handed over or lost.
    pub async fn join(
        pool: PgPool,
        config: MemberConfig,
        owner: Arc<dyn ShardOwner>,
    ) -> Result<Self, RegistryError> {
        registry::join(&pool, &config.node_id, &config.advertise_url, config.shards).await?;
        Ok(Member {
            config,
            pool,
            owner,
            held: Mutex::new(BTreeMap::new()),
            owned: watch::channel(BTreeMap::new()).0,
            turn: tokio::sync::Mutex::new(()),
            view: std::sync::RwLock::new(Arc::new(View::default())),
            viewed_at: Mutex::new(None),
        })
    }

    /// The cluster as last read (by a round or [`Member::refresh_view`]).
    pub fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The configured lease.
    pub fn lease(&self) -> Duration {
        self.config.lease
    }

    fn set_view(&self, nodes: Vec<registry::NodeRow>, rows: &[registry::ShardRow]) {
        let mut owners = vec![None; self.config.shards as usize];
        for row in rows {
            if let Some(slot) = owners.get_mut(row.shard as usize) {
                *slot = row.owner.clone().filter(|_| row.leased);
            }
        }
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(View { nodes, owners });
        *self.viewed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
    }

    /// Reads the view again unless it is younger than `min_age` (a call
    /// waiting for a shard's new owner asks for it; many waiting calls
    /// cost one read per `min_age`).
    pub async fn refresh_view(&self, min_age: Duration) -> Result<(), RegistryError> {
        {
            let mut at = self.viewed_at.lock().unwrap_or_else(|e| e.into_inner());
            if at.is_some_and(|at| at.elapsed() < min_age) {
                return Ok(());
            }
            // Claimed now, so concurrent callers do not read it too.
            *at = Some(std::time::Instant::now());
        }
        let nodes = registry::nodes(&self.pool, self.config.lease).await?;
        let rows = registry::shards(&self.pool).await?;
        self.set_view(nodes, &rows);
        Ok(())
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

    /// The shards being handed over: held, drain started, not released.
    pub fn handing_over(&self) -> Vec<u32> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.iter()
            .filter(|(_, h)| h.drained.is_some())
            .map(|(shard, _)| *shard)
            .collect()
    }

    /// Follows the shards held, updated after every round.
    pub fn watch(&self) -> watch::Receiver<BTreeMap<u32, u64>> {
        self.owned.subscribe()
    }

    fn valid_until(&self, sent: Duration) -> Duration {
        sent + self.config.lease.mul_f64(0.9)
    }

    /// Takes the shards that ran out on this node's clock out of the map
    /// (aborting their drains); answers those still held and those taken
    /// out, each with its epoch.
    fn drop_lapsed(&self) -> (Vec<Shard>, Vec<Shard>) {
        let now = boot_clock();
        let mut lapsed = Vec::new();
        let mut map = self.held.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|shard, h| {
            let valid = h.valid_until > now;
            if !valid {
                lapsed.push((*shard, h.epoch));
                if let Some(task) = &h.drain_task {
                    task.abort();
                }
            }
            valid
        });
        let held = map.iter().map(|(s, h)| (*s, h.epoch)).collect();
        (held, lapsed)
    }

    /// Renews the leases of `held` (shard, epoch); answers whether the
    /// statement went through.
    async fn renew(&self, held: &[(u32, u64)]) -> Result<(), RegistryError> {
        if held.is_empty() {
            return Ok(());
        }
        let sent = boot_clock();
        let renewed: HashSet<u32> =
            registry::renew(&self.pool, &self.config.node_id, held, self.config.lease)
                .await?
                .into_iter()
                .collect();
        let mut map = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for shard in &renewed {
            if let Some(h) = map.get_mut(shard) {
                h.valid_until = self.valid_until(sent);
            }
        }
        Ok(())
    }

    /// One round (see the module docs).
    pub async fn round(&self) -> Result<Round, RegistryError> {
        let _turn = self.turn.lock().await;
        let lease = self.config.lease;
        let me = self.config.node_id.as_str();
        let mut round = Round::default();

        // What ran out on this node's clock is lost, before anything
        // waits for PostgreSQL. Then renew what is still held. A renewal
        // that does not go through (its row locked by a write) leaves the
        // shard held until it runs out, as it cannot change hands before.
        let (held, lapsed) = self.drop_lapsed();
        round.lost = lapsed.iter().map(|(shard, _)| *shard).collect();
        for (shard, epoch) in lapsed {
            self.owner.lost(shard, epoch);
        }
        let nodes = registry::nodes(&self.pool, lease).await?;
        round.members = nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.node_id.clone())
            .collect();
        self.renew(&held).await?;

        // Take and hand over.
        let mut rows = registry::shards(&self.pool).await?;
        let mut wanted = Vec::new();
        let mut handover = Vec::new();
        let mut drains = Vec::new();
        {
            let mut map = self.held.lock().unwrap_or_else(|e| e.into_inner());
            for row in &rows {
                let desired = placement::desired_owner(row.shard, &round.members);
                let free = row.owner.is_none() || !row.leased;
                let mine_unknown = row.owner.as_deref() == Some(me);
                if let Some(h) = map.get_mut(&row.shard) {
                    match &h.drained {
                        // Drained: hand it over now.
                        Some(done) if done.load(Ordering::Acquire) => {
                            handover.push((row.shard, h.epoch));
                        }
                        // Draining: keep it (renewed) until the drain ends.
                        Some(_) => {}
                        None if desired.is_some_and(|d| d != me) => {
                            // Started below, outside the lock.
                            let done = Arc::new(AtomicBool::new(false));
                            h.drained = Some(done.clone());
                            drains.push((row.shard, h.epoch, done));
                            round.draining.push(row.shard);
                        }
                        None => {}
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
        for (shard, epoch, done) in drains {
            let drain = self.owner.drain(shard, epoch);
            let task = tokio::spawn(async move {
                drain.await;
                done.store(true, Ordering::Release);
            });
            let mut map = self.held.lock().unwrap_or_else(|e| e.into_inner());
            match map.get_mut(&shard) {
                Some(h) if h.epoch == epoch => h.drain_task = Some(task.abort_handle()),
                _ => task.abort(),
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
                        drained: None,
                        drain_task: None,
                    },
                );
            }
            drop(map);
            for (shard, epoch) in &round.acquired {
                self.owner.adopt(*shard, *epoch);
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
        // The shards as read, with what this round changed (as the others
        // will see it): the view the router forwards by.
        for row in &mut rows {
            if round.acquired.iter().any(|(shard, _)| *shard == row.shard) {
                row.owner = Some(me.to_owned());
                row.leased = true;
            } else if round.released.contains(&row.shard) {
                row.owner = None;
            }
        }
        self.set_view(nodes, &rows);
        Ok(round)
    }

    /// Runs rounds a quarter of a lease apart until `stop` turns true, then
    /// leaves (drains and releases every shard, marks this node gone). A round that
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
            // A round that hangs (PostgreSQL frozen, a connection dead
            // without a reset) counts as failed after a lease, so the
            // shards that ran out meanwhile are given up (calls stopped at
            // once anyway: the router asks `holds`, on this node's clock).
            let round = match tokio::time::timeout(self.config.lease, self.round()).await {
                Ok(round) => round,
                Err(_) => Err(RegistryError::Timeout),
            };
            match round {
                Ok(round) => {
                    if !round.acquired.is_empty()
                        || !round.draining.is_empty()
                        || !round.released.is_empty()
                        || !round.lost.is_empty()
                    {
                        tracing::info!(
                            node = %self.config.node_id,
                            members = round.members.len(),
                            acquired = round.acquired.len(),
                            draining = round.draining.len(),
                            released = round.released.len(),
                            lost = round.lost.len(),
                            "cluster shards changed"
                        );
                    }
                }
                Err(e) => {
                    // Cut off from PostgreSQL: what runs out meanwhile is
                    // given up now, not at the next round that gets through.
                    let (_, lapsed) = self.drop_lapsed();
                    for (shard, epoch) in lapsed {
                        self.owner.lost(shard, epoch);
                    }
                    self.owned.send_replace(self.held());
                    tracing::warn!(node = %self.config.node_id, error = %e, "cluster round failed");
                }
            }
        }
        if let Err(e) = self.leave().await {
            tracing::warn!(node = %self.config.node_id, error = %e, "leaving the cluster failed");
        }
    }

    /// Drains every shard held, renewing their leases meanwhile (a
    /// quarter lease apart) for at most [`LEAVE_DRAIN`] leases, then
    /// releases them all and marks this node gone, so the others take its
    /// shards at their next round instead of after a lease. A shard whose
    /// drain did not end in time is released all the same (what was still
    /// queued for it is fenced off); one that already ran out on this
    /// node's clock is reported lost, not drained.
    pub async fn leave(&self) -> Result<(), RegistryError> {
        let _turn = self.turn.lock().await;
        let (_, lapsed) = self.drop_lapsed();
        for (shard, epoch) in lapsed {
            self.owner.lost(shard, epoch);
        }
        let pending: Vec<(u32, u64, Option<Arc<AtomicBool>>)> = {
            let map = self.held.lock().unwrap_or_else(|e| e.into_inner());
            map.iter()
                .map(|(s, h)| (*s, h.epoch, h.drained.clone()))
                .collect()
        };
        let drains = pending.iter().map(|(shard, epoch, drained)| {
            let (shard, epoch, drained) = (*shard, *epoch, drained.clone());
            let owner = self.owner.clone();
            async move {
                match drained {
                    // A hand-over's drain already runs: wait for its end.
                    Some(done) => {
                        while !done.load(Ordering::Acquire) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    None => owner.drain(shard, epoch).await,
                }
            }
        });
        let all = futures::future::join_all(drains);
        tokio::pin!(all);
        let deadline = tokio::time::Instant::now() + self.config.lease.mul_f64(LEAVE_DRAIN);
        let mut tick = tokio::time::interval(self.config.lease / 4);
        tick.tick().await;
        let drained = loop {
            tokio::select! {
                _ = &mut all => break true,
                _ = tokio::time::sleep_until(deadline) => break false,
                _ = tick.tick() => {
                    // Keep the leases while the drains commit: a lease
                    // that ran out would fence their writes off.
                    let (held, lapsed) = self.drop_lapsed();
                    for (shard, epoch) in lapsed {
                        self.owner.lost(shard, epoch);
                    }
                    if let Err(e) = self.renew(&held).await {
                        tracing::warn!(node = %self.config.node_id, error = %e, "renewing leases while leaving failed");
                    }
                }
            }
        };
        if !drained {
            tracing::warn!(
                node = %self.config.node_id,
                "leaving the cluster: some shards did not drain in time; released anyway"
            );
        }
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
