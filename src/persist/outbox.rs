//! The PostgreSQL outbox, kept in sled.
//!
//! With the Postgres tier on, the flusher appends a copy of every session
//! and execution record it writes (and every audit entry) under the `O`
//! prefix, in the same atomic sled batch as the record itself. An entry
//! stays until the [shipper](super::shipper) has committed it to
//! PostgreSQL, so an outage or a crash loses nothing that sled has: after a
//! restart shipping resumes from the first entry left.
//!
//! Entries are numbered in the order the flusher applied them; the shipper
//! sends them in that order, so a session's row always precedes its
//! executions' rows. Replaying an entry is harmless (session rows carry a
//! version, executions and audit rows a natural key), which makes the
//! shipping exactly-once as seen from PostgreSQL.
//!
//! Value layout: `kind(1) enqueued_at(8, BE ms) payload`, where the payload
//! is the session record as stored (`S`), the execution key and record
//! (`E`), or an encoded [`AuditEntry`] (`A`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use dashmap::DashMap;
use tokio::sync::{oneshot, Notify};
use uuid::Uuid;

use super::keys;
use super::record::{self, RecordError};
use super::sled::{Store, StoreError};
use crate::model::{AuditEntry, Millis, Session, ToolExecution};

const KIND_SESSION: u8 = b'S';
const KIND_EXECUTION: u8 = b'E';
const KIND_AUDIT: u8 = b'A';

/// Meta key set once every record present when the tier was switched on
/// has been put in the outbox (cleared whenever the engine runs without the
/// tier, so switching it on again ships what changed meanwhile).
pub const SEEDED: &str = "outbox-seeded";

/// One decoded outbox entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// A session's full state at some version.
    Session(Box<Session>),
    /// Execution number `seq` of the session with row id `session_row`.
    Execution {
        /// The session's row id.
        session_row: Uuid,
        /// The execution's number within its session (from 1).
        seq: u64,
        /// The execution.
        execution: ToolExecution,
    },
    /// An audit row.
    Audit(AuditEntry),
}

/// The outbox value for a record stored under `key`, if that kind of
/// record is shipped.
pub fn entry_for_record(key: &[u8], value: &[u8], now: Millis) -> Option<Vec<u8>> {
    let (kind, prefix): (u8, &[u8]) = if keys::is_session(key) {
        (KIND_SESSION, &[])
    } else if keys::is_execution(key) {
        (KIND_EXECUTION, key)
    } else {
        return None;
    };
    let mut out = Vec::with_capacity(9 + prefix.len() + value.len());
    out.push(kind);
    out.extend_from_slice(&now.to_be_bytes());
    out.extend_from_slice(prefix);
    out.extend_from_slice(value);
    Some(out)
}

/// The outbox value of an audit entry.
pub fn entry_for_audit(audit: &AuditEntry, now: Millis) -> Vec<u8> {
    let mut out = vec![KIND_AUDIT];
    out.extend_from_slice(&now.to_be_bytes());
    out.extend_from_slice(&record::encode(audit));
    out
}

/// The outbox value of a decoded entry (dead letters keep what was refused).
pub fn encode(entry: &Entry, now: Millis) -> Vec<u8> {
    match entry {
        Entry::Session(session) => {
            let key = keys::session(session.tenant_id, &session.session_id);
            entry_for_record(&key, &record::encode(&**session), now).unwrap_or_default()
        }
        Entry::Execution {
            session_row,
            seq,
            execution,
        } => entry_for_record(
            &keys::execution(*session_row, *seq),
            &record::encode(execution),
            now,
        )
        .unwrap_or_default(),
        Entry::Audit(audit) => entry_for_audit(audit, now),
    }
}

/// Why an outbox value did not decode.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// Too short or of an unknown kind.
    #[error("malformed outbox entry")]
    Malformed,
    /// The record inside did not decode.
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// Decodes an outbox value into `(enqueued_at, entry)`.
pub fn decode(value: &[u8]) -> Result<(Millis, Entry), EntryError> {
    if value.len() < 9 {
        return Err(EntryError::Malformed);
    }
    let mut at = [0u8; 8];
    at.copy_from_slice(&value[1..9]);
    let at = Millis::from_be_bytes(at);
    let payload = &value[9..];
    let entry = match value[0] {
        KIND_SESSION => Entry::Session(Box::new(record::decode_session(payload)?)),
        KIND_EXECUTION => {
            let key = payload.get(..25).ok_or(EntryError::Malformed)?;
            let (session_row, seq) = keys::parse_execution(key).ok_or(EntryError::Malformed)?;
            Entry::Execution {
                session_row,
                seq,
                execution: record::decode(&payload[25..])?,
            }
        }
        KIND_AUDIT => Entry::Audit(record::decode(payload)?),
        _ => return Err(EntryError::Malformed),
    };
    Ok((at, entry))
}

/// What the shipper does with a session-state entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatePlan {
    /// A state at least as new was already committed.
    Skip,
    /// Ship this state.
    This,
    /// A newer state of the session is queued as this entry: ship that one
    /// now instead (the row exists and is current sooner, and the newer
    /// entry is skipped when its turn comes).
    Newest(u64),
}

/// Someone waiting for PostgreSQL to commit everything up to `upto`.
struct Waiter {
    upto: u64,
    deadline: Instant,
    ack: oneshot::Sender<Result<(), StoreError>>,
}

/// The outbox's shared state: sequence numbers, live figures, and the
/// waiters of `durability = "postgres"` and of the shipping barrier.
#[derive(Debug, Default)]
pub struct OutboxStats {
    /// Entries waiting to be shipped.
    pub depth: AtomicU64,
    /// Unix ms at which the oldest waiting entry was appended (0 when empty
    /// or not yet known).
    pub oldest_enqueued_at_ms: AtomicI64,
    /// Entries committed to PostgreSQL since start.
    pub shipped: AtomicU64,
    /// Shipping batches committed since start.
    pub batches: AtomicU64,
    /// Failed shipping attempts since start.
    pub failures: AtomicU64,
    /// Entries PostgreSQL refused, kept aside as dead letters, since start.
    pub dead_letters: AtomicU64,
}

impl OutboxStats {
    /// Age of the oldest waiting entry, in ms (0 when none waits).
    pub fn oldest_age_ms(&self) -> i64 {
        let oldest = self.oldest_enqueued_at_ms.load(Ordering::Relaxed);
        if oldest > 0 {
            (crate::model::time::now_ms() - oldest).max(0)
        } else {
            0
        }
    }
}

/// Shared between the flusher (appends) and the shipper (drains).
pub struct Outbox {
    /// The number the next appended entry gets.
    next_seq: AtomicU64,
    /// Every entry numbered up to this has been applied to sled (or failed
    /// to be, and will never exist).
    applied_through: AtomicU64,
    /// Every entry numbered up to this is committed to PostgreSQL.
    shipped_through: AtomicU64,
    waiters: Mutex<Vec<Waiter>>,
    /// Wakes the shipper: new entries or new waiters.
    pub(crate) wake: Notify,
    /// The newest session entry of each session still in the outbox (by
    /// session record key): an older state of the same session need not be
    /// shipped, the newer one replaces it. Filled as the flusher appends
    /// (entries left from before a restart are simply all shipped).
    newest_state: DashMap<Box<[u8]>, u64>,
    /// Sessions whose newer state (entry number) was already committed in
    /// place of an older entry; entries up to it are skipped.
    shipped_ahead: DashMap<Box<[u8]>, (Uuid, u64)>,
    stats: OutboxStats,
}

impl Outbox {
    /// Opens the outbox over `store`. The first time the tier is on for a
    /// store, every record already there is appended, so PostgreSQL gets
    /// the sessions that existed before it was configured.
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        let seeded = store.meta(SEEDED)?.is_some();
        let mut next = store.outbox_last()?.map_or(1, |seq| seq + 1);
        if !seeded {
            next = store.seed_outbox(next, crate::model::time::now_ms())?;
            store.put_meta(SEEDED, b"1")?;
            store.sync()?;
        }
        let first = store.outbox_first()?;
        let depth = store.outbox_len()?;
        let outbox = Outbox {
            next_seq: AtomicU64::new(next),
            applied_through: AtomicU64::new(next - 1),
            shipped_through: AtomicU64::new(first.map_or(next - 1, |(seq, _)| seq - 1)),
            waiters: Mutex::new(Vec::new()),
            wake: Notify::new(),
            newest_state: DashMap::new(),
            shipped_ahead: DashMap::new(),
            stats: OutboxStats::default(),
        };
        outbox.stats.depth.store(depth as u64, Ordering::Relaxed);
        if let Some((_, at)) = first {
            outbox
                .stats
                .oldest_enqueued_at_ms
                .store(at, Ordering::Relaxed);
        }
        Ok(outbox)
    }

    /// Takes the next sequence number (the flusher alone appends).
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// The flusher appended entry `seq`, a state of the session stored
    /// under `key`.
    pub(crate) fn session_state_appended(&self, key: &[u8], seq: u64) {
        self.newest_state.insert(key.into(), seq);
    }

    /// What to ship for entry `seq`, a state of the session with row id
    /// `row` stored under `key`.
    pub(crate) fn plan_state(&self, key: &[u8], row: Uuid, seq: u64) -> StatePlan {
        if let Some(ahead) = self.shipped_ahead.get(key) {
            // The same session (not a later one re-using its id).
            if ahead.0 == row && seq <= ahead.1 {
                return StatePlan::Skip;
            }
        }
        match self.newest_state.get(key) {
            Some(newest) if *newest > seq => StatePlan::Newest(*newest),
            _ => StatePlan::This,
        }
    }

    /// Entry `seq` (a state of the session under `key`) was skipped,
    /// shipped, or shipped as the newer entry `shipped_as`.
    pub(crate) fn state_done(&self, key: &[u8], row: Uuid, seq: u64, shipped_as: u64) {
        if shipped_as > seq {
            self.shipped_ahead
                .entry(key.into())
                .and_modify(|ahead| *ahead = (row, ahead.1.max(shipped_as)))
                .or_insert((row, shipped_as));
        } else {
            self.shipped_ahead.remove_if(key, |_, ahead| ahead.1 <= seq);
            self.newest_state.remove_if(key, |_, newest| *newest <= seq);
        }
    }

    /// Every entry numbered up to this is in sled (or will never be).
    pub(crate) fn applied_through(&self) -> u64 {
        self.applied_through.load(Ordering::Acquire)
    }

    /// The flusher finished a batch whose entries are numbered up to
    /// `upto`; `count` of them were applied (none when the batch failed).
    pub(crate) fn applied(&self, upto: u64, count: usize, at: Millis) {
        self.applied_through.fetch_max(upto, Ordering::AcqRel);
        if count == 0 {
            return;
        }
        if self.stats.depth.fetch_add(count as u64, Ordering::Relaxed) == 0 {
            let _ = self.stats.oldest_enqueued_at_ms.compare_exchange(
                0,
                at,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        self.wake.notify_one();
    }

    /// Resolves `ack` once every entry up to `upto` is committed, or with
    /// an error at `deadline`.
    pub(crate) fn wait_for(
        &self,
        upto: u64,
        deadline: Instant,
        ack: oneshot::Sender<Result<(), StoreError>>,
    ) {
        if upto <= self.shipped_through.load(Ordering::Acquire) {
            let _ = ack.send(Ok(()));
            return;
        }
        self.lock_waiters().push(Waiter {
            upto,
            deadline,
            ack,
        });
        self.wake.notify_one();
    }

    /// The shipper found the outbox empty after reading `applied_through`
    /// as `upto`: everything up to it is shipped.
    pub(crate) fn drained(&self, upto: u64) {
        self.shipped_through.fetch_max(upto, Ordering::AcqRel);
        self.stats.oldest_enqueued_at_ms.store(0, Ordering::Relaxed);
        self.settle_waiters(None);
    }

    /// The shipper committed every entry up to `seq` (`count` of them).
    pub(crate) fn committed(&self, seq: u64, count: usize, oldest_left: Millis) {
        self.shipped_through.fetch_max(seq, Ordering::AcqRel);
        self.stats.depth.fetch_sub(
            (count as u64).min(self.stats.depth.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        self.stats
            .oldest_enqueued_at_ms
            .store(oldest_left, Ordering::Relaxed);
        self.stats
            .shipped
            .fetch_add(count as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.settle_waiters(None);
    }

    /// Resolves the waiters that are satisfied, and fails the overdue ones
    /// with `overdue` (when given).
    pub(crate) fn settle_waiters(&self, overdue: Option<&StoreError>) {
        let through = self.shipped_through.load(Ordering::Acquire);
        let now = Instant::now();
        let mut waiters = self.lock_waiters();
        let mut kept = Vec::with_capacity(waiters.len());
        for waiter in waiters.drain(..) {
            if waiter.upto <= through {
                let _ = waiter.ack.send(Ok(()));
            } else if now >= waiter.deadline {
                let error = overdue.cloned().unwrap_or_else(|| {
                    StoreError::Postgres("not committed to PostgreSQL in time".into())
                });
                let _ = waiter.ack.send(Err(error));
            } else {
                kept.push(waiter);
            }
        }
        *waiters = kept;
    }

    /// Fails every waiter (the shipper is stopping).
    pub(crate) fn fail_waiters(&self) {
        for waiter in self.lock_waiters().drain(..) {
            let _ = waiter.ack.send(Err(StoreError::Closed));
        }
    }

    /// The live figures.
    pub fn stats(&self) -> &OutboxStats {
        &self.stats
    }

    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, Vec<Waiter>> {
        // The lock guards plain pushes and drains; a panic while holding it
        // cannot leave the vector inconsistent, so poisoning is ignored.
        self.waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::session::tests::session_at;
    use crate::model::AuditEntry;

    #[test]
    fn entries_round_trip() {
        let session = session_at(1_000, 60, 60);
        let key = keys::session(session.tenant_id, &session.session_id);
        let value = record::encode(&session);
        let bytes = entry_for_record(&key, &value, 77).unwrap();
        assert_eq!(
            decode(&bytes).unwrap(),
            (77, Entry::Session(Box::new(session.clone())))
        );

        let execution = ToolExecution {
            tool_name: "grep".into(),
            tool_id: Some("t1".into()),
            arguments: "{}".into(),
            result: "{}".into(),
            error: None,
            duration_ms: 3,
            tokens_used: 4,
            executed_at: 5,
            recorded_at: 6,
        };
        let key = keys::execution(session.id, 9);
        let bytes = entry_for_record(&key, &record::encode(&execution), 78).unwrap();
        assert_eq!(
            decode(&bytes).unwrap(),
            (
                78,
                Entry::Execution {
                    session_row: session.id,
                    seq: 9,
                    execution
                }
            )
        );

        let audit = AuditEntry::created(&session);
        let bytes = entry_for_audit(&audit, 79);
        assert_eq!(decode(&bytes).unwrap(), (79, Entry::Audit(audit)));

        assert!(entry_for_record(&keys::meta("x"), b"1", 0).is_none());
        assert!(decode(b"S").is_err());
        assert!(decode(b"Z12345678").is_err());
    }
}
