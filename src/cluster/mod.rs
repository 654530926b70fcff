//! The cluster: several nodes on one PostgreSQL, which decides who owns
//! which sessions (issue 12, contract: "Cluster" in API.md).
//!
//! This is its first part: membership and shard ownership. The engine does
//! not use it yet; `[cluster]` in the config comes with the parts that
//! serve calls (ownership of session actors, forwarding, hand-over).
//!
//! # Design
//!
//! No consensus of our own: PostgreSQL, already the system of record, holds
//! a row per node (heartbeat) and a row per shard (owner, epoch, lease
//! expiry), as Orleans's SQL membership provider keeps a table of silos.
//! - **Shards.** A fixed number of virtual shards (`cluster.shards`,
//!   default 256); a session's shard is a stable hash of its tenant id and
//!   session id ([`placement::shard_of`]). 256 shards spread over three
//!   nodes within about a tenth of an even share (85 each, give or take 8),
//!   and keep the per-round work (one row each) small.
//! - **Who should own a shard** is rendezvous hashing over the live members
//!   ([`placement::desired_owner`]): every node computes the same answer
//!   from the member list alone, and a join or a leave moves only about
//!   1/N of the shards.
//! - **Who does own it** is PostgreSQL's shard row: a node takes a shard
//!   only when its lease is free or has run out, with a compare-and-set
//!   that bumps the shard's epoch ([`registry::acquire`]). Leases run on
//!   PostgreSQL's clock, so the nodes' clocks need not agree with it or
//!   with each other; the protocol assumes only that the clocks run at
//!   about the same rate and that the database's is not stepped while
//!   leases run (see [`member`]).
//! - **Fencing.** Every transaction that writes a shard's sessions checks,
//!   in the same transaction, that this node still holds the shard at its
//!   epoch with a running lease, and locks the row against a change of
//!   hands until it commits ([`registry::fence`]). A node that was frozen
//!   past its lease and wakes up finds the epoch moved on and writes
//!   nothing: Kleppmann's fencing tokens, with the epoch as the token.
//! - **Rounds.** Each node runs a round a quarter of a lease apart
//!   ([`member::Member::run`]): renew, take, hand over, then heartbeat.
//!   A shard counts as held for 0.9 of a lease after its renewal was sent,
//!   so two rounds in a row may fail without costing it; a third costs it.
//!
//! # Timing
//!
//! `cluster.lease_seconds` (default 5 s) is both the heartbeat's and the
//! lease's length. A node that stops answering (killed, frozen, cut off,
//! or reaching PostgreSQL but failing its rounds) loses its shards when
//! their leases run out, at most a lease after its last successful round,
//! and stops counting as a member then too (its heartbeat is the last step
//! of a successful round); the desired owners take them at their next
//! round. **Failure detection:** at most a lease plus a round (5 + 1.25 s
//! by default) from the last successful round of the lost node; a node
//! that leaves cleanly releases its shards at once, and they are taken
//! within a round.
//!
//! # Hand-over
//!
//! A shard whose desired owner is another live member is handed over in
//! two rounds: the first asks the [`member::ShardOwner`] (the engine) to
//! drain it (stop taking calls for it, let what it acknowledged be
//! committed) and keeps renewing the lease meanwhile; the first round after
//! the drain ends releases it, and the new owner takes it at its next
//! round. A clean stop drains every shard the same way (for at most a
//! lease), then releases them all in one transaction.
//!
//! # Not yet here
//!
//! `serve` does not run a cluster yet: the engine's side of
//! [`member::ShardOwner`], forwarding, and `[cluster]` in the config come
//! next. The fenced batch
//! ([`crate::persist::postgres::LaneConnection::ship_fenced`]) checks the
//! shards its caller names; naming every shard a batch writes for
//! (executions and audit rows carry only a session's row id) is the
//! caller's part.

pub mod member;
pub mod ownership;
pub mod placement;
pub mod quota;
pub mod registry;

pub use member::{Member, MemberConfig, Round, ShardOwner, View};
pub use ownership::{Ownership, Stage, Tenure};
pub use quota::Quota;
pub use registry::RegistryError;
