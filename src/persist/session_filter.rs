//! Which session keys the store may hold: a Bloom filter, so that a create
//! with a client-chosen id does not read the store to learn that the id is
//! new (nearly always).
//!
//! A create must answer 409 for an id whose final record is still retained,
//! so before this filter every create that named its id looked the key up
//! in the overlay and in sled: about a tenth of the serving thread's time
//! per create, with sled's epoch garbage (nodes the checkpoint replaced)
//! collected on the serving thread as a side effect of the read.
//!
//! The filter never answers "absent" for a key the store holds: every
//! session key is added before it becomes visible (the overlay, a rebuild
//! from PostgreSQL, a restored backup), and the keys already on disk are
//! added by the first complete walk of the session records (recovery
//! makes one at every start). Until that walk has finished it answers
//! "maybe" for every key. A false "maybe" costs the look-up it saves.
//!
//! The size is fixed: 2^24 bits (2 MiB), four probes. With a million keys
//! about 0.2 % of new ids are looked up anyway, with two million 2 %, with
//! four million 14 %. Keys cannot be removed from a Bloom filter, so a
//! purged session's key stays set; once the keys added since the last walk
//! pass [`REBUILD_AFTER`] and twice the keys that walk found, the sweep
//! rebuilds the filter from another walk ([`super::Store::rebuild_session_filter`]):
//! a new filter takes every insert from the walk's start on, and replaces
//! the old one when the walk ends.

use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// log2 of the filter's size in bits.
const BITS_LOG2: u32 = 24;
/// Bits set (and tested) per key.
const PROBES: u64 = 4;
/// New keys since the last walk below which no rebuild is due.
pub const REBUILD_AFTER: u64 = 1 << 20;

/// The filter; shared by every handle of the store.
#[derive(Default)]
pub struct SessionFilter {
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    /// What [`SessionFilter::may_contain`] answers from.
    answers: Arc<Bits>,
    /// A rebuild's filter: takes every insert as well until it replaces
    /// `answers`.
    next: Option<Arc<Bits>>,
    /// Whether every key on disk is in `answers` (see the module docs).
    complete: bool,
    /// Keys the last complete walk found.
    walked: u64,
}

struct Bits {
    words: Box<[AtomicU64]>,
    /// Keys that set at least one bit (about the distinct keys added).
    new_keys: AtomicU64,
}

impl Default for Bits {
    fn default() -> Self {
        Bits {
            words: (0..1usize << (BITS_LOG2 - 6))
                .map(|_| AtomicU64::new(0))
                .collect(),
            new_keys: AtomicU64::new(0),
        }
    }
}

impl Bits {
    /// The bit positions of `key`: double hashing of one 64-bit hash.
    fn probes(key: &[u8]) -> impl Iterator<Item = usize> {
        // SipHash with fixed keys: ids are chosen by clients, but a crafted
        // collision only costs a look-up, which is what every create did
        // before.
        let mut hasher = std::hash::DefaultHasher::new();
        hasher.write(key);
        let hash = hasher.finish();
        let (first, step) = (hash, (hash >> 32) | 1);
        let mask = (1u64 << BITS_LOG2) - 1;
        (0..PROBES).map(move |i| (first.wrapping_add(i.wrapping_mul(step)) & mask) as usize)
    }

    fn insert(&self, key: &[u8]) {
        let mut new = false;
        for bit in Self::probes(key) {
            let mask = 1 << (bit % 64);
            new |= self.words[bit / 64].fetch_or(mask, Ordering::Relaxed) & mask == 0;
        }
        if new {
            self.new_keys.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn contains(&self, key: &[u8]) -> bool {
        Self::probes(key)
            .all(|bit| self.words[bit / 64].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0)
    }
}

impl SessionFilter {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        // Every change under the lock is a plain assignment: a panic
        // cannot leave it half done, so poisoning is ignored.
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a session key (to a rebuild's filter too).
    pub fn insert(&self, key: &[u8]) {
        let state = self.read();
        state.answers.insert(key);
        if let Some(next) = &state.next {
            next.insert(key);
        }
    }

    /// Whether the store may hold `key`: `false` only when it cannot.
    pub fn may_contain(&self, key: &[u8]) -> bool {
        let state = self.read();
        !state.complete || state.answers.contains(key)
    }

    /// A walk found `walked` keys, every key on disk among them: "absent"
    /// answers may be given.
    pub fn mark_complete(&self, walked: u64) {
        let mut state = self.write();
        state.complete = true;
        state.walked = walked;
    }

    /// Whether enough keys were added since the last walk to rebuild.
    pub fn rebuild_due(&self) -> bool {
        let state = self.read();
        let added = state.answers.new_keys.load(Ordering::Relaxed);
        state.complete
            && state.next.is_none()
            && added >= REBUILD_AFTER.max(state.walked.saturating_mul(2))
    }

    /// Starts a rebuild: from now on every insert goes to a new filter as
    /// well, which the walk that follows fills with the keys on disk.
    pub fn begin_rebuild(&self) {
        self.write().next = Some(Arc::default());
    }

    /// Adds a key the rebuild's walk found (to the new filter only).
    pub fn insert_walked(&self, key: &[u8]) {
        if let Some(next) = &self.read().next {
            next.insert(key);
        }
    }

    /// The rebuild's walk found `walked` keys and reached its end: the new
    /// filter answers from now on.
    pub fn finish_rebuild(&self, walked: u64) {
        let mut state = self.write();
        if let Some(next) = state.next.take() {
            // Counted afresh: what is added from here on.
            next.new_keys.store(0, Ordering::Relaxed);
            state.answers = next;
            state.walked = walked;
        }
    }

    /// The rebuild's walk failed: the old filter goes on answering.
    pub fn abort_rebuild(&self) {
        self.write().next = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> Vec<u8> {
        format!("S-6f1c0d3e-8a4b-4c6e-9f10-2b3c4d5e6f70-session-{i}").into_bytes()
    }

    #[test]
    fn every_key_added_is_found_and_few_others_are() {
        let filter = SessionFilter::default();
        for i in 0..200_000 {
            filter.insert(&key(i));
        }
        // Until the keys on disk are all in, every key may be there.
        assert!(filter.may_contain(&key(1_000_000)));
        filter.mark_complete(0);
        assert!((0..200_000).all(|i| filter.may_contain(&key(i))));
        let false_positives = (1_000_000..1_200_000)
            .filter(|i| filter.may_contain(&key(*i)))
            .count();
        // About one expected: (1 - e^(-4 * 200k / 2^24))^4 * 200k.
        assert!(false_positives < 100, "{false_positives} false positives");
    }

    #[test]
    fn a_rebuild_forgets_keys_its_walk_did_not_find_and_keeps_those_added_meanwhile() {
        let filter = SessionFilter::default();
        let (kept, purged, during) = (key(1), key(2), key(3));
        filter.insert(&kept);
        filter.insert(&purged);
        filter.mark_complete(2);
        filter.begin_rebuild();
        // Added while the walk runs: the new filter has it too.
        filter.insert(&during);
        filter.insert_walked(&kept);
        // Until the walk ends the old filter answers.
        assert!(filter.may_contain(&purged));
        filter.finish_rebuild(1);
        assert!(filter.may_contain(&kept));
        assert!(filter.may_contain(&during));
        assert!(!filter.may_contain(&purged));
        // An aborted rebuild changes nothing.
        filter.begin_rebuild();
        filter.abort_rebuild();
        assert!(filter.may_contain(&kept));
        filter.insert_walked(&purged);
        assert!(!filter.may_contain(&purged));
    }

    #[test]
    fn a_rebuild_is_due_after_many_new_keys_and_twice_the_last_walk() {
        let filter = SessionFilter::default();
        let bits = filter.read().answers.clone();
        bits.new_keys.store(REBUILD_AFTER, Ordering::Relaxed);
        // Not before the first complete walk.
        assert!(!filter.rebuild_due());
        filter.mark_complete(REBUILD_AFTER);
        assert!(!filter.rebuild_due(), "fewer than twice the walked keys");
        bits.new_keys.store(2 * REBUILD_AFTER, Ordering::Relaxed);
        assert!(filter.rebuild_due());
        filter.begin_rebuild();
        assert!(!filter.rebuild_due(), "one rebuild at a time");
        filter.finish_rebuild(10);
        assert!(!filter.rebuild_due(), "counted afresh");
    }
}
