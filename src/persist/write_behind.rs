//! The write-behind queue and its flusher thread (group commit).
//!
//! Producers (session actors, supervisors) push [`WriteOp`]s through a
//! channel and go on. One flusher thread gathers what is queued into a single
//! [log](super::log) record, appends it and fsyncs once, adds its changes to
//! the store's overlay (so reads see them), then wakes every waiter of that
//! batch. Sled is written later by the [checkpointer](super::checkpoint). A batch closes when it is full, when someone waits on it (a sync
//! acknowledgement or a barrier: waiting longer would only add latency, and
//! whatever arrives during the fsync forms the next batch), or when
//! `flush_interval` has passed since its first change (heartbeats and async
//! writes, which nobody waits for, are coalesced this way).

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use uuid::Uuid;

use super::checkpoint::{Nudger, OVERLAY_SOFT_LIMIT};
use super::keys;
use super::log::{LogWriter, RecordBuilder};
use super::outbox::{self, Outbox};
use super::record;
use super::sled::{Store, StoreError};
use crate::model::time::now_ms;
use crate::model::{AuditEntry, Requester, Session, ToolExecution};
use crate::telemetry::metrics as telemetry;

/// Resolves once the change it was handed out for is on disk.
pub type Durable = oneshot::Receiver<Result<(), StoreError>>;

/// One change to the store.
#[derive(Debug)]
pub enum WriteOp {
    /// Insert or overwrite a key.
    Put {
        /// The key (see [`keys`]).
        key: Vec<u8>,
        /// The encoded record.
        value: Vec<u8>,
    },
    /// Delete a key.
    Remove {
        /// The key.
        key: Vec<u8>,
    },
    /// An audit row for PostgreSQL: appended to the outbox only (dropped
    /// when the Postgres tier is off).
    Audit(AuditEntry),
}

impl WriteOp {
    /// Stores a session's full state.
    pub fn put_session(session: &Session) -> Self {
        WriteOp::Put {
            key: keys::session(session.tenant_id, &session.session_id),
            value: record::encode(session),
        }
    }

    /// Adds a session to its tenant's creation-order index.
    pub fn index_session(session: &Session) -> Self {
        WriteOp::Put {
            key: keys::created(session.tenant_id, session.created_at, &session.session_id),
            value: Vec::new(),
        }
    }

    /// A new session's record, its creation-order index entry and its
    /// `created` audit row.
    pub fn new_session(session: &Session) -> Vec<Self> {
        vec![
            WriteOp::index_session(session),
            WriteOp::put_session(session),
            WriteOp::Audit(AuditEntry::created(session)),
        ]
    }

    /// A final session's record together with its by-end-time index entry
    /// (which the retention purge reads) and its audit row.
    pub fn final_session(session: &Session) -> Vec<Self> {
        Self::final_session_by(session, Requester::Client)
    }

    /// As [`WriteOp::final_session`], for a termination `requester` asked for.
    pub fn final_session_by(session: &Session, requester: Requester) -> Vec<Self> {
        let mut ops = vec![
            WriteOp::put_session(session),
            WriteOp::index_finished(session),
        ];
        ops.extend(AuditEntry::ended(session, requester).map(WriteOp::Audit));
        ops
    }

    /// A session read back from PostgreSQL into a cluster node's cache:
    /// its record and index entries, as if it had been written here.
    pub fn cached(session: &Session) -> Vec<Self> {
        let mut ops = vec![
            WriteOp::index_session(session),
            WriteOp::put_session(session),
        ];
        if session.status.is_final() {
            ops.push(WriteOp::index_finished(session));
        }
        ops
    }

    fn index_finished(session: &Session) -> Self {
        WriteOp::Put {
            key: keys::finished(
                session.terminated_at().unwrap_or_default(),
                session.tenant_id,
                &session.session_id,
            ),
            value: Vec::new(),
        }
    }

    /// Appends execution number `seq` of the session with row id `session_row`.
    pub fn put_execution(session_row: Uuid, seq: u64, execution: &ToolExecution) -> Self {
        WriteOp::Put {
            key: keys::execution(session_row, seq).to_vec(),
            value: record::encode(execution),
        }
    }
}

enum Command {
    Write {
        ops: Vec<WriteOp>,
        ack: Option<oneshot::Sender<Result<(), StoreError>>>,
        /// The ack waits for sled only, whatever the durability mode.
        local: bool,
    },
    Barrier(oneshot::Sender<Result<(), StoreError>>),
    /// Resolves once everything before it is committed to PostgreSQL (a
    /// plain barrier when the tier is off).
    ShippedBarrier(oneshot::Sender<Result<(), StoreError>>),
    Shutdown(oneshot::Sender<Result<(), StoreError>>),
}

/// Live figures of the write-behind queue, for stats and tests.
#[derive(Debug, Default)]
pub struct WriteBehindStats {
    /// Commands queued and not yet written.
    pub queue_depth: AtomicUsize,
    /// Batches written so far.
    pub batches: AtomicU64,
    /// Changes written so far.
    pub writes: AtomicU64,
    /// Unix ms of the last completed flush (0 before the first).
    pub last_flush_at_ms: AtomicI64,
    /// Duration of the last apply + fsync, in microseconds.
    pub last_flush_micros: AtomicU64,
    /// The last write to the log failed (a full or failing disk): batches
    /// fail at once until a write, tried every [`PROBE_INTERVAL`],
    /// succeeds again.
    pub failing: std::sync::atomic::AtomicBool,
}

/// While the log does not take writes, how often a write is tried again,
/// so the engine resumes by itself once the disk does.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

impl WriteBehindStats {
    /// How far behind the flusher is, in ms: with changes queued, the time
    /// since the last group commit; 0 with nothing queued (an idle engine
    /// is not lagging).
    pub fn flush_lag_ms(&self) -> i64 {
        let last = self.last_flush_at_ms.load(Ordering::Relaxed);
        if last > 0 && self.queue_depth.load(Ordering::Relaxed) > 0 {
            (now_ms() - last).max(0)
        } else {
            0
        }
    }
}

/// Handle to the write-behind queue; cheap to clone.
#[derive(Clone)]
pub struct WriteBehind {
    tx: mpsc::Sender<Command>,
    stats: Arc<WriteBehindStats>,
}

impl WriteBehind {
    /// Starts the flusher thread: it appends to `log` and adds what it wrote
    /// to `store`'s overlay; with `shipping`, the PostgreSQL waiters are
    /// told what is in the log (see [`Shipping`]).
    pub fn start(
        store: Store,
        log: LogWriter,
        checkpoints: Nudger,
        flush_interval: Duration,
        max_batch: usize,
        shipping: Option<Shipping>,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(WriteBehindStats::default());
        let flusher = Flusher {
            store,
            log,
            last_attempt: None,
            checkpoints,
            rx,
            flush_interval,
            max_batch,
            stats: stats.clone(),
            shipping,
        };
        let thread = std::thread::Builder::new()
            .name("write-behind".into())
            .spawn(move || flusher.run())
            // Failing to spawn a thread at start-up means the OS is out of
            // resources; there is nothing sensible to continue with.
            .expect("spawning the write-behind thread");
        (WriteBehind { tx, stats }, thread)
    }

    /// Queues `ops` to be written together. With `durable`, returns a
    /// receiver that resolves when they are on disk.
    pub fn submit(&self, ops: Vec<WriteOp>, durable: bool) -> Option<Durable> {
        if durable {
            return Some(self.submit_durable(ops));
        }
        self.send(Command::Write {
            ops,
            ack: None,
            local: false,
        });
        None
    }

    /// Queues `ops` to be written together; resolves when they are on disk.
    pub fn submit_durable(&self, ops: Vec<WriteOp>) -> Durable {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Write {
            ops,
            ack: Some(tx),
            local: false,
        });
        rx
    }

    /// Queues `ops`; resolves when they are on disk in sled, even under
    /// `durability = "postgres"` (the readiness probe: sled's health does
    /// not depend on PostgreSQL's).
    pub fn submit_local(&self, ops: Vec<WriteOp>) -> Durable {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Write {
            ops,
            ack: Some(tx),
            local: true,
        });
        rx
    }

    /// Resolves when everything submitted before it is on disk.
    pub fn barrier(&self) -> Durable {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Barrier(tx));
        rx
    }

    /// Resolves when everything submitted before it is in the log, even
    /// under `durability = "postgres"`.
    pub fn local_barrier(&self) -> Durable {
        self.submit_local(Vec::new())
    }

    /// Resolves when everything submitted before it is committed to
    /// PostgreSQL (or, without the tier, on disk).
    pub fn shipped_barrier(&self) -> Durable {
        let (tx, rx) = oneshot::channel();
        self.send(Command::ShippedBarrier(tx));
        rx
    }

    /// Flushes everything queued and stops the flusher thread.
    pub fn shutdown(&self) -> Durable {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Shutdown(tx));
        rx
    }

    /// The queue's live figures.
    pub fn stats(&self) -> &WriteBehindStats {
        &self.stats
    }

    fn send(&self, command: Command) {
        self.stats.queue_depth.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::SendError(command)) = self.tx.send(command) {
            // The flusher has stopped (after shutdown): dropping the ack makes
            // any waiter see a closed channel, which callers report as
            // unavailable.
            self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
            drop(command);
        }
    }
}

/// How the flusher feeds the PostgreSQL outbox.
#[derive(Clone)]
pub struct Shipping {
    /// The outbox shared with the shipper.
    pub outbox: Arc<Outbox>,
    /// `durability = "postgres"`: acknowledgements wait for the Postgres
    /// commit of their entries, not only for the log.
    pub ack_after_commit: bool,
    /// Longest such a wait before the caller gets an error.
    pub commit_timeout: Duration,
    /// On a cluster node: the shards its changes are for (a change that
    /// cannot ship, its shard lost, fails only its own callers).
    pub ownership: Option<Arc<crate::cluster::Ownership>>,
}

struct Flusher {
    store: Store,
    log: LogWriter,
    /// When the log was last tried after a failure.
    last_attempt: Option<Instant>,
    checkpoints: Nudger,
    rx: mpsc::Receiver<Command>,
    flush_interval: Duration,
    max_batch: usize,
    stats: Arc<WriteBehindStats>,
    shipping: Option<Shipping>,
}

type Ack = oneshot::Sender<Result<(), StoreError>>;

/// One batch being gathered.
#[derive(Default)]
struct Pending {
    record: RecordBuilder,
    /// The record's local changes, for the overlay once it is on disk.
    changes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    writes: usize,
    /// Resolved once the batch is on disk.
    acks: Vec<Ack>,
    /// Resolved once the batch's outbox entries are committed to
    /// PostgreSQL; on a cluster node, with the shards of the change.
    commit_acks: Vec<(Ack, Vec<u32>)>,
    /// Outbox entries in the record.
    entries: usize,
    stop: bool,
}

impl Pending {
    fn add(&mut self, command: Command, shipping: Option<&Shipping>, now: i64) {
        let after_commit = shipping.is_some_and(|s| s.ack_after_commit);
        match command {
            Command::Write { ops, ack, local } => {
                let shards = match (shipping.and_then(|s| s.ownership.as_deref()), &ack) {
                    (Some(ownership), Some(_)) if after_commit && !local => {
                        shards_of(ownership, &ops)
                    }
                    _ => Vec::new(),
                };
                for op in ops {
                    match op {
                        WriteOp::Put { key, value } => {
                            if shipping.is_some()
                                && (keys::is_session(&key) || keys::is_execution(&key))
                            {
                                self.entries += 1;
                            }
                            self.record.put(&key, &value);
                            self.changes.push((key, Some(value)));
                        }
                        WriteOp::Remove { key } => {
                            self.record.remove(&key);
                            self.changes.push((key, None));
                        }
                        WriteOp::Audit(audit) => {
                            if shipping.is_none() {
                                continue;
                            }
                            self.record.entry(&outbox::entry_for_audit(&audit, now));
                            self.entries += 1;
                        }
                    }
                    self.writes += 1;
                }
                if after_commit && !local {
                    self.commit_acks.extend(ack.map(|ack| (ack, shards)));
                } else {
                    self.acks.extend(ack);
                }
            }
            Command::Barrier(ack) if after_commit => self.commit_acks.push((ack, Vec::new())),
            Command::ShippedBarrier(ack) if shipping.is_some() => {
                self.commit_acks.push((ack, Vec::new()))
            }
            Command::Barrier(ack) | Command::ShippedBarrier(ack) => self.acks.push(ack),
            Command::Shutdown(ack) => {
                self.acks.push(ack);
                self.stop = true;
            }
        }
    }

    /// Someone is waiting for this batch.
    fn urgent(&self) -> bool {
        !self.acks.is_empty() || !self.commit_acks.is_empty()
    }
}

impl Flusher {
    fn run(mut self) {
        loop {
            let first = if self.stats.failing.load(Ordering::Acquire) {
                match self.rx.recv_timeout(PROBE_INTERVAL) {
                    Ok(command) => command,
                    Err(RecvTimeoutError::Timeout) => {
                        // Nothing to write: try an empty record.
                        self.write(Pending::default());
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match self.rx.recv() {
                    Ok(command) => command,
                    Err(_) => return,
                }
            };
            let deadline = Instant::now() + self.flush_interval;
            let mut pending = Pending::default();
            self.take(&mut pending, first);
            while !pending.stop && pending.writes < self.max_batch {
                match self.rx.try_recv() {
                    Ok(command) => {
                        self.take(&mut pending, command);
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) if pending.urgent() => break,
                    Err(TryRecvError::Empty) => {}
                }
                let left = deadline.saturating_duration_since(Instant::now());
                match self.rx.recv_timeout(left) {
                    Ok(command) => self.take(&mut pending, command),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
            let stop = pending.stop;
            self.write(pending);
            if stop {
                return;
            }
        }
    }

    fn take(&self, pending: &mut Pending, command: Command) {
        self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
        pending.add(command, self.shipping.as_ref(), now_ms());
    }

    fn write(&mut self, mut pending: Pending) {
        let started = Instant::now();
        let now = now_ms();
        let failing = self.stats.failing.load(Ordering::Acquire);
        let result = if pending.record.is_empty() && !failing {
            Ok(None)
        } else if failing
            && self
                .last_attempt
                .is_some_and(|at| at.elapsed() < PROBE_INTERVAL)
        {
            // Fail at once rather than pile up behind a disk that refuses.
            Err(StoreError::Unwritable(
                "the disk refused the last write".into(),
            ))
        } else {
            self.last_attempt = Some(Instant::now());
            match self.log.append(&mut pending.record, now) {
                Ok(seq) => {
                    if failing {
                        self.stats.failing.store(false, Ordering::Release);
                        tracing::info!("the log takes writes again; changes are accepted");
                    }
                    Ok(Some(seq))
                }
                Err(e) => {
                    if !failing {
                        self.stats.failing.store(true, Ordering::Release);
                        tracing::error!(error = %e, "the log does not take writes (disk full or failing); changes answer 503 storage_unavailable until it does");
                    }
                    Err(StoreError::Unwritable(e.to_string()))
                }
            }
        };
        let result = match result {
            Ok(written) => {
                if let Some(seq) = written {
                    // Visible to readers only now that it is on disk.
                    self.store.apply_logged(
                        seq,
                        pending
                            .changes
                            .iter()
                            .map(|(key, value)| (key.as_slice(), value.as_deref())),
                    );
                    if self.store.overlay().active_bytes() > OVERLAY_SOFT_LIMIT {
                        self.checkpoints.nudge();
                    }
                    if let Some(shipping) = &self.shipping {
                        shipping.outbox.applied(seq, pending.entries, now);
                    }
                }
                metrics::histogram!(telemetry::WRITE_BEHIND_BATCH).record(pending.writes as f64);
                metrics::histogram!(telemetry::WRITE_BEHIND_FLUSH)
                    .record(started.elapsed().as_secs_f64());
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .writes
                    .fetch_add(pending.writes as u64, Ordering::Relaxed);
                self.stats
                    .last_flush_at_ms
                    .store(now_ms(), Ordering::Relaxed);
                self.stats
                    .last_flush_micros
                    .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                tracing::debug!(error = %e, writes = pending.writes, "write-behind batch failed");
                Err(e)
            }
        };
        if let Some(shipping) = &self.shipping {
            let outbox = &shipping.outbox;
            let deadline = Instant::now() + shipping.commit_timeout;
            for (ack, shards) in pending.commit_acks {
                match &result {
                    // Everything appended so far, this batch included.
                    Ok(()) => outbox.wait_for(outbox.applied_through(), deadline, ack, shards),
                    Err(e) => {
                        let _ = ack.send(Err(e.clone()));
                    }
                }
            }
        }
        for ack in pending.acks {
            // A waiter that gave up (its request was cancelled) is fine.
            let _ = ack.send(result.clone());
        }
    }
}

/// The cluster shards `ops` write for: a session's record names its
/// tenant and id, an execution or audit row its session's row id.
fn shards_of(ownership: &crate::cluster::Ownership, ops: &[WriteOp]) -> Vec<u32> {
    let mut shards = Vec::new();
    for op in ops {
        let shard = match op {
            WriteOp::Put { key, .. } => {
                if let Some((tenant, id)) = keys::parse_session(key) {
                    Some(ownership.shard_of(tenant, id))
                } else if let Some((row, _)) = keys::parse_execution(key) {
                    ownership.shard_of_row(row)
                } else {
                    None
                }
            }
            WriteOp::Audit(audit) => ownership.shard_of_row(audit.session_row),
            WriteOp::Remove { .. } => None,
        };
        if let Some(shard) = shard {
            if !shards.contains(&shard) {
                shards.push(shard);
            }
        }
    }
    shards
}

/// Deletes a session with its index entry and executions (retention purge).
pub fn purge_ops(store: &Store, session: &Session) -> Result<Vec<WriteOp>, StoreError> {
    let mut ops = vec![
        WriteOp::Remove {
            key: keys::session(session.tenant_id, &session.session_id),
        },
        WriteOp::Remove {
            key: keys::created(session.tenant_id, session.created_at, &session.session_id),
        },
        WriteOp::Remove {
            key: keys::finished(
                session.terminated_at().unwrap_or_default(),
                session.tenant_id,
                &session.session_id,
            ),
        },
    ];
    for key in store.execution_keys(session.id)? {
        ops.push(WriteOp::Remove { key: key.to_vec() });
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::session::tests::session_at;
    use crate::persist::checkpoint::Checkpointer;

    fn start(
        dir: &std::path::Path,
        flush_interval: Duration,
        max_batch: usize,
    ) -> (Store, Checkpointer, WriteBehind, JoinHandle<()>) {
        let opened = Store::open(dir, 16 << 20, false).unwrap();
        let checkpointer = Checkpointer::start(
            opened.store.clone(),
            opened.log.shared().clone(),
            false,
            Duration::from_secs(1),
        );
        let (queue, thread) = WriteBehind::start(
            opened.store.clone(),
            opened.log,
            checkpointer.nudger(),
            flush_interval,
            max_batch,
            None,
        );
        (opened.store, checkpointer, queue, thread)
    }

    #[tokio::test]
    async fn a_barrier_makes_earlier_writes_readable_and_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut checkpointer, queue, thread) =
            start(dir.path(), Duration::from_millis(50), 1024);
        let session = session_at(1_000, 60, 60);
        assert!(queue
            .submit(vec![WriteOp::put_session(&session)], false)
            .is_none());
        queue.barrier().await.unwrap().unwrap();
        let back = store
            .session(session.tenant_id, &session.session_id)
            .unwrap();
        assert_eq!(back, Some(session.clone()));
        assert!(queue.stats().batches.load(Ordering::Relaxed) >= 1);
        queue.shutdown().await.unwrap().unwrap();
        thread.join().unwrap();
        checkpointer.stop();
        assert!(
            store.overlay().is_empty(),
            "the last checkpoint folded everything into sled"
        );
        drop(store);
        // Reopened: the same state, from sled alone.
        let opened = Store::open(dir.path(), 16 << 20, false).unwrap();
        assert!(opened.store.overlay().is_empty());
        assert_eq!(
            opened
                .store
                .session(session.tenant_id, &session.session_id)
                .unwrap(),
            Some(session)
        );
    }

    #[tokio::test]
    async fn concurrent_waiters_share_batches() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut checkpointer, queue, thread) =
            start(dir.path(), Duration::from_millis(5), 4096);
        let mut waiters = Vec::new();
        for i in 0..500 {
            let mut session = session_at(1_000, 60, 60);
            session.session_id = format!("s{i}").into();
            waiters.push(
                queue
                    .submit(vec![WriteOp::put_session(&session)], true)
                    .unwrap(),
            );
        }
        for waiter in waiters {
            waiter.await.unwrap().unwrap();
        }
        let batches = queue.stats().batches.load(Ordering::Relaxed);
        assert!(
            batches < 500,
            "group commit should batch, saw {batches} batches"
        );
        assert_eq!(store.all_sessions().count(), 500);
        queue.shutdown().await.unwrap().unwrap();
        thread.join().unwrap();
        checkpointer.stop();
        assert!(
            queue.barrier().await.is_err(),
            "a stopped queue drops waiters"
        );
        drop(store);
        // Without the last checkpoint the log alone brings them back.
        let dir2 = tempfile::tempdir().unwrap();
        let (store, _checkpointer, queue, _thread) =
            start(dir2.path(), Duration::from_millis(5), 4096);
        let session = session_at(1_000, 60, 60);
        queue
            .submit_durable(vec![WriteOp::put_session(&session)])
            .await
            .unwrap()
            .unwrap();
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir2.path(), copy.path());
        drop(store);
        let opened = Store::open(copy.path(), 16 << 20, false).unwrap();
        assert_eq!(
            opened
                .store
                .session(session.tenant_id, &session.session_id)
                .unwrap(),
            Some(session)
        );
    }

    /// Copies a data dir as a crash would leave it (files as they are).
    fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                std::fs::create_dir_all(&target).unwrap();
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
}
