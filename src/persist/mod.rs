//! Durable state: the sled store, its key layout and record format, and the
//! write-behind queue that batches changes into group commits.
//!
//! A change travels: actor -> [`WriteBehind::submit`] (a channel send) ->
//! the flusher thread, which gathers whatever is queued into one [`log`]
//! record, appends it, fsyncs once, adds it to the [`overlay`] that reads
//! see, and then wakes every waiter of that batch. The [`checkpoint`]
//! thread folds the overlay into [`sled`] about once a second and deletes
//! the log segments nothing needs any more.
//!
//! With the PostgreSQL tier on, the log is also the [`outbox`]: the
//! [`shipper`] reads it and commits its entries to [`postgres`].
//!
//! # Threads
//!
//! - `write-behind`: the flusher; the only writer of the log. It wakes per
//!   group commit, not per change.
//! - `checkpoint`: wakes once a second (or when the overlay grows large) to
//!   write sled; idle when nothing changed.
//! - `outbox-shipper` (PostgreSQL tier only): its own current-thread tokio
//!   runtime, so PostgreSQL never sits on a request's path.
//! - sled's own background threads (its flusher is off: we fsync).

pub mod backup;
pub mod checkpoint;
pub mod executions;
pub mod keys;
pub mod log;
pub mod outbox;
pub mod overlay;
pub mod postgres;
pub mod record;
pub mod session_filter;
pub mod shipper;
pub mod sled;
pub mod write_behind;

pub use self::sled::{Store, StoreError};
pub use write_behind::{Durable, Shipping, WriteBehind, WriteBehindStats, WriteOp};
