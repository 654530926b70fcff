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
//! Keys are never removed (a purged session's key stays set), and the size
//! is fixed: 2^24 bits (2 MiB), four probes. With a million keys about
//! 0.2 % of new ids are looked up anyway, with two million 2 %, with four
//! million 14 %; the filter starts afresh at every start.

use std::hash::Hasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// log2 of the filter's size in bits.
const BITS_LOG2: u32 = 24;
/// Bits set (and tested) per key.
const PROBES: u64 = 4;

/// The filter; shared by every handle of the store.
pub struct SessionFilter {
    words: Box<[AtomicU64]>,
    /// Whether every key on disk has been added (see the module docs).
    complete: AtomicBool,
}

impl Default for SessionFilter {
    fn default() -> Self {
        SessionFilter {
            words: (0..1usize << (BITS_LOG2 - 6))
                .map(|_| AtomicU64::new(0))
                .collect(),
            complete: AtomicBool::new(false),
        }
    }
}

impl SessionFilter {
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

    /// Adds a session key.
    pub fn insert(&self, key: &[u8]) {
        for bit in Self::probes(key) {
            self.words[bit / 64].fetch_or(1 << (bit % 64), Ordering::Relaxed);
        }
    }

    /// Whether the store may hold `key`: `false` only when it cannot.
    pub fn may_contain(&self, key: &[u8]) -> bool {
        if !self.complete.load(Ordering::Acquire) {
            return true;
        }
        Self::probes(key)
            .all(|bit| self.words[bit / 64].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0)
    }

    /// Every key on disk has been added: "absent" answers may be given.
    pub fn mark_complete(&self) {
        self.complete.store(true, Ordering::Release);
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
}
