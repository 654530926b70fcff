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
//! The size is fixed: 2^24 bits (2 MiB), four probes. By the usual
//! estimate, (1 - e^(-4n/2^24))^4, with a million keys about 0.2 % of new
//! ids are looked up anyway, with two million 2 %, with four million 14 %. Keys cannot be removed from a Bloom filter, so a
//! purged session's key stays set. Once [`REBUILD_FILL`] of the bits are
//! set (about two million keys; 2 % of new ids read) and at least twice as
//! many as right after the last walk, the sweep rebuilds the filter from
//! another walk ([`super::Store::rebuild_session_filter`]): a new filter
//! takes every insert from the walk's start on, and replaces the old one
//! when the walk ends. One rebuild runs at a time.

use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// log2 of the filter's size in bits.
const BITS_LOG2: u32 = 24;
/// Bits set (and tested) per key.
const PROBES: u64 = 4;
/// Share of the bits set (3/8) from which a rebuild may be due: about two
/// million keys, where 2 % of absent keys read as "maybe".
pub const REBUILD_FILL: (u64, u64) = (3, 8);

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
    /// Bits of `answers` set when the last walk ended.
    set_at_walk: u64,
}

struct Bits {
    words: Box<[AtomicU64]>,
    /// Bits set.
    set: AtomicU64,
}

impl Default for Bits {
    fn default() -> Self {
        Bits {
            words: (0..1usize << (BITS_LOG2 - 6))
                .map(|_| AtomicU64::new(0))
                .collect(),
            set: AtomicU64::new(0),
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
        for bit in Self::probes(key) {
            let mask = 1 << (bit % 64);
            if self.words[bit / 64].fetch_or(mask, Ordering::Relaxed) & mask == 0 {
                self.set.fetch_add(1, Ordering::Relaxed);
            }
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

    /// A walk reached its end, every key on disk among those it added:
    /// "absent" answers may be given.
    pub fn mark_complete(&self) {
        let mut state = self.write();
        state.complete = true;
        state.set_at_walk = state.answers.set.load(Ordering::Relaxed);
    }

    /// Whether the filter is full enough, and fuller enough than after the
    /// last walk, for a rebuild to pay (see the module docs).
    pub fn rebuild_due(&self) -> bool {
        let state = self.read();
        let set = state.answers.set.load(Ordering::Relaxed);
        let (num, den) = REBUILD_FILL;
        state.complete
            && state.next.is_none()
            && set >= (1u64 << BITS_LOG2) * num / den
            && set >= state.set_at_walk.saturating_mul(2)
    }

    /// Starts a rebuild: from now on every insert goes to a new filter as
    /// well, which the walk that follows fills with the keys on disk.
    /// Answers `false`, changing nothing, while another rebuild runs.
    pub fn begin_rebuild(&self) -> bool {
        let mut state = self.write();
        if state.next.is_some() {
            return false;
        }
        state.next = Some(Arc::default());
        true
    }

    /// Adds a key the rebuild's walk found (to the new filter only).
    pub fn insert_walked(&self, key: &[u8]) {
        if let Some(next) = &self.read().next {
            next.insert(key);
        }
    }

    /// The rebuild's walk reached its end: the new filter answers from now
    /// on.
    pub fn finish_rebuild(&self) {
        let mut state = self.write();
        if let Some(next) = state.next.take() {
            state.set_at_walk = next.set.load(Ordering::Relaxed);
            state.answers = next;
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
        filter.mark_complete();
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
        filter.mark_complete();
        assert!(filter.begin_rebuild());
        assert!(!filter.begin_rebuild(), "one rebuild at a time");
        // Added while the walk runs: the new filter has it too.
        filter.insert(&during);
        filter.insert_walked(&kept);
        // Until the walk ends the old filter answers.
        assert!(filter.may_contain(&purged));
        filter.finish_rebuild();
        assert!(filter.may_contain(&kept));
        assert!(filter.may_contain(&during));
        assert!(!filter.may_contain(&purged));
        // An aborted rebuild changes nothing.
        assert!(filter.begin_rebuild());
        filter.abort_rebuild();
        assert!(filter.may_contain(&kept));
        filter.insert_walked(&purged);
        assert!(!filter.may_contain(&purged));
    }

    #[test]
    fn a_rebuild_is_due_once_the_filter_fills_and_doubles_since_the_last_walk() {
        let filter = SessionFilter::default();
        let bits = filter.read().answers.clone();
        let (num, den) = REBUILD_FILL;
        let full = (1u64 << BITS_LOG2) * num / den;
        bits.set.store(full / 2, Ordering::Relaxed);
        // Not before the first complete walk.
        assert!(!filter.rebuild_due());
        filter.mark_complete();
        bits.set.store(full - 1, Ordering::Relaxed);
        assert!(!filter.rebuild_due(), "not full enough");
        bits.set.store(full, Ordering::Relaxed);
        assert!(filter.rebuild_due());
        assert!(filter.begin_rebuild());
        assert!(!filter.rebuild_due(), "one rebuild at a time");
        // The walk found much: the new filter starts three quarters full,
        // and another rebuild waits until it is twice that (never, here).
        filter
            .read()
            .next
            .as_ref()
            .unwrap()
            .set
            .store(full * 2, Ordering::Relaxed);
        filter.finish_rebuild();
        assert!(!filter.rebuild_due());
    }
}
