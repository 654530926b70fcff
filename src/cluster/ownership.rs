//! What this node serves, as the engine, the shipper and the HTTP router
//! see it: each shard's tenure here (the epoch it holds the shard at, the
//! first log record written under that epoch, and whether it serves calls
//! yet), the sessions of each shard, and the calls in flight per shard.
//!
//! The [`super::member::Member`] decides who owns a shard; the engine's
//! [`super::member::ShardOwner`] turns those decisions into tenures here.
//! The shipper reads them to fence every batch: an outbox entry counts
//! only if its shard is in tenure here and it was logged after the tenure
//! began (see [`Ownership::sort`]). An entry logged under an earlier
//! tenure (the node lost the shard, then won it back) is never shipped:
//! another node may have written the shard in between.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dashmap::DashMap;
use uuid::Uuid;

use super::placement::shard_of;

/// Where a shard held here stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Taken; its sessions are being rebuilt from PostgreSQL. Calls wait.
    Adopting,
    /// Its sessions run here; calls are served.
    Serving,
    /// Being handed over; calls wait, then go to the next owner.
    Draining,
}

/// A shard's tenure on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tenure {
    /// The epoch the shard is held at.
    pub epoch: u64,
    /// The first log record that may carry a change made under it.
    pub from_record: u64,
    /// Where it stands.
    pub stage: Stage,
}

/// Stands for every shard in a stale pair whose session is unknown here.
pub const ANY_SHARD: u32 = u32::MAX;

/// A session of a shard, as its registry entry.
pub type SessionKey = (Uuid, Arc<str>);

/// See the module docs.
#[derive(Debug)]
pub struct Ownership {
    node_id: String,
    shards: u32,
    tenures: RwLock<HashMap<u32, Tenure>>,
    /// The shard of each session row this node runs or ran (executions and
    /// audit rows carry only their session's row id).
    rows: DashMap<Uuid, u32>,
    /// The sessions of each shard by row id, to find a shard's actors.
    sessions: Vec<Mutex<HashMap<Uuid, SessionKey>>>,
    /// Calls being served per shard; a drain waits for them.
    in_flight: Vec<AtomicUsize>,
}

/// What [`Ownership::sort`] made of a batch.
#[derive(Debug)]
pub struct Sorted<T> {
    /// Entries to ship: (record, shard, epoch the shard is held at, entry).
    pub kept: Vec<(u64, u32, u64, T)>,
    /// (log record, shard) of the entries that must not be shipped; the
    /// shard is [`ANY_SHARD`] when the entry's session is unknown here.
    pub stale: Vec<(u64, u32)>,
    /// How many entries were left out.
    pub dropped: usize,
}

impl Ownership {
    /// No shard held yet.
    pub fn new(node_id: String, shards: u32) -> Self {
        Ownership {
            node_id,
            shards,
            tenures: RwLock::new(HashMap::new()),
            rows: DashMap::new(),
            sessions: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            in_flight: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The cluster's shard count.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The shard of a session.
    pub fn shard_of(&self, tenant: Uuid, session_id: &str) -> u32 {
        shard_of(tenant, session_id, self.shards)
    }

    /// The tenure of `shard` here, if any.
    pub fn tenure(&self, shard: u32) -> Option<Tenure> {
        self.read().get(&shard).copied()
    }

    /// Where the tenure of `shard` here stands, if it is held.
    pub fn stage(&self, shard: u32) -> Option<Stage> {
        self.tenure(shard).map(|t| t.stage)
    }

    /// A fresh session id for a create that names none: of a shard this
    /// node serves when it serves any (so the create is not forwarded),
    /// else of any shard.
    pub fn pick_session_id(&self, tenant: Uuid) -> String {
        let mut id = crate::model::ids::generate_session_id();
        if self.serving() == 0 {
            return id;
        }
        // With k of n shards served here a try succeeds with probability
        // k/n.
        for _ in 0..4 * self.shards {
            if self.stage(self.shard_of(tenant, &id)) == Some(Stage::Serving) {
                break;
            }
            id = crate::model::ids::generate_session_id();
        }
        id
    }

    /// Shards held here, with their tenures.
    pub fn tenures(&self) -> Vec<(u32, Tenure)> {
        let mut all: Vec<_> = self.read().iter().map(|(s, t)| (*s, *t)).collect();
        all.sort_unstable_by_key(|(s, _)| *s);
        all
    }

    /// How many shards this node serves.
    pub fn serving(&self) -> usize {
        self.read()
            .values()
            .filter(|t| t.stage == Stage::Serving)
            .count()
    }

    /// A tenure begins (adopting). Nothing logged for the shard ships
    /// until [`Ownership::ship_from`] says from where.
    pub fn begin(&self, shard: u32, epoch: u64) {
        self.write().insert(
            shard,
            Tenure {
                epoch,
                from_record: u64::MAX,
                stage: Stage::Adopting,
            },
        );
    }

    /// Changes of `shard` logged from record `from` on ship under the
    /// tenure at `epoch`; false if the shard is no longer held at it.
    pub fn ship_from(&self, shard: u32, epoch: u64, from: u64) -> bool {
        match self.write().get_mut(&shard) {
            Some(t) if t.epoch == epoch => {
                t.from_record = from;
                true
            }
            _ => false,
        }
    }

    /// Runs `f` while `shard` is held (at `epoch`, when given) and serves or
    /// drains calls (when `calls`): the tenure cannot end meanwhile, so what
    /// `f` starts for the shard is stopped by the tenure's end. `None`, and
    /// `f` not run, when it is not held so. `f` must not ask this
    /// ownership for tenures (the lock is held).
    pub fn while_held<R>(
        &self,
        shard: u32,
        epoch: Option<u64>,
        calls: bool,
        f: impl FnOnce() -> R,
    ) -> Option<R> {
        let tenures = self.read();
        let tenure = tenures.get(&shard)?;
        if epoch.is_some_and(|e| e != tenure.epoch) || (calls && tenure.stage == Stage::Adopting) {
            return None;
        }
        let result = f();
        drop(tenures);
        Some(result)
    }

    /// A taken-over shard at `epoch` starts serving, unless it is no longer
    /// held at that epoch or a drain began meanwhile (which it must not
    /// undo); answers whether it did.
    pub fn start_serving(&self, shard: u32, epoch: u64) -> bool {
        match self.write().get_mut(&shard) {
            Some(t) if t.epoch == epoch && t.stage == Stage::Adopting => {
                t.stage = Stage::Serving;
                true
            }
            _ => false,
        }
    }

    /// Moves the tenure of `shard` at `epoch` to `stage`; false if the
    /// shard is no longer held at that epoch.
    pub fn set_stage(&self, shard: u32, epoch: u64, stage: Stage) -> bool {
        match self.write().get_mut(&shard) {
            Some(t) if t.epoch == epoch => {
                t.stage = stage;
                true
            }
            _ => false,
        }
    }

    /// The tenure of `shard` at `epoch` ends; answers its sessions (their
    /// registry entries are removed), or `None` when it was not held at
    /// that epoch.
    pub fn end(&self, shard: u32, epoch: u64) -> Option<Vec<SessionKey>> {
        {
            let mut tenures = self.write();
            match tenures.get(&shard) {
                Some(t) if t.epoch == epoch => {
                    tenures.remove(&shard);
                }
                _ => return None,
            }
        }
        let sessions: Vec<(Uuid, SessionKey)> = self.lock_sessions(shard).drain().collect();
        for (row, _) in &sessions {
            self.rows.remove(row);
        }
        Some(sessions.into_iter().map(|(_, key)| key).collect())
    }

    /// A session of `shard` runs here (created or adopted).
    pub fn register(&self, row: Uuid, tenant: Uuid, session_id: Arc<str>, shard: u32) {
        self.rows.insert(row, shard);
        self.lock_sessions(shard).insert(row, (tenant, session_id));
    }

    /// A session row purged here (ended, past its retention) is no longer
    /// registered.
    pub fn forget(&self, row: Uuid) {
        if let Some((_, shard)) = self.rows.remove(&row) {
            self.lock_sessions(shard).remove(&row);
        }
    }

    /// The shard of a session row registered here.
    pub fn shard_of_row(&self, row: Uuid) -> Option<u32> {
        self.rows.get(&row).map(|s| *s)
    }

    /// The sessions of `shard` registered here.
    pub fn sessions_of(&self, shard: u32) -> Vec<SessionKey> {
        self.lock_sessions(shard).values().cloned().collect()
    }

    /// Counts a call for `shard` until the guard drops.
    pub fn call(self: &Arc<Self>, shard: u32) -> CallGuard {
        self.in_flight[shard as usize].fetch_add(1, Ordering::AcqRel);
        CallGuard {
            ownership: self.clone(),
            shard,
        }
    }

    /// Calls for `shard` in flight.
    pub fn calls_in_flight(&self, shard: u32) -> usize {
        self.in_flight[shard as usize].load(Ordering::Acquire)
    }

    /// Splits outbox entries logged in records `(record, entry)` into those
    /// this node may ship (with the fence they need) and those it must not:
    /// an entry whose shard is not in tenure here, or was logged before its
    /// tenure began, or whose session row is unknown here. `key` gives an
    /// entry's session: (tenant, id) for a session row, the row id for the
    /// others.
    pub fn sort<T>(&self, entries: Vec<(u64, T)>, key: impl Fn(&T) -> EntryKey<'_>) -> Sorted<T> {
        let tenures = self.read();
        let mut sorted = Sorted {
            kept: Vec::with_capacity(entries.len()),
            stale: Vec::new(),
            dropped: 0,
        };
        for (record, entry) in entries {
            let shard = match key(&entry) {
                EntryKey::Session(tenant, id) => Some(self.shard_of(tenant, id)),
                EntryKey::Row(row) => self.rows.get(&row).map(|s| *s),
            };
            let tenure = shard.and_then(|s| tenures.get(&s).map(|t| (s, t)));
            match tenure {
                Some((shard, t)) if record >= t.from_record => {
                    sorted.kept.push((record, shard, t.epoch, entry));
                }
                _ => {
                    sorted.dropped += 1;
                    let pair = (record, shard.unwrap_or(ANY_SHARD));
                    if !sorted.stale.contains(&pair) {
                        sorted.stale.push(pair);
                    }
                }
            }
        }
        sorted
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u32, Tenure>> {
        // Plain inserts and removes: a panic cannot leave the map torn.
        self.tenures.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u32, Tenure>> {
        self.tenures.write().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_sessions(&self, shard: u32) -> std::sync::MutexGuard<'_, HashMap<Uuid, SessionKey>> {
        self.sessions[shard as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// How [`Ownership::sort`] finds an entry's shard.
pub enum EntryKey<'a> {
    /// A session row: its tenant and id.
    Session(Uuid, &'a str),
    /// An execution or audit row: its session's row id.
    Row(Uuid),
}

/// A call counted for its shard (see [`Ownership::call`]).
pub struct CallGuard {
    ownership: Arc<Ownership>,
    shard: u32,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.ownership.in_flight[self.shard as usize].fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_entries_of_a_current_tenure_are_shipped() {
        let o = Ownership::new("a".into(), 8);
        let tenant = Uuid::from_u128(7);
        let id = "ses_x";
        let shard = o.shard_of(tenant, id);
        let row = Uuid::from_u128(99);
        o.begin(shard, 4);
        assert!(o.ship_from(shard, 4, 10));
        o.register(row, tenant, id.into(), shard);
        let entries = vec![
            (9, EntryKey2::S),  // logged before the tenure began
            (10, EntryKey2::S), // in it
            (11, EntryKey2::R(row)),
            (12, EntryKey2::R(Uuid::from_u128(5))), // unknown row
        ];
        let sorted = o.sort(entries, |e| match e {
            EntryKey2::S => EntryKey::Session(tenant, id),
            EntryKey2::R(row) => EntryKey::Row(*row),
        });
        let kept: Vec<(u64, u32, u64)> = sorted.kept.iter().map(|k| (k.0, k.1, k.2)).collect();
        assert_eq!(kept, vec![(10, shard, 4), (11, shard, 4)]);
        assert_eq!(sorted.stale, vec![(9, shard), (12, ANY_SHARD)]);
        assert_eq!(sorted.dropped, 2);
        // The tenure ends: nothing of the shard ships, its rows are gone.
        assert_eq!(o.end(shard, 3), None, "another epoch ends nothing");
        assert_eq!(o.end(shard, 4).unwrap().len(), 1);
        o.begin(shard, 5);
        o.register(row, tenant, id.into(), shard);
        o.forget(row);
        assert!(o.sessions_of(shard).is_empty(), "a purged row is forgotten");
        let sorted = o.sort(vec![(13, EntryKey2::R(row))], |e| match e {
            EntryKey2::S => EntryKey::Session(tenant, id),
            EntryKey2::R(row) => EntryKey::Row(*row),
        });
        assert!(sorted.kept.is_empty());
    }

    enum EntryKey2 {
        S,
        R(Uuid),
    }

    #[test]
    fn calls_are_counted_per_shard() {
        let o = Arc::new(Ownership::new("a".into(), 4));
        let guard = o.call(2);
        assert_eq!(o.calls_in_flight(2), 1);
        assert_eq!(o.calls_in_flight(1), 0);
        drop(guard);
        assert_eq!(o.calls_in_flight(2), 0);
    }
}
