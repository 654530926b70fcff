//! The shipper: drains the outbox (the log) into PostgreSQL, pipelined.
//!
//! It runs on its own thread with its own single-threaded runtime, so
//! PostgreSQL never sits on a request's path and a slow server slows only
//! this thread. It reads whole log records, oldest first, and deals their
//! entries to `lanes` by session (a session's row, its executions and its
//! audit rows always go to the same lane). Each lane owns one connection,
//! outside the pool and kept open (see [`LaneConnection`]), and has at
//! most one transaction in flight: while it commits, its next
//! batch forms from everything dealt to it meanwhile, so under load the
//! batches grow and there is no idle gap between them. A lane keeps a
//! session's entries in order, so its row is committed before (or with) its
//! executions, whose foreign key needs it.
//!
//! A record is shipped once every lane has committed its part of it; the
//! highest record below which everything is shipped is `shipped-through`
//! (kept in sled, made durable by the next checkpoint), and it releases the
//! waiters of `durability = "postgres"` whose change it holds. A crash or
//! a failed lane replays from there, which PostgreSQL absorbs (see
//! [`super::outbox`]): a session's row only moves forward in `version`, and
//! executions and audit rows are keyed.
//!
//! When PostgreSQL is down or failing, the shipper waits for the lanes in
//! flight, retries with capped exponential backoff and jitter over one lane
//! with batches halved per failure, and logs the outbox depth and the age of
//! its oldest entry (at most every few seconds) so an operator sees the
//! backlog grow and drain.

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rand::Rng;
use tokio::sync::watch;

use super::log::{LogReader, LogShared};
use super::outbox::{self, Entry, Outbox};
use super::postgres::{Fence, LaneConnection, PgError, Postgres};
use super::sled::{Store, StoreError, SHIPPED_THROUGH};
use crate::cluster::ownership::{EntryKey, Ownership};
use crate::model::time::now_ms;

/// First retry delay after a failure.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest retry delay.
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// Least time between two backlog log lines while failing.
const LOG_EVERY: Duration = Duration::from_secs(5);
/// Longest sleep with nothing to do (waiter deadlines are checked this often).
const IDLE_WAIT: Duration = Duration::from_millis(250);

/// How the shipper runs.
#[derive(Debug, Clone)]
pub struct ShipperConfig {
    /// Most outbox entries one lane commits in one transaction.
    pub batch_size: usize,
    /// Lanes, each a connection with one transaction in flight; entries
    /// are dealt to them by session.
    pub lanes: usize,
    /// Apply migrations before the first batch.
    pub migrate_on_start: bool,
    /// How long shutdown keeps shipping what is left before leaving it in
    /// the outbox for the next start.
    pub drain_on_shutdown: Duration,
}

/// Handle to the running shipper.
pub struct ShipperHandle {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl ShipperHandle {
    /// Asks the shipper to drain (bounded by `drain_on_shutdown`) and stop,
    /// and waits for its thread.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the outbox shipper panicked");
            }
        }
    }
}

/// Starts the shipper thread.
pub fn start(
    store: Store,
    log: Arc<LogShared>,
    outbox: Arc<Outbox>,
    postgres: Postgres,
    config: ShipperConfig,
    ownership: Option<Arc<Ownership>>,
) -> ShipperHandle {
    let (stop, stopping) = watch::channel(false);
    let shipper = Shipper {
        store,
        log,
        outbox,
        postgres,
        config,
        ownership,
    };
    let thread = std::thread::Builder::new()
        .name("outbox-shipper".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the outbox shipper's runtime; PostgreSQL will not be written");
                    return;
                }
            };
            runtime.block_on(shipper.run(stopping));
        })
        // Failing to spawn a thread at start-up means the OS is out of
        // resources; there is nothing sensible to continue with.
        .expect("spawning the outbox shipper thread");
    ShipperHandle {
        stop,
        thread: Some(thread),
    }
}

struct Shipper {
    store: Store,
    log: Arc<LogShared>,
    outbox: Arc<Outbox>,
    postgres: Postgres,
    config: ShipperConfig,
    /// A cluster node's shards: every batch is fenced by them.
    ownership: Option<Arc<Ownership>>,
}

/// Capped exponential backoff with full jitter.
struct Backoff {
    failures: u32,
    last_log: Option<Instant>,
}

impl Backoff {
    fn delay(&self) -> Duration {
        let exp = BACKOFF_START.saturating_mul(1 << self.failures.min(16));
        let cap = exp.min(BACKOFF_CAP);
        // Full jitter: anywhere in [cap/2, cap], so many engines restarting
        // together do not hammer the server in step.
        let half = cap / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }

    /// Whether a failure is worth a log line now.
    fn should_log(&mut self) -> bool {
        let due = self.last_log.is_none_or(|at| at.elapsed() >= LOG_EVERY);
        if due {
            self.last_log = Some(Instant::now());
        }
        due
    }
}

/// One lane: the entries of the sessions dealt to it, oldest first, and
/// the first record of the batch it has in flight.
#[derive(Default)]
struct Lane {
    queue: VecDeque<(u64, Entry)>,
    in_flight_from: Option<u64>,
}

impl Lane {
    /// The oldest record this lane has not committed its part of.
    fn pending_from(&self) -> Option<u64> {
        self.in_flight_from
            .or_else(|| self.queue.front().map(|(record, _)| *record))
    }
}

/// What a lane's transaction came back with.
struct LaneDone {
    lane: usize,
    /// The lane's connection, back from its batch.
    conn: LaneConnection,
    entries: usize,
    result: Result<(), String>,
}

/// The shipper's position in the log: what it has read and dealt, and
/// which of those records are not yet shipped by every lane.
struct Dealt {
    reader: LogReader,
    lanes: Vec<Lane>,
    /// Records read and dealt, not yet shipped: (record, appended at, its
    /// entries). A record's entries count as shipped once the whole record
    /// is (not as each lane commits its part: after a failure, parts some
    /// lane committed are shipped again, and would count twice).
    records: VecDeque<(u64, i64, usize)>,
    /// The last record read and dealt.
    through: u64,
    /// Entries dealt and not yet committed.
    queued: usize,
}

impl Dealt {
    fn new(log: Arc<LogShared>, shipped: u64, lanes: usize) -> Self {
        Dealt {
            reader: LogReader::at(log, shipped + 1),
            lanes: (0..lanes.max(1)).map(|_| Lane::default()).collect(),
            records: VecDeque::new(),
            through: shipped,
            queued: 0,
        }
    }

    /// Every record up to this is committed by every lane.
    fn shipped_through(&self) -> u64 {
        shipped_through(&self.lanes, self.through)
    }

    /// Reads records and deals their entries until `cap` entries are
    /// queued or the log has no more.
    fn read(&mut self, cap: usize) -> Result<(), String> {
        while self.queued < cap {
            let Some(record) = self
                .reader
                .next_record()
                .map_err(|e| format!("reading the log: {e}"))?
            else {
                break;
            };
            let mut entries = 0;
            for entry in outbox::entries(&record) {
                entries += 1;
                match entry {
                    Ok(entry) => {
                        let lane = lane_of(&entry, self.lanes.len());
                        self.lanes[lane].queue.push_back((record.seq, entry));
                        self.queued += 1;
                    }
                    // A corrupt entry would block the outbox forever; it
                    // is logged and dropped.
                    Err(e) => {
                        tracing::error!(record = record.seq, error = %e, "outbox: unreadable entry dropped")
                    }
                }
            }
            self.records.push_back((record.seq, record.at, entries));
            self.through = record.seq;
        }
        Ok(())
    }

    /// Whether nothing is queued or in flight.
    fn idle(&self) -> bool {
        self.lanes.iter().all(|lane| lane.pending_from().is_none())
    }
}

/// Every record up to this is committed by every lane, when `through` is
/// the last record dealt: just before the oldest record a lane still holds
/// (queued, in flight, or failed), else `through`.
fn shipped_through(lanes: &[Lane], through: u64) -> u64 {
    lanes
        .iter()
        .filter_map(Lane::pending_from)
        .min()
        .map_or(through, |first| first - 1)
}

/// The lane of an entry: by its session's row id.
fn lane_of(entry: &Entry, lanes: usize) -> usize {
    let row = match entry {
        Entry::Session(session) => session.id,
        Entry::Execution { session_row, .. } => *session_row,
        Entry::Audit(audit) => audit.session_row,
    };
    (row.as_u128() % lanes as u128) as usize
}

impl Shipper {
    async fn run(self, mut stopping: watch::Receiver<bool>) {
        let mut backoff = Backoff {
            failures: 0,
            last_log: None,
        };
        if self.config.migrate_on_start {
            loop {
                match self.postgres.migrate_up().await {
                    Ok(()) => {
                        tracing::info!("postgres: migrations applied");
                        break;
                    }
                    Err(e) => {
                        if backoff.should_log() {
                            tracing::error!(error = %e, "postgres: cannot apply migrations; shipping waits, sessions are kept in sled");
                        }
                        self.outbox
                            .settle_waiters(Some(&StoreError::Postgres(e.to_string())));
                        backoff.failures += 1;
                        if self.pause(backoff.delay(), &mut stopping).await {
                            self.outbox.fail_waiters();
                            return;
                        }
                    }
                }
            }
        }
        backoff = Backoff {
            failures: 0,
            last_log: None,
        };
        let mut drain_deadline: Option<Instant> = None;
        let mut dealt = Dealt::new(
            self.log.clone(),
            self.outbox.shipped_through(),
            self.config.lanes,
        );
        let mut in_flight = FuturesUnordered::new();
        // Each lane's own connection, lent to its batch while one is in
        // flight (a lane index is below `config.lanes` in every `Dealt`).
        let mut conns: Vec<Option<LaneConnection>> = (0..self.config.lanes.max(1))
            .map(|_| Some(self.postgres.lane()))
            .collect();
        // Why the lanes are being stopped (a failed lane, an unreadable log).
        let mut failed: Option<String> = None;
        loop {
            let stop = *stopping.borrow() || stopping.has_changed().is_err();
            if stop && drain_deadline.is_none() {
                drain_deadline = Some(Instant::now() + self.config.drain_on_shutdown);
            }
            let out_of_time = drain_deadline.is_some_and(|d| Instant::now() >= d);
            // After failures batches shrink (halving each time, down to one
            // entry) and go over one lane, so a batch too big for the
            // statement timeout gets through, and no two transactions can
            // conflict; a success restores both.
            let size = (self.config.batch_size >> backoff.failures.min(16)).max(1);
            let applied = self.outbox.applied_through();
            if failed.is_none() && !out_of_time {
                if let Err(e) = dealt.read(size * dealt.lanes.len()) {
                    tracing::error!(error = %e, "outbox: cannot read the log");
                    failed = Some(e);
                }
            }
            if failed.is_none() && !out_of_time {
                for (lane, state) in dealt.lanes.iter_mut().enumerate() {
                    if state.in_flight_from.is_some() || state.queue.is_empty() {
                        continue;
                    }
                    let take = state.queue.len().min(size);
                    let batch: Vec<(u64, Entry)> = state.queue.drain(..take).collect();
                    state.in_flight_from = Some(batch[0].0);
                    let conn = conns[lane].take().unwrap_or_else(|| self.postgres.lane());
                    in_flight.push(self.ship_lane(lane, conn, batch));
                }
            }
            if in_flight.is_empty() {
                if let Some(e) = failed.take() {
                    // Start again from what every lane committed; what some
                    // lane committed beyond it is shipped again, harmlessly.
                    let shipped = dealt.shipped_through();
                    backoff.failures += 1;
                    self.settle_count(&mut dealt);
                    dealt = Dealt::new(self.log.clone(), shipped, 1);
                    self.outbox
                        .stats()
                        .failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let delay = backoff.delay();
                    if backoff.should_log() {
                        let stats = self.outbox.stats();
                        tracing::error!(
                            error = %e,
                            outbox_depth = stats.depth(),
                            oldest_entry_age_ms = stats.oldest_age_ms(),
                            retry_in_ms = delay.as_millis() as u64,
                            "postgres: shipping failed; requests go on, changes wait in the outbox"
                        );
                    }
                    self.outbox
                        .settle_waiters(Some(&StoreError::Postgres(e.to_string())));
                    if let Some(deadline) = drain_deadline {
                        // Shutting down: one more try within the deadline at most.
                        if Instant::now() + delay >= deadline {
                            break;
                        }
                        tokio::time::sleep(delay).await;
                    } else {
                        self.pause(delay, &mut stopping).await;
                    }
                    continue;
                }
                if out_of_time {
                    if !dealt.idle() || dealt.reader.position() <= applied {
                        tracing::warn!(
                            left = self.outbox.stats().depth(),
                            "outbox: shutdown before PostgreSQL took everything; the rest ships at the next start"
                        );
                    }
                    break;
                }
                if dealt.idle() {
                    self.settle_count(&mut dealt);
                    if dealt.reader.position() <= applied {
                        // The reader stopped short of what the log holds (a
                        // segment it could not follow): never report that
                        // as shipped.
                        tracing::warn!(
                            at = dealt.reader.position(),
                            applied,
                            "outbox: the log reader stopped early; reading again"
                        );
                        dealt = Dealt::new(
                            self.log.clone(),
                            dealt.shipped_through(),
                            dealt.lanes.len(),
                        );
                    } else {
                        self.outbox.drained(applied);
                        if drain_deadline.is_some() {
                            break;
                        }
                    }
                    self.idle(&mut stopping).await;
                    continue;
                }
            }
            // Wait for a lane to finish, or for new entries while a lane is
            // free to take them.
            let lane_free =
                failed.is_none() && dealt.lanes.iter().any(|l| l.in_flight_from.is_none());
            tokio::select! {
                Some(done) = in_flight.next() => {
                    conns[done.lane] = Some(done.conn);
                    let before = dealt.shipped_through();
                    match done.result {
                        Ok(()) => {
                            dealt.lanes[done.lane].in_flight_from = None;
                            dealt.queued -= done.entries.min(dealt.queued);
                            if let Err(e) = self.advance(&mut dealt, before) {
                                failed.get_or_insert(e);
                            } else if backoff.failures > 0 {
                                tracing::info!(
                                    after_failures = backoff.failures,
                                    "postgres: reachable again, outbox shipping resumed"
                                );
                                backoff.failures = 0;
                                backoff.last_log = None;
                                // Back to every lane, from what is shipped.
                                if in_flight.is_empty() {
                                    dealt = Dealt::new(self.log.clone(), dealt.shipped_through(), self.config.lanes);
                                }
                            }
                        }
                        // The lane keeps its batch's first record as
                        // pending, so nothing after it counts as shipped.
                        Err(e) => {
                            failed.get_or_insert(e);
                        }
                    }
                }
                () = self.outbox.wake.notified(), if lane_free => {}
                _ = stopping.changed(), if drain_deadline.is_none() => {}
                () = tokio::time::sleep(IDLE_WAIT) => self.outbox.settle_waiters(None),
            }
        }
        // Leaving: the lanes still in flight finish (each bounded by its
        // batch deadline), so nothing is committed behind our back.
        while let Some(done) = in_flight.next().await {
            conns[done.lane] = Some(done.conn);
            let before = dealt.shipped_through();
            if done.result.is_ok() {
                dealt.lanes[done.lane].in_flight_from = None;
                let _ = self.advance(&mut dealt, before);
            }
        }
        self.outbox.fail_waiters();
        for conn in conns.into_iter().flatten() {
            conn.close().await;
        }
    }

    /// A lane committed its batch: records how far shipping got (when it
    /// moved from `before`), counts the entries of the records now shipped
    /// and releases the waiters they satisfy.
    fn advance(&self, dealt: &mut Dealt, before: u64) -> Result<(), String> {
        let shipped = dealt.shipped_through();
        // Counted first: PostgreSQL has these records whatever the meta
        // write below answers (which only says where the next start
        // resumes), and a failure restarts from `shipped`.
        let entries = Self::count_shipped(dealt);
        let oldest_left = dealt.records.front().map_or(0, |(_, at, _)| *at);
        self.outbox.committed(shipped, entries, oldest_left);
        if shipped > before {
            self.store
                .put_meta(SHIPPED_THROUGH, &shipped.to_be_bytes())
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Takes the records every lane has committed off `dealt`, answering
    /// their entries. Called before `dealt` is replaced too, so a record
    /// that gave the lanes nothing (every entry unreadable) still counts.
    fn count_shipped(dealt: &mut Dealt) -> usize {
        let shipped = dealt.shipped_through();
        let mut entries = 0;
        while let Some(&(record, _, count)) = dealt.records.front() {
            if record > shipped {
                break;
            }
            entries += count;
            dealt.records.pop_front();
        }
        entries
    }

    /// Counts what `dealt` shipped without a lane to report it (see
    /// [`Shipper::count_shipped`]) before it is replaced or found idle.
    fn settle_count(&self, dealt: &mut Dealt) {
        let entries = Self::count_shipped(dealt);
        if entries > 0 {
            self.outbox.counted(entries);
        }
    }

    /// Commits one lane's batch in one transaction (fenced on a cluster
    /// node).
    async fn ship_lane(
        &self,
        lane: usize,
        mut conn: LaneConnection,
        batch: Vec<(u64, Entry)>,
    ) -> LaneDone {
        let first = batch[0].0;
        let count = batch.len();
        let result = match &self.ownership {
            None => {
                let entries: Vec<Entry> = batch.into_iter().map(|(_, entry)| entry).collect();
                match conn.ship(&entries).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.is_data() => {
                        self.isolate(&mut conn, &entries, first, &e, None).await
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            Some(ownership) => self.ship_fenced(&mut conn, ownership, batch).await,
        };
        LaneDone {
            lane,
            conn,
            entries: count,
            result,
        }
    }

    /// A cluster node's batch: the entries of shards not in tenure here
    /// (lost, or logged under an earlier tenure) are left out and their
    /// records' waiters fail; the rest ships behind the fence of the shards
    /// it writes for. When PostgreSQL answers that a shard was lost
    /// meanwhile, that shard's entries are left out too and the rest tried
    /// again.
    async fn ship_fenced(
        &self,
        conn: &mut LaneConnection,
        ownership: &Ownership,
        batch: Vec<(u64, Entry)>,
    ) -> Result<(), String> {
        let first = batch[0].0;
        let sorted = ownership.sort(batch, |entry| match entry {
            Entry::Session(s) => EntryKey::Session(s.tenant_id, &s.session_id),
            Entry::Execution { session_row, .. } => EntryKey::Row(*session_row),
            Entry::Audit(audit) => EntryKey::Row(audit.session_row),
        });
        self.left_out(&sorted.stale, sorted.dropped);
        // Where each entry came from (record, shard, epoch), beside it.
        let (mut origins, mut entries): (Vec<_>, Vec<Entry>) = sorted
            .kept
            .into_iter()
            .map(|(record, shard, epoch, entry)| ((record, shard, epoch), entry))
            .unzip();
        // Each round either ships or drops the shards PostgreSQL named, so
        // it ends within as many rounds as the batch has shards.
        loop {
            if entries.is_empty() {
                return Ok(());
            }
            // `ship_fenced` names each shard once.
            let fence = Fence {
                node_id: ownership.node_id().to_owned(),
                held: origins.iter().map(|(_, s, e)| (*s, *e)).collect(),
            };
            let error = match conn.ship_fenced(&entries, &fence).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_data() => {
                    return self.isolate(conn, &entries, first, &e, Some(&fence)).await
                }
                Err(e) => e,
            };
            let lost = error.fenced();
            if lost.is_empty() {
                return Err(error.to_string());
            }
            tracing::warn!(shards = ?lost, "postgres: this node no longer holds these shards; their unshipped changes are dropped");
            let mut stale: Vec<(u64, u32)> = Vec::new();
            let mut dropped = 0;
            let mut kept_origins = Vec::with_capacity(origins.len());
            let mut kept_entries = Vec::with_capacity(entries.len());
            for (origin, entry) in origins.into_iter().zip(entries) {
                if lost.contains(&origin.1) {
                    dropped += 1;
                    if !stale.contains(&(origin.0, origin.1)) {
                        stale.push((origin.0, origin.1));
                    }
                } else {
                    kept_origins.push(origin);
                    kept_entries.push(entry);
                }
            }
            self.left_out(&stale, dropped);
            (origins, entries) = (kept_origins, kept_entries);
        }
    }

    /// Entries a cluster node must not ship were left out of a batch.
    fn left_out(&self, stale: &[(u64, u32)], entries: usize) {
        if stale.is_empty() {
            return;
        }
        self.outbox.taint(stale);
        // Routine while a shard is taken over (what was read back is not
        // written back); a lost shard is logged where it is lost.
        tracing::debug!(
            entries,
            records = stale.len(),
            "outbox: changes of shards this node no longer holds were not shipped; their callers are told"
        );
    }

    /// PostgreSQL refused some rows of a round (it would refuse them
    /// forever): ships the entries one by one, in order, and moves each one
    /// it refuses to the dead-letter records (kept in sled, logged), so the
    /// outbox moves on. `first` numbers the dead letters; `fence`, on a
    /// cluster node, fences each one.
    async fn isolate(
        &self,
        conn: &mut LaneConnection,
        entries: &[Entry],
        first: u64,
        cause: &PgError,
        fence: Option<&Fence>,
    ) -> Result<(), String> {
        tracing::warn!(error = %cause, entries = entries.len(), "postgres refused rows of a batch; shipping it entry by entry");
        for (i, entry) in entries.iter().enumerate() {
            let one = std::slice::from_ref(entry);
            let shipped = match fence {
                None => conn.ship(one).await,
                Some(fence) => conn.ship_fenced(one, fence).await,
            };
            match shipped {
                Ok(_) => {}
                Err(e) if e.is_data() => {
                    let seq = (first << 20) + i as u64;
                    self.store
                        .put_dead_letter(now_ms(), seq, &outbox::encode(entry, now_ms()))
                        .map_err(|e| e.to_string())?;
                    self.outbox
                        .stats()
                        .dead_letters
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(record = first, error = %e, "postgres refused an outbox entry; kept in sled as a dead letter");
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }

    /// Waits for new entries or waiters, at most [`IDLE_WAIT`].
    async fn idle(&self, stopping: &mut watch::Receiver<bool>) {
        tokio::select! {
            () = self.outbox.wake.notified() => {}
            // A dropped sender (the engine went away without a shutdown)
            // reads as a stop request at the next round.
            _ = stopping.changed() => {}
            () = tokio::time::sleep(IDLE_WAIT) => {}
        }
        self.outbox.settle_waiters(None);
    }

    /// Sleeps `delay` unless asked to stop (or the engine is gone); returns
    /// whether it was. Waiters past their deadline get their error
    /// meanwhile, not only after the sleep.
    async fn pause(&self, delay: Duration, stopping: &mut watch::Receiver<bool>) -> bool {
        let until = tokio::time::Instant::now() + delay;
        loop {
            if *stopping.borrow() || stopping.has_changed().is_err() {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                return false;
            }
            tokio::select! {
                changed = stopping.changed() => {
                    if changed.is_err() {
                        return true;
                    }
                }
                () = tokio::time::sleep((until - now).min(IDLE_WAIT)) => {}
            }
            self.outbox.settle_waiters(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::audit::AuditEntry;

    fn audit(row: uuid::Uuid) -> Entry {
        let mut session = crate::model::session::tests::session_at(0, 60, 60);
        session.id = row;
        Entry::Audit(AuditEntry::created(&session))
    }

    #[test]
    fn a_record_is_shipped_once_every_lane_committed_its_part() {
        let mut lanes: Vec<Lane> = (0..2).map(|_| Lane::default()).collect();
        // Nothing held: everything dealt is shipped.
        assert_eq!(shipped_through(&lanes, 9), 9);
        // Lane 0 commits records 3..=5, lane 1 still queues record 4.
        lanes[0].in_flight_from = Some(3);
        lanes[1].queue.push_back((4, audit(uuid::Uuid::now_v7())));
        assert_eq!(shipped_through(&lanes, 9), 2);
        // Lane 0 done: record 4 of lane 1 holds everything from 4 on.
        lanes[0].in_flight_from = None;
        assert_eq!(shipped_through(&lanes, 9), 3);
        // A failed lane keeps its batch's first record pending, so nothing
        // after it counts as shipped while the other lane moves on.
        lanes[1].queue.clear();
        lanes[1].in_flight_from = Some(4);
        assert_eq!(shipped_through(&lanes, 9), 3);
    }

    #[test]
    fn a_sessions_entries_all_go_to_one_lane() {
        let row = uuid::Uuid::now_v7();
        let lanes = 3;
        let execution = Entry::Execution {
            session_row: row,
            seq: 1,
            execution: crate::model::session::tests::execution_at(0),
        };
        let mut session = crate::model::session::tests::session_at(0, 60, 60);
        session.id = row;
        let state = Entry::Session(Box::new(session));
        let lane = lane_of(&state, lanes);
        assert_eq!(lane_of(&execution, lanes), lane);
        assert_eq!(lane_of(&audit(row), lanes), lane);
        assert!(lane < lanes);
    }
}
