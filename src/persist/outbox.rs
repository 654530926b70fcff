//! The PostgreSQL outbox: the [log](super::log) itself.
//!
//! Every session and execution record the flusher puts in a log record is
//! an outbox entry, and so is every audit row (an outbox-only op in the
//! same record). A log segment stays on disk until the
//! [shipper](super::shipper) has committed all of its entries to
//! PostgreSQL (and the checkpointer has folded it into sled), so an outage
//! or a crash loses nothing: after a restart shipping resumes after the
//! last record PostgreSQL committed (`shipped-through` in sled).
//!
//! The shipper sends entries in log order, so a session's row always
//! precedes its executions' rows. Replaying an entry is harmless (session
//! rows carry a version, executions and audit rows a natural key), which
//! makes the shipping exactly-once as seen from PostgreSQL.
//!
//! Entry layout (for outbox-only ops, seeding and dead letters):
//! `kind(1) enqueued_at(8, BE ms) payload`, where the payload is the
//! session record as stored (`S`), the execution key and record (`E`), or
//! an encoded [`AuditEntry`] (`A`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::{oneshot, Notify};
use uuid::Uuid;

use super::executions::Unique;
use super::keys;
use super::log::{LogOp, LogReader, LogShared, LogWriter, Record, RecordBuilder};
use super::record::{self, RecordError};
use super::sled::{Store, StoreError, SHIPPED_THROUGH};
use crate::model::{AuditEntry, Millis, Session, ToolExecution};

const KIND_SESSION: u8 = b'S';
const KIND_EXECUTION: u8 = b'E';
const KIND_AUDIT: u8 = b'A';

/// Meta key set once every record present when the tier was switched on
/// has been put in the log as outbox entries (cleared whenever the engine runs without the
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

/// Appends every stored session and execution record to the log as
/// outbox entries (the PostgreSQL tier was just switched on). Start-up
/// only, before the flusher owns the log.
pub(crate) fn seed(store: &Store, log: &mut LogWriter, now: Millis) -> Result<usize, StoreError> {
    let mut record = RecordBuilder::default();
    let mut seeded = 0;
    let mut add = |entry: Option<Vec<u8>>| -> Result<(), StoreError> {
        if let Some(entry) = entry {
            record.entry(&entry);
            seeded += 1;
            if seeded % 1024 == 0 {
                store.append(log, &mut record)?;
            }
        }
        Ok(())
    };
    for item in store.scan_prefix(&keys::all_sessions(), false) {
        let (key, value) = item?;
        add(entry_for_record(&key, &value, now))?;
    }
    // A chunk of executions goes one execution per entry.
    for item in Unique::new(store.scan_prefix(&keys::all_executions(), false), false) {
        let (row, seq, value) = item?;
        add(entry_for_record(&keys::execution(row, seq), &value, now))?;
    }
    store.append(log, &mut record)?;
    Ok(seeded)
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

/// Whether a log op is an outbox entry.
pub fn is_entry(op: &LogOp<'_>) -> bool {
    match op {
        LogOp::Put(key, _) => keys::is_session(key) || keys::is_execution(key),
        LogOp::Remove(_) => false,
        LogOp::Entry(_) => true,
    }
}

/// The outbox entries of a log record, in order.
pub fn entries(record: &Record) -> impl Iterator<Item = Result<Entry, EntryError>> + '_ {
    record.ops().filter_map(|op| match op {
        LogOp::Put(key, value) if keys::is_session(key) => Some(
            record::decode_session(value)
                .map(|s| Entry::Session(Box::new(s)))
                .map_err(EntryError::from),
        ),
        LogOp::Put(key, value) if keys::is_execution(key) => {
            let (session_row, seq) = keys::parse_execution(key)?;
            Some(
                record::decode(value)
                    .map(|execution| Entry::Execution {
                        session_row,
                        seq,
                        execution,
                    })
                    .map_err(EntryError::from),
            )
        }
        LogOp::Entry(bytes) => Some(decode(bytes).map(|(_, entry)| entry)),
        LogOp::Put(..) | LogOp::Remove(_) => None,
    })
}

/// Someone waiting for PostgreSQL to commit everything up to `upto`.
struct Waiter {
    upto: u64,
    deadline: Instant,
    ack: oneshot::Sender<Result<(), StoreError>>,
    /// On a cluster node, the shards its change writes for.
    shards: Vec<u32>,
}

/// The outbox's shared state: sequence numbers, live figures, and the
/// waiters of `durability = "postgres"` and of the shipping barrier.
#[derive(Debug, Default)]
pub struct OutboxStats {
    /// Entries appended less entries shipped. It may dip below zero for
    /// an instant (the shipper can ship a record before the flusher has
    /// added its count); read it through [`OutboxStats::depth`].
    pub backlog: AtomicI64,
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
    /// Entries waiting to be shipped.
    pub fn depth(&self) -> u64 {
        self.backlog.load(Ordering::Relaxed).max(0) as u64
    }

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

/// Shared between the flusher (appends) and the shipper (drains). Positions
/// are log record numbers.
pub struct Outbox {
    /// Every record numbered up to this is in the log.
    applied_through: AtomicU64,
    /// Every record numbered up to this is committed to PostgreSQL.
    shipped_through: AtomicU64,
    waiters: Mutex<Vec<Waiter>>,
    /// (record, shard) of changes a cluster node must not ship (the shard
    /// was lost): the waiters of those records whose changes write for
    /// that shard fail, even once the record counts as shipped. Kept
    /// until every waiter of the record has been told.
    tainted: Mutex<std::collections::BTreeSet<(u64, u32)>>,
    /// Whether any record was ever tainted (spares the lock until then).
    any_tainted: std::sync::atomic::AtomicBool,
    /// Wakes the shipper: new entries or new waiters.
    pub(crate) wake: Notify,
    stats: OutboxStats,
}

impl Outbox {
    /// Opens the outbox over `store` and its log: shipping resumes after
    /// the last record PostgreSQL committed. Counts the entries waiting (a
    /// read of the unshipped log: start-up only).
    pub fn open(store: &Store, log: &std::sync::Arc<LogShared>) -> Result<Self, StoreError> {
        let shipped = store.meta_u64(SHIPPED_THROUGH)?;
        let durable = log.durable_through();
        let mut reader = LogReader::at(log.clone(), shipped + 1);
        let mut depth = 0u64;
        let mut oldest = 0;
        while let Some(record) = reader
            .next_record()
            .map_err(|e| StoreError::Sled(format!("log: {e}")))?
        {
            let count = record.ops().filter(is_entry).count() as u64;
            if count > 0 && oldest == 0 {
                oldest = record.at;
            }
            depth += count;
        }
        let outbox = Outbox {
            applied_through: AtomicU64::new(durable),
            shipped_through: AtomicU64::new(shipped.min(durable)),
            waiters: Mutex::new(Vec::new()),
            tainted: Mutex::new(std::collections::BTreeSet::new()),
            any_tainted: std::sync::atomic::AtomicBool::new(false),
            wake: Notify::new(),
            stats: OutboxStats::default(),
        };
        outbox.stats.backlog.store(depth as i64, Ordering::Relaxed);
        outbox
            .stats
            .oldest_enqueued_at_ms
            .store(oldest, Ordering::Relaxed);
        Ok(outbox)
    }

    /// Every record numbered up to this is committed to PostgreSQL.
    pub(crate) fn shipped_through(&self) -> u64 {
        self.shipped_through.load(Ordering::Acquire)
    }

    /// Every record numbered up to this is in the log.
    pub(crate) fn applied_through(&self) -> u64 {
        self.applied_through.load(Ordering::Acquire)
    }

    /// The flusher appended record `upto`, holding `count` entries.
    pub(crate) fn applied(&self, upto: u64, count: usize, at: Millis) {
        self.applied_through.fetch_max(upto, Ordering::AcqRel);
        if count == 0 {
            return;
        }
        if self
            .stats
            .backlog
            .fetch_add(count as i64, Ordering::Relaxed)
            <= 0
        {
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
        shards: Vec<u32>,
    ) {
        if upto <= self.shipped_through.load(Ordering::Acquire) {
            let _ = ack.send(self.outcome(upto, &shards));
            return;
        }
        self.lock_waiters().push(Waiter {
            upto,
            deadline,
            ack,
            shards,
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

    /// The shipper committed a batch, and every record up to `seq` is
    /// shipped (`count` entries whose records became shipped with it).
    pub(crate) fn committed(&self, seq: u64, count: usize, oldest_left: Millis) {
        self.shipped_through.fetch_max(seq, Ordering::AcqRel);
        self.counted(count);
        self.stats
            .oldest_enqueued_at_ms
            .store(oldest_left, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.settle_waiters(None);
    }

    /// `count` more entries are shipped (each record's once).
    pub(crate) fn counted(&self, count: usize) {
        // Not clamped: a record shipped before its count was added leaves
        // the backlog below zero until it is, and exact after.
        self.stats
            .backlog
            .fetch_sub(count as i64, Ordering::Relaxed);
        self.stats
            .shipped
            .fetch_add(count as u64, Ordering::Relaxed);
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
                let _ = waiter.ack.send(self.outcome(waiter.upto, &waiter.shards));
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
        drop(waiters);
        // Every waiter of a record below `applied` is registered (the
        // flusher registers a record's waiters before it appends the
        // next), and every one of a shipped record was just told.
        if self.any_tainted.load(Ordering::Acquire) {
            let settled = through.min(self.applied_through().saturating_sub(1));
            let mut tainted = self.tainted.lock().unwrap_or_else(|e| e.into_inner());
            tainted.retain(|(record, _)| *record > settled);
        }
    }

    /// Records `stale` (record, shard) as changes that were not shipped,
    /// and never will be (a cluster node's shard was lost): the waiters of
    /// those records whose changes write for those shards fail.
    pub(crate) fn taint(&self, stale: &[(u64, u32)]) {
        let mut tainted = self.tainted.lock().unwrap_or_else(|e| e.into_inner());
        tainted.extend(stale.iter().copied());
        self.any_tainted.store(true, Ordering::Release);
    }

    /// What a waiter for record `upto`, now shipped, writing for `shards`,
    /// is told.
    fn outcome(&self, upto: u64, shards: &[u32]) -> Result<(), StoreError> {
        if !self.any_tainted.load(Ordering::Acquire) {
            return Ok(());
        }
        let tainted = self.tainted.lock().unwrap_or_else(|e| e.into_inner());
        let lost = tainted
            .range((upto, 0)..=(upto, u32::MAX))
            .any(|(_, shard)| {
                *shard == crate::cluster::ownership::ANY_SHARD || shards.contains(shard)
            });
        if lost {
            Err(StoreError::Postgres(
                "this node lost the session's shard before PostgreSQL committed the change".into(),
            ))
        } else {
            Ok(())
        }
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
    fn seeding_sends_executions_of_a_chunk_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Store::open(dir.path(), 1 << 20, false).unwrap();
        let (store, mut log) = (opened.store, opened.log);
        let session = session_at(1_000, 60, 600);
        let mut ops = vec![crate::persist::WriteOp::put_session(&session)];
        for seq in 1..=4u64 {
            let execution = crate::model::session::tests::execution_at(2_000 + seq as Millis);
            ops.push(crate::persist::WriteOp::put_execution(
                session.id, seq, &execution,
            ));
        }
        store.apply_through_overlay(1, &ops);
        store.checkpoint(1).unwrap();
        assert_eq!(seed(&store, &mut log, 9).unwrap(), 5);
        drop(log);
        let (_, replay) = super::super::log::open(&dir.path().join("wal"), None, false).unwrap();
        let seqs: Vec<u64> = replay
            .records
            .iter()
            .flat_map(|record| entries(record).collect::<Vec<_>>())
            .filter_map(|entry| match entry.unwrap() {
                Entry::Execution {
                    seq, session_row, ..
                } if session_row == session.id => Some(seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
    }

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
