//! Changes that are in the log but not yet in sled, kept in memory so that
//! reads see them.
//!
//! The flusher adds each group commit here once its log record is on disk
//! (never before: a change whose write failed must not become visible).
//! The checkpointer freezes the current layer, writes it into sled, and
//! drops it once sled has it on disk. Reads look at the active layer, then
//! the frozen one, then sled: the newest value of a key wins, and a
//! removal hides what sled still holds.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use sled::IVec;

/// A key's newest change: a value, or `None` for a removal.
pub type Change = Option<IVec>;

/// One layer of changes, ordered by key.
pub type Layer = BTreeMap<IVec, Change>;

#[derive(Default)]
struct Layers {
    active: Layer,
    /// Approximate bytes of keys and values in `active`.
    active_bytes: usize,
    /// The last log record whose changes are in `active` (or earlier).
    active_through: u64,
    frozen: Option<(Arc<Layer>, u64)>,
    /// The last log record whose changes are in sled.
    checkpointed: u64,
}

/// The overlay; shared by the flusher, the checkpointer and readers.
#[derive(Default)]
pub struct Overlay {
    layers: RwLock<Layers>,
}

/// What the overlay knows about a key.
#[derive(Debug, PartialEq)]
pub enum Lookup {
    /// Nothing: sled has the answer.
    Unknown,
    /// Its newest change.
    Changed(Change),
}

impl Overlay {
    fn read(&self) -> RwLockReadGuard<'_, Layers> {
        // Writers only insert into maps and swap layers; a panic midway
        // leaves them usable, so poisoning is ignored.
        self.layers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Layers> {
        self.layers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds the changes of log record `seq`.
    pub fn apply<'a>(
        &self,
        seq: u64,
        changes: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) {
        let mut layers = self.write();
        for (key, value) in changes {
            layers.active_bytes += key.len() + value.map_or(0, <[u8]>::len) + 64;
            layers.active.insert(IVec::from(key), value.map(IVec::from));
        }
        layers.active_through = layers.active_through.max(seq);
    }

    /// The newest change of `key`.
    pub fn get(&self, key: &[u8]) -> Lookup {
        let layers = self.read();
        if let Some(change) = layers.active.get(key) {
            return Lookup::Changed(change.clone());
        }
        match &layers.frozen {
            Some((frozen, _)) => frozen
                .get(key)
                .map_or(Lookup::Unknown, |c| Lookup::Changed(c.clone())),
            None => Lookup::Unknown,
        }
    }

    /// Every change of a key in `[start, end)` (or from `start` on),
    /// newest layer winning, in key order.
    pub fn range(&self, start: &[u8], end: Option<&[u8]>) -> Vec<(IVec, Change)> {
        let layers = self.read();
        let bounds = (
            Bound::Included(start),
            end.map_or(Bound::Unbounded, Bound::Excluded),
        );
        let mut merged: BTreeMap<IVec, Change> = BTreeMap::new();
        if let Some((frozen, _)) = &layers.frozen {
            for (k, v) in frozen.range::<[u8], _>(bounds) {
                merged.insert(k.clone(), v.clone());
            }
        }
        for (k, v) in layers.active.range::<[u8], _>(bounds) {
            merged.insert(k.clone(), v.clone());
        }
        merged.into_iter().collect()
    }

    /// Whether no change is held.
    pub fn is_empty(&self) -> bool {
        let layers = self.read();
        layers.active.is_empty() && layers.frozen.is_none()
    }

    /// Approximate bytes held by the active layer.
    pub fn active_bytes(&self) -> usize {
        self.read().active_bytes
    }

    /// Freezes the active layer for a checkpoint: answers it and the last
    /// log record it covers, or `None` when sled is up to date. A layer
    /// frozen before and not yet released (its checkpoint failed) is
    /// answered again.
    pub fn freeze(&self) -> Option<(Arc<Layer>, u64)> {
        let mut layers = self.write();
        if let Some(frozen) = &layers.frozen {
            return Some(frozen.clone());
        }
        // Records without local changes (audit rows) still move the mark.
        if layers.active.is_empty() && layers.active_through <= layers.checkpointed {
            return None;
        }
        let frozen = Arc::new(std::mem::take(&mut layers.active));
        layers.active_bytes = 0;
        let through = layers.active_through;
        layers.frozen = Some((frozen.clone(), through));
        Some((frozen, through))
    }

    /// The frozen layer is in sled, on disk: readers go to sled for it now.
    pub fn release_frozen(&self) {
        let mut layers = self.write();
        if let Some((_, through)) = layers.frozen.take() {
            layers.checkpointed = layers.checkpointed.max(through);
        }
    }
}

/// Merges overlay changes (sorted in the iteration's direction) into a sled
/// iterator: the overlay wins on equal keys; removals hide sled's value.
pub struct Merge<I: Iterator> {
    overlay: std::iter::Peekable<std::vec::IntoIter<(IVec, Change)>>,
    sled: std::iter::Peekable<I>,
    reverse: bool,
}

impl<I> Merge<I>
where
    I: Iterator<Item = sled::Result<(IVec, IVec)>>,
{
    /// `overlay` in ascending key order; it is reversed when `reverse`.
    pub fn new(mut overlay: Vec<(IVec, Change)>, sled: I, reverse: bool) -> Self {
        if reverse {
            overlay.reverse();
        }
        Merge {
            overlay: overlay.into_iter().peekable(),
            sled: sled.peekable(),
            reverse,
        }
    }
}

impl<I> Iterator for Merge<I>
where
    I: Iterator<Item = sled::Result<(IVec, IVec)>>,
{
    type Item = sled::Result<(IVec, IVec)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let take_overlay = match (self.overlay.peek(), self.sled.peek()) {
                (None, None) => return None,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                // An error from sled comes out first.
                (Some(_), Some(Err(_))) => false,
                (Some((ok, _)), Some(Ok((sk, _)))) => {
                    let order = ok.cmp(sk);
                    if order == std::cmp::Ordering::Equal {
                        // The overlay's change replaces sled's value.
                        self.sled.next();
                        true
                    } else {
                        (order == std::cmp::Ordering::Less) != self.reverse
                    }
                }
            };
            if take_overlay {
                let (key, change) = self.overlay.next().expect("peeked");
                match change {
                    Some(value) => return Some(Ok((key, value))),
                    None => continue,
                }
            }
            return self.sled.next();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sled_items(items: &[(&str, &str)]) -> Vec<sled::Result<(IVec, IVec)>> {
        items
            .iter()
            .map(|(k, v)| Ok((IVec::from(k.as_bytes()), IVec::from(v.as_bytes()))))
            .collect()
    }

    #[test]
    fn the_newest_layer_wins_and_removals_hide_sled() {
        let overlay = Overlay::default();
        overlay.apply(1, [(&b"a"[..], Some(&b"1"[..])), (b"b", Some(b"1"))]);
        let (frozen, through) = overlay.freeze().unwrap();
        assert_eq!((frozen.len(), through), (2, 1));
        assert_eq!(overlay.freeze().unwrap().1, 1, "one checkpoint at a time");
        overlay.apply(2, [(&b"b"[..], None), (b"c", Some(&b"2"[..]))]);
        assert_eq!(overlay.get(b"a"), Lookup::Changed(Some(IVec::from(b"1"))));
        assert_eq!(overlay.get(b"b"), Lookup::Changed(None));
        assert_eq!(overlay.get(b"z"), Lookup::Unknown);
        let sled = sled_items(&[("a", "old"), ("b", "old"), ("d", "sled")]);
        let forward: Vec<_> = Merge::new(overlay.range(b"", None), sled.clone().into_iter(), false)
            .map(|r| r.unwrap())
            .collect();
        let keys: Vec<&[u8]> = forward.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(keys, [&b"a"[..], b"c", b"d"]);
        assert_eq!(forward[0].1, IVec::from(b"1"));
        let mut sled_rev = sled;
        sled_rev.reverse();
        let backward: Vec<_> = Merge::new(overlay.range(b"", None), sled_rev.into_iter(), true)
            .map(|r| r.unwrap().0)
            .collect();
        assert_eq!(
            backward,
            [IVec::from(b"d"), IVec::from(b"c"), IVec::from(b"a")]
        );
        overlay.release_frozen();
        assert_eq!(overlay.get(b"a"), Lookup::Unknown);
        assert_eq!(overlay.range(b"b", Some(b"c")).len(), 1);
        overlay.apply(3, []);
        overlay.apply(2, []);
        overlay.release_frozen();
        let (layer, through) = overlay.freeze().unwrap();
        assert_eq!((layer.len(), through), (2, 3));
        overlay.release_frozen();
        assert!(overlay.freeze().is_none(), "sled is up to date");
    }
}
