//! Deadlines kept in buckets of [`TICK`] per arbiter, instead of one tokio
//! timer per session.
//!
//! Every live session has one expiry deadline armed at all times. Armed
//! through actix's `run_later`, each was a boxed future holding a tokio
//! `Sleep`: about 128 bytes per session, for a deadline that is usually
//! hours away and a precision nobody needs (a session that is overdue is
//! already refused by every call; the timer only makes the expiry happen,
//! with its audit row and push, when nobody calls). Here a deadline is one
//! entry in a `Vec` of its tick's bucket: the session actor keeps this
//! arbiter's [`Wheel`] of weak addresses, 8 bytes each, and one task per
//! arbiter takes the due buckets every tick and tells their sessions (see
//! `session.rs`).
//!
//! Entries are never removed before they are due. A session re-armed for
//! an earlier deadline leaves its later entry behind, and a session that
//! ended leaves its entry too (its weak address no longer upgrades); the
//! receiver ignores an entry when the deadline it is armed for is not due.
//! Deadlines only move earlier on `idle -> active` (see `session.rs`), and
//! a session that cycles between the two re-arms for the same expiry each
//! time: [`Wheel::insert_once`] keeps one entry of it.
//!
//! Precision: an entry fires at the first tick at or after its instant, at
//! most [`TICK`] late (plus the arbiter's queue), never early.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Width of a bucket, and how often a wheel is looked at.
pub const TICK: Duration = Duration::from_millis(50);

/// An instant on the monotonic clock in 4 bytes: whole [`TICK`]s since a
/// process-wide origin, so 6.8 years of ticks. A [`Wheel`]'s buckets are
/// ticks, and a session remembers the tick of the bucket its deadline went
/// into (16 bytes as an `Option<Instant>`: every byte of a session's actor
/// counts, see the size test in `session.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tick(NonZeroU32);

impl Tick {
    /// Where ticks count from: their first use in this process.
    fn origin() -> Instant {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        *ORIGIN.get_or_init(Instant::now)
    }

    /// The first tick at or after `at`: the bucket of a deadline at `at`.
    /// Instants before the origin, and past 6.8 years of it, are clamped to
    /// the first and the last tick (after 6.8 years of uptime every
    /// deadline comes at once and the session arms it again, not due).
    pub fn of(at: Instant) -> Tick {
        Self::count(at, true)
    }

    /// The last tick at or before `now`: buckets up to it are due.
    fn reached(now: Instant) -> Tick {
        Self::count(now, false)
    }

    fn count(at: Instant, round_up: bool) -> Tick {
        let since = at.saturating_duration_since(Self::origin()).as_nanos();
        let ticks = if round_up {
            since.div_ceil(TICK.as_nanos())
        } else {
            since / TICK.as_nanos()
        };
        // Counted from 1, so that `Option<Tick>` takes 4 bytes too.
        let ticks = u32::try_from(ticks.saturating_add(1)).unwrap_or(u32::MAX);
        Tick(NonZeroU32::new(ticks).unwrap_or(NonZeroU32::MIN))
    }
}

/// Items due at instants, in buckets of one [`Tick`].
#[derive(Debug)]
pub struct Wheel<T> {
    /// Items by the tick they are due at.
    buckets: BTreeMap<Tick, Vec<T>>,
}

impl<T> Default for Wheel<T> {
    fn default() -> Self {
        Wheel {
            buckets: BTreeMap::new(),
        }
    }
}

impl<T> Wheel<T> {
    /// Adds `item`, due at `at` (an instant before the origin is due at
    /// once), unless it is in that bucket already.
    ///
    /// A session that turns active and idle again and again re-arms for
    /// the same expiry each time (its earlier, idle-after deadline came in
    /// between), and would otherwise leave one entry per cycle there. The
    /// bucket is scanned: arming is rare (a create, a status change), and a
    /// bucket holds the deadlines of 50 ms of creates.
    pub fn insert_once(&mut self, at: Instant, item: T)
    where
        T: PartialEq,
    {
        let bucket = self.buckets.entry(Tick::of(at)).or_default();
        if !bucket.contains(&item) {
            bucket.push(item);
        }
    }

    /// Takes every item due at `now`, earliest bucket first.
    pub fn take_due(&mut self, now: Instant) -> impl Iterator<Item = T> {
        let later = match Tick::reached(now).0.checked_add(1) {
            Some(next) => self.buckets.split_off(&Tick(next)),
            None => BTreeMap::new(),
        };
        std::mem::replace(&mut self.buckets, later)
            .into_values()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn ticks_round_up_and_keep_the_order() {
        let origin = Tick::origin();
        assert_eq!(Tick::of(origin + ms(101)), Tick::of(origin + ms(150)));
        assert!(Tick::of(origin + ms(151)) > Tick::of(origin + ms(150)));
        assert!(Tick::of(origin + ms(100)) < Tick::of(origin + ms(101)));
        assert!(Tick::of(origin + ms(120_000)) > Tick::of(origin + ms(60_000)));
        // Far instants are clamped, not wrapped.
        let far = origin + Duration::from_secs(20 * 365 * 24 * 3600);
        assert!(Tick::of(far) > Tick::of(origin + ms(3_600_000)));
    }

    #[test]
    fn an_item_is_due_at_the_first_tick_at_or_after_it_never_before() {
        let origin = Tick::origin();
        let mut wheel = Wheel::default();
        wheel.insert_once(origin + ms(120), "a"); // tick 3 (150 ms)
        wheel.insert_once(origin + ms(100), "b"); // tick 2 exactly
        wheel.insert_once(origin + ms(30), "c"); // tick 1

        assert_eq!(wheel.take_due(origin + ms(49)).count(), 0);
        assert_eq!(wheel.take_due(origin + ms(50)).collect::<Vec<_>>(), ["c"]);
        assert_eq!(wheel.take_due(origin + ms(99)).count(), 0);
        assert_eq!(wheel.take_due(origin + ms(100)).collect::<Vec<_>>(), ["b"]);
        assert_eq!(wheel.take_due(origin + ms(149)).count(), 0);
        assert_eq!(wheel.take_due(origin + ms(150)).collect::<Vec<_>>(), ["a"]);
        assert_eq!(wheel.take_due(origin + ms(3_600_000)).count(), 0);
    }

    #[test]
    fn a_late_look_takes_every_bucket_due_earliest_first() {
        let origin = Tick::origin();
        let mut wheel = Wheel::default();
        for (i, at) in [900u64, 10, 400, 10_000].into_iter().enumerate() {
            wheel.insert_once(origin + ms(at), i);
        }
        assert_eq!(
            wheel.take_due(origin + ms(1_000)).collect::<Vec<_>>(),
            [1, 2, 0]
        );
        assert_eq!(wheel.take_due(origin + ms(20_000)).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn an_item_already_in_its_bucket_is_kept_once() {
        let origin = Tick::origin();
        let mut wheel = Wheel::default();
        wheel.insert_once(origin + ms(1_010), 'a');
        wheel.insert_once(origin + ms(1_020), 'a'); // the same bucket
        wheel.insert_once(origin + ms(1_020), 'b');
        wheel.insert_once(origin + ms(2_000), 'a'); // another bucket
        assert_eq!(
            wheel.take_due(origin + ms(1_050)).collect::<Vec<_>>(),
            ['a', 'b']
        );
        assert_eq!(
            wheel.take_due(origin + ms(2_000)).collect::<Vec<_>>(),
            ['a']
        );
    }

    #[test]
    fn an_instant_before_the_origin_is_due_at_once() {
        let origin = Tick::origin();
        let mut wheel = Wheel::default();
        let before = origin
            .checked_sub(ms(400))
            .expect("the machine has been up for 400 ms");
        wheel.insert_once(before, 7);
        assert_eq!(wheel.take_due(origin).collect::<Vec<_>>(), [7]);
    }
}
