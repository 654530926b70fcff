//! The shipper: drains the outbox (the log) into PostgreSQL in batches.
//!
//! It runs on its own thread with its own single-threaded runtime, so
//! PostgreSQL never sits on a request's path and a slow server slows only
//! this thread. Each round reads whole log records, oldest first, until it
//! holds at least `batch_size` entries, commits them ([`Postgres::ship`])
//! and then records the last record shipped (`shipped-through` in sled,
//! made durable by the next checkpoint). A crash before that replays the
//! round, which PostgreSQL absorbs (see [`super::outbox`]). Within a round
//! only the newest state of each session is sent, at the place of its
//! first state (its row exists before its executions' rows).
//!
//! When PostgreSQL is down or failing, the shipper retries with capped
//! exponential backoff and jitter, and logs the outbox depth and the age of
//! its oldest entry (at most every few seconds) so an operator sees the
//! backlog grow and drain.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::watch;

use super::keys;
use super::log::{LogReader, LogShared, Record};
use super::outbox::{self, Entry, Outbox};
use super::postgres::{PgError, Postgres};
use super::sled::{Store, StoreError, SHIPPED_THROUGH};
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
    /// Most outbox entries read per round.
    pub batch_size: usize,
    /// Transactions a round is split into, run at once (by session).
    pub parallel: usize,
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
) -> ShipperHandle {
    let (stop, stopping) = watch::channel(false);
    let shipper = Shipper {
        store,
        log,
        outbox,
        postgres,
        config,
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
        let mut reader = LogReader::at(self.log.clone(), self.outbox.shipped_through() + 1);
        loop {
            let stop = *stopping.borrow() || stopping.has_changed().is_err();
            if stop && drain_deadline.is_none() {
                drain_deadline = Some(Instant::now() + self.config.drain_on_shutdown);
            }
            let applied = self.outbox.applied_through();
            // After failures the round shrinks (halving each time, down to
            // one entry), so a round too big for the statement timeout gets
            // through; a success restores it.
            let size = (self.config.batch_size >> backoff.failures.min(16)).max(1);
            let batch = match self.read_round(&mut reader, size) {
                Ok(batch) => batch,
                Err(e) => {
                    // Nothing is known to be shipped: waiters keep waiting,
                    // and the round is read again from what is committed.
                    reader.seek(self.outbox.shipped_through() + 1);
                    tracing::error!(error = %e, "outbox: cannot read the log");
                    backoff.failures += 1;
                    if self.pause(backoff.delay(), &mut stopping).await {
                        break;
                    }
                    continue;
                }
            };
            if batch.is_empty() && reader.position() <= applied {
                // The reader stopped short of what the log holds (a segment
                // it could not follow): never report that as shipped.
                tracing::warn!(
                    at = reader.position(),
                    applied,
                    "outbox: the log reader stopped early; reading again"
                );
                reader.seek(self.outbox.shipped_through() + 1);
                self.idle(&mut stopping).await;
                continue;
            }
            if batch.is_empty() {
                self.outbox.drained(applied);
                if drain_deadline.is_some() {
                    break;
                }
                self.idle(&mut stopping).await;
                continue;
            }
            if drain_deadline.is_some_and(|d| Instant::now() >= d) {
                tracing::warn!(
                    left = self.outbox.stats().depth.load(std::sync::atomic::Ordering::Relaxed),
                    "outbox: shutdown before PostgreSQL took everything; the rest ships at the next start"
                );
                break;
            }
            match self.ship(&batch, backoff.failures).await {
                Err(e) => {
                    // Read the round again (smaller) at the next try.
                    reader.seek(self.outbox.shipped_through() + 1);
                    backoff.failures += 1;
                    self.outbox
                        .stats()
                        .failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let delay = backoff.delay();
                    if backoff.should_log() {
                        let stats = self.outbox.stats();
                        tracing::error!(
                            error = %e,
                            outbox_depth = stats.depth.load(std::sync::atomic::Ordering::Relaxed),
                            oldest_entry_age_ms = stats.oldest_age_ms(),
                            retry_in_ms = delay.as_millis() as u64,
                            "postgres: shipping failed; requests go on, changes wait in the outbox"
                        );
                    }
                    self.outbox
                        .settle_waiters(Some(&StoreError::Postgres(e.to_string())));
                    if drain_deadline.is_some() {
                        // Shutting down: one more try within the deadline at most.
                        if drain_deadline.is_some_and(|d| Instant::now() + delay >= d) {
                            break;
                        }
                        tokio::time::sleep(delay).await;
                    } else {
                        self.pause(delay, &mut stopping).await;
                    }
                }
                Ok(()) => {
                    if backoff.failures > 0 {
                        tracing::info!(
                            after_failures = backoff.failures,
                            "postgres: reachable again, outbox shipping resumed"
                        );
                    }
                    backoff.failures = 0;
                    backoff.last_log = None;
                }
            }
        }
        self.outbox.fail_waiters();
    }

    /// Reads whole log records until they hold at least `size` entries.
    fn read_round(&self, reader: &mut LogReader, size: usize) -> Result<Vec<Record>, String> {
        let mut round = Vec::new();
        let mut entries = 0;
        while entries < size {
            match reader
                .next_record()
                .map_err(|e| format!("reading the log: {e}"))?
            {
                Some(record) => {
                    entries += record.ops().filter(outbox::is_entry).count();
                    round.push(record);
                }
                None => break,
            }
        }
        Ok(round)
    }

    /// Ships one round; on success records how far shipping got.
    async fn ship(&self, round: &[Record], failures: u32) -> Result<(), String> {
        let mut entries: Vec<Entry> = Vec::new();
        // Where each session's state sits in `entries`, by (key, row id).
        let mut states: std::collections::HashMap<(Vec<u8>, uuid::Uuid), usize> =
            std::collections::HashMap::new();
        let mut count = 0;
        for record in round {
            for entry in outbox::entries(record) {
                count += 1;
                match entry {
                    Ok(Entry::Session(session)) => {
                        let key = (
                            keys::session(session.tenant_id, &session.session_id),
                            session.id,
                        );
                        match states.get(&key) {
                            // A newer state of a session already in the
                            // round replaces it there.
                            Some(&at) => entries[at] = Entry::Session(session),
                            None => {
                                states.insert(key, entries.len());
                                entries.push(Entry::Session(session));
                            }
                        }
                    }
                    Ok(entry) => entries.push(entry),
                    // A corrupt entry would block the outbox forever; it
                    // is logged and dropped with the round.
                    Err(e) => {
                        tracing::error!(record = record.seq, error = %e, "outbox: unreadable entry dropped")
                    }
                }
            }
        }
        // After a failure the round goes as one transaction: should two
        // parts ever conflict (a session id re-used by a new session while
        // the old one still waits here), the retry cannot.
        let parts = if failures > 0 {
            1
        } else {
            self.config.parallel
        };
        match self.postgres.ship(&entries, parts).await {
            Ok(_) => {}
            Err(e) if e.is_data() => self.isolate(&entries, round[0].seq, &e).await?,
            Err(e) => return Err(e.to_string()),
        }
        let last = round.last().map_or(0, |record| record.seq);
        self.store
            .put_meta(SHIPPED_THROUGH, &last.to_be_bytes())
            .map_err(|e| e.to_string())?;
        self.outbox.committed(last, count, 0);
        Ok(())
    }

    /// PostgreSQL refused some rows of a round (it would refuse them
    /// forever): ships the entries one by one, in order, and moves each one
    /// it refuses to the dead-letter records (kept in sled, logged), so the
    /// outbox moves on. `first` numbers the dead letters.
    async fn isolate(&self, entries: &[Entry], first: u64, cause: &PgError) -> Result<(), String> {
        tracing::warn!(error = %cause, entries = entries.len(), "postgres refused rows of a batch; shipping it entry by entry");
        for (i, entry) in entries.iter().enumerate() {
            match self.postgres.ship(std::slice::from_ref(entry), 1).await {
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
