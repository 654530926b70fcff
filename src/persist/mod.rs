//! Durable state: the sled store, its key layout and record format, and the
//! write-behind queue that batches changes into group commits.
//!
//! A change travels: actor -> [`WriteBehind::submit`] (a channel send) ->
//! the flusher thread, which gathers whatever is queued into one sled batch,
//! applies it, fsyncs once, and then wakes every waiter of that batch.
//!
//! With the PostgreSQL tier on, the same batch appends a copy of each record
//! to the [`outbox`], and the [`shipper`] drains it into [`postgres`].

pub mod keys;
pub mod outbox;
pub mod postgres;
pub mod record;
pub mod shipper;
pub mod sled;
pub mod write_behind;

pub use self::sled::{Store, StoreError};
pub use write_behind::{Durable, Shipping, WriteBehind, WriteBehindStats, WriteOp};
