//! The checkpointer: folds the log into sled, off the acknowledgement path.
//!
//! Every `storage.checkpoint_interval_ms` (sooner when the overlay grows past
//! [`OVERLAY_SOFT_LIMIT`]) it freezes the overlay's active layer, writes it
//! into sled in chunks with the number of the last log record it covers,
//! fsyncs sled once, and only then lets readers go to sled for those keys
//! and deletes the log segments nothing needs any more (checkpointed and,
//! with the PostgreSQL tier, shipped). Many changes of one key between two
//! checkpoints cost sled one write: a session's heartbeats, counters and
//! status changes fold into its latest record.
//!
//! # Pacing
//!
//! A checkpoint's sled inserts come in a burst: with creates at half of
//! this machine's top rate (about 5,000/s, two inserts each) a checkpoint
//! took 0.14–0.18 s of this thread's CPU within about 0.4 s, with sled's
//! I/O threads writing its buffers meanwhile. On two cores that burst
//! queued requests behind it: those creates, sent on a fixed schedule, had
//! a p99 of 28–36 ms with a spike at every checkpoint, even with this thread at `SCHED_IDLE` (sled's
//! I/O threads and the disk are shared all the same). So a checkpoint on
//! the timer writes in [`PACE_SLICE`]-change slices and sleeps
//! [`PACE_RATIO`] times as long as each slice took (at most
//! [`PACE_MAX_PAUSE`]): about a quarter of a core, spread over the
//! interval. Two things switch pacing off, so the checkpointer never falls
//! behind: an overlay past [`PACE_UNTIL_BYTES`] (the load outruns a paced
//! checkpoint; at the top rate checkpoints run unpaced, as before, so the
//! overlay, which is memory and what a stop must write, stays small), and a
//! stop, which also ends the pauses of a checkpoint already running, so
//! shutdown does not wait for them. The interval is counted from the start
//! of the previous checkpoint, so a paced one that took most of it is
//! followed at once. The figures behind these choices are in
//! `docs/benchmarks.md` ("Issue 9, eighth step").
//!
//! A failed checkpoint (sled cannot write) keeps the frozen layer in memory
//! and the log on disk, and is retried at the next tick; nothing is lost
//! and reads are unaffected.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::log::LogShared;
use super::sled::{Store, SHIPPED_THROUGH};

/// Overlay size that triggers a checkpoint before the interval is up.
pub const OVERLAY_SOFT_LIMIT: usize = 64 << 20;
/// Changes (a session's run of executions counts as one) a paced
/// checkpoint writes between two pauses (see the module docs): a
/// millisecond or two at the 10 µs or so a sled insert took in the profile
/// of creates.
const PACE_SLICE: usize = 128;
/// A paced checkpoint sleeps this many times as long as its last slice
/// took.
const PACE_RATIO: u32 = 3;
/// Longest pause between two slices.
const PACE_MAX_PAUSE: Duration = Duration::from_millis(20);
/// Pacing stops once the overlay's active layer holds more than this: the
/// load outruns a paced checkpoint. At the top rate a checkpoint then runs
/// unpaced, as before pacing, so the overlay (memory, and what a stop must
/// write) stays small.
const PACE_UNTIL_BYTES: usize = 8 << 20;
/// Least free space on the data dir's file system for a checkpoint to run
/// (and at least four times the changes it writes). sled 0.34 fails for
/// good after a write error (every later write fails until a restart), so
/// it is never written where it could run out of space; the log, whose
/// failures are recovered from, takes the disk's last bytes instead.
pub const CHECKPOINT_FREE_MIN: u64 = 64 << 20;

/// How long a paced checkpoint pauses after a slice that took `worked`,
/// with the overlay's active layer at `active_bytes`: not at all once the
/// load outruns the pace (the layer past [`PACE_UNTIL_BYTES`]).
fn pace_pause(worked: Duration, active_bytes: usize) -> Duration {
    if active_bytes > PACE_UNTIL_BYTES {
        return Duration::ZERO;
    }
    (worked * PACE_RATIO).min(PACE_MAX_PAUSE)
}

/// Live figures of the checkpointer.
#[derive(Debug, Default)]
pub struct CheckpointStats {
    /// Checkpoints written since start.
    pub checkpoints: AtomicU64,
    /// Failed checkpoint attempts since start.
    pub failures: AtomicU64,
    /// The last log record sled holds.
    pub through: AtomicU64,
    /// Duration of the last checkpoint, in microseconds (wall time, a paced
    /// checkpoint's pauses included).
    pub last_micros: AtomicU64,
    /// The last checkpoint failed (sled did not write).
    pub failing: std::sync::atomic::AtomicBool,
    /// Checkpoints put off for lack of free space, since start.
    pub deferred: AtomicU64,
}

enum Command {
    /// Checkpoint now (the overlay grew).
    Nudge,
    /// Checkpoint everything now and stop.
    Stop(mpsc::Sender<()>),
}

/// Handle to the checkpointer thread.
pub struct Checkpointer {
    tx: mpsc::SyncSender<Command>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<CheckpointStats>,
    stopping: Arc<AtomicBool>,
}

impl Checkpointer {
    /// Starts the thread. `shipping`: the PostgreSQL tier is on, so log
    /// segments stay until they are shipped too.
    pub fn start(store: Store, log: Arc<LogShared>, shipping: bool, interval: Duration) -> Self {
        // A nudge that finds the queue full is redundant: one is pending.
        let (tx, rx) = mpsc::sync_channel(1);
        let stats = Arc::new(CheckpointStats::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            store,
            log,
            shipping,
            interval,
            stats: stats.clone(),
            stopping: stopping.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                lower_priority();
                worker.run(rx)
            })
            // Failing to spawn a thread at start-up means the OS is out of
            // resources; there is nothing sensible to continue with.
            .expect("spawning the checkpoint thread");
        Checkpointer {
            tx,
            thread: Some(thread),
            stats,
            stopping,
        }
    }

    /// A handle that asks for early checkpoints.
    pub fn nudger(&self) -> Nudger {
        Nudger(self.tx.clone())
    }

    /// The live figures, shared.
    pub fn stats(&self) -> Arc<CheckpointStats> {
        self.stats.clone()
    }

    /// Writes a last checkpoint and stops the thread (call after the
    /// flusher and the shipper have stopped).
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        let (done, wait) = mpsc::channel();
        if self.tx.send(Command::Stop(done)).is_ok() {
            let _ = wait.recv();
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the checkpoint thread panicked");
            }
        }
    }
}

/// Nice value of the checkpoint thread.
const CHECKPOINT_NICE: libc::c_int = 10;

/// Lowers this thread's CPU priority: on a busy machine requests go first
/// and checkpoints fill the gaps (measured on 2 cores: at normal priority a
/// checkpoint's burst of sled inserts took a core from the request threads
/// every second, and create p99 tripled). Best effort.
fn lower_priority() {
    // SAFETY: gettid and setpriority take no pointers; on Linux a thread id
    // names one thread for PRIO_PROCESS.
    let result = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, CHECKPOINT_NICE)
    };
    if result != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "checkpoint thread keeps its priority");
    }
}

/// Asks the checkpointer for an early checkpoint; for the flusher.
#[derive(Clone)]
pub struct Nudger(mpsc::SyncSender<Command>);

impl Nudger {
    /// Asks for a checkpoint before the interval is up.
    pub fn nudge(&self) {
        let _ = self.0.try_send(Command::Nudge);
    }
}

struct Worker {
    store: Store,
    log: Arc<LogShared>,
    shipping: bool,
    interval: Duration,
    stats: Arc<CheckpointStats>,
    /// Set by [`Checkpointer::stop`]: no more pauses, not even in the
    /// checkpoint already running.
    stopping: Arc<AtomicBool>,
}

impl Worker {
    fn run(self, rx: mpsc::Receiver<Command>) {
        let mut last = Instant::now();
        loop {
            // From the start of the previous checkpoint (see the module docs).
            match rx.recv_timeout(self.interval.saturating_sub(last.elapsed())) {
                Err(RecvTimeoutError::Timeout) => {
                    last = Instant::now();
                    self.checkpoint(true);
                }
                Ok(Command::Nudge) => {
                    last = Instant::now();
                    self.checkpoint(false);
                }
                Ok(Command::Stop(done)) => {
                    // Twice: a frozen layer left by a failure, then the rest.
                    self.checkpoint(false);
                    self.checkpoint(false);
                    let _ = done.send(());
                    return;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.checkpoint(false);
                    return;
                }
            }
        }
    }

    fn checkpoint(&self, paced: bool) {
        let started = Instant::now();
        let wanted = CHECKPOINT_FREE_MIN.max(4 * self.store.overlay().active_bytes() as u64);
        match self.store.free_bytes() {
            Ok(free) if free < wanted => {
                if self.stats.deferred.fetch_add(1, Ordering::Relaxed) % 60 == 0 {
                    tracing::warn!(
                        free_bytes = free,
                        wanted_bytes = wanted,
                        "checkpoint put off: the disk is nearly full; the log keeps every change"
                    );
                }
                return;
            }
            _ => {}
        }
        // Read before sled's fsync, so the value used below is durable.
        let shipped = if self.shipping {
            self.store.meta_u64(SHIPPED_THROUGH).unwrap_or(0)
        } else {
            u64::MAX
        };
        let overlay = self.store.overlay();
        let (mut slice_started, mut in_slice) = (Instant::now(), 0);
        let pace = || {
            if !paced || self.stopping.load(Ordering::Acquire) {
                return;
            }
            // Called before each change: a full slice is written.
            if in_slice == PACE_SLICE {
                let pause = pace_pause(slice_started.elapsed(), overlay.active_bytes());
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
                (slice_started, in_slice) = (Instant::now(), 0);
            }
            in_slice += 1;
        };
        match self.store.checkpoint_with(0, pace) {
            Ok(None) => {}
            Ok(Some(through)) => {
                self.stats.failing.store(false, Ordering::Relaxed);
                self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                self.stats.through.store(through, Ordering::Relaxed);
                self.stats
                    .last_micros
                    .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                if let Err(e) = self.log.delete_through(through.min(shipped)) {
                    tracing::warn!(error = %e, "log: cannot delete checkpointed segments; retried at the next checkpoint");
                }
            }
            Err(e) => {
                self.stats.failing.store(true, Ordering::Relaxed);
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "checkpoint into sled failed; the log keeps every change, retrying");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_checkpoint_pauses_in_proportion_until_the_load_outruns_it() {
        let slice = Duration::from_millis(2);
        assert_eq!(pace_pause(slice, 0), slice * PACE_RATIO);
        // Capped, so one slow slice (a busy machine) does not stall it long.
        assert_eq!(pace_pause(Duration::from_secs(1), 0), PACE_MAX_PAUSE);
        // Past its limit the load is outrunning the pace: no pause.
        assert_eq!(pace_pause(slice, PACE_UNTIL_BYTES), slice * PACE_RATIO);
        assert_eq!(pace_pause(slice, PACE_UNTIL_BYTES + 1), Duration::ZERO);
    }
}
