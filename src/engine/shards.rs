//! One actix arbiter (a thread with its own single-threaded runtime) per core.
//!
//! The engine's actors live here, and so do the HTTP connections
//! (`http::serve` hands each accepted connection to an arbiter): a call
//! reaches an actor on its own arbiter without crossing threads. Each
//! arbiter knows its index ([`current`]), so a create can place its
//! session where the request arrived.

use std::sync::{mpsc, Mutex};
use std::thread::JoinHandle;

use actix::prelude::*;
use actix_rt::{Arbiter, ArbiterHandle};

thread_local! {
    /// The index of the arbiter running on this thread, if any.
    static CURRENT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The index of the arbiter this thread runs, when it is one.
pub fn current() -> Option<usize> {
    CURRENT.get()
}

/// The arbiters and the actix system that owns them.
pub struct Shards {
    handles: Vec<ArbiterHandle>,
    /// Live session actors per arbiter (started minus stopped).
    actors: Vec<std::sync::atomic::AtomicI64>,
    system: System,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Shards {
    /// A session actor started (`+1`) or stopped (`-1`) on arbiter `index`.
    pub fn count_actor(&self, index: usize, delta: i64) {
        if let Some(count) = self.actors.get(index) {
            count.fetch_add(delta, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Live session actors per arbiter.
    pub fn actor_counts(&self) -> Vec<i64> {
        self.actors
            .iter()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }

    /// Starts an actix system on its own thread with `count` arbiters.
    pub fn start(count: usize) -> Self {
        let count = count.max(1);
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("actix-system".into())
            .spawn(move || {
                let runner = actix_rt::System::new();
                let arbiters: Vec<Arbiter> =
                    runner.block_on(async { (0..count).map(|_| Arbiter::new()).collect() });
                let handles = arbiters.iter().map(Arbiter::handle).collect::<Vec<_>>();
                // Runs before anything else sent to each arbiter.
                for (index, handle) in handles.iter().enumerate() {
                    handle.spawn_fn(move || CURRENT.set(Some(index)));
                }
                // The receiver waits right below; it only goes away if the
                // starting thread panicked, and then nobody needs the handles.
                let _ = tx.send((System::current(), handles));
                if let Err(e) = runner.run() {
                    tracing::error!(error = %e, "actix system stopped with an error");
                }
                for arbiter in arbiters {
                    arbiter.stop();
                    let _ = arbiter.join();
                }
            })
            // Failing to spawn a thread at start-up leaves nothing to run on.
            .expect("spawning the actix system thread");
        // The thread sends before doing anything that could fail.
        let (system, handles) = rx.recv().expect("actix system thread reports its arbiters");
        Shards {
            actors: (0..handles.len())
                .map(|_| std::sync::atomic::AtomicI64::new(0))
                .collect(),
            handles,
            system,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are no shards (never: at least one is started).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Every arbiter, in index order.
    pub fn arbiters(&self) -> &[ArbiterHandle] {
        &self.handles
    }

    /// The arbiter for shard `index`.
    pub fn arbiter(&self, index: usize) -> &ArbiterHandle {
        &self.handles[index % self.handles.len()]
    }

    /// The shard a key belongs to (FNV-1a: cheap, stable, well spread for ids).
    pub fn index_of(&self, key: &[u8]) -> usize {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for &byte in key {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        (hash % self.handles.len() as u64) as usize
    }

    /// Stops every arbiter and the system, and waits for their threads.
    /// Must not be called from an arbiter thread (it would wait for itself).
    pub fn stop(&self) {
        self.system.stop();
        // A poisoned lock means a previous stop panicked; the thread handle
        // is still valid to take.
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}
