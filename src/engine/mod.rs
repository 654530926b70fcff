//! The session engine: actors in memory, durable through write-behind.
//!
//! # Placement
//!
//! There is one actix arbiter per core ([`shards`]). Each tenant's
//! supervisor lives on the arbiter its tenant id hashes to; by default each
//! session's actor lives on the arbiter its *session id* hashes to
//! (`engine.placement = "session"`). Spreading sessions by id rather than
//! keeping them on their tenant's arbiter (`"tenant"`) lets one busy tenant
//! use every core (a single edge platform is often one big tenant). A
//! create is admitted on the handler's thread against the tenant's atomic
//! live count ([`tenant`]) and its actor started on its arbiter without
//! waiting for it, so neither a create nor a call on a session waits for
//! more than one other thread; the supervisor is off the request path.
//!
//! Measured (`benches/engine.rs`, one tenant, 2 cores, 256 in flight):
//! `session` placement 126 k creates/s and 470 k gets/s, `tenant` placement
//! 142 k and 579 k. On two cores the tenant's own arbiter wins because the
//! callers occupy the other core anyway; the default stays `session` because
//! `tenant` caps a tenant at one core whatever the machine has (see
//! `docs/benchmarks.md`).
//!
//! # The hop
//!
//! An HTTP handler runs on the tokio runtime, looks the session up in its
//! tenant's `DashMap` directory (no lock held across the await) and sends one
//! actix message. An actix send to a sleeping thread costs ~20 µs of wake-up;
//! under load the arbiters are busy and messages queue without wake-ups, so
//! throughput comes from many requests in flight, not from a faster hop.
//! `benches/engine.rs` measures both (sequential and concurrent).
//!
//! # Layout
//!
//! This file is the front door only: the modules and what they export.
//! - [`Engine`] and the plumbing every call goes through (`handle`); what it
//!   starts from ([`config`]); starting and stopping it (`lifecycle`);
//!   the calls that change a session (`commands`) and those that read one
//!   (`reads`, [`queries`] for lists and tenant figures); what operators
//!   do across tenants ([`operator`]); live figures
//!   (`figures`, [`stats`]);
//! - what actors and the front door share (`shared`), and what a
//!   durability outcome means for a caller (`outcome`);
//! - the actors: [`session`] and [`tenant`], on the arbiters of [`shards`];
//!   admission of a create ([`admission`]), start-up [`recovery`], the
//!   [`sweep`]; the sessions' deadlines, kept per arbiter (`deadlines`).

mod cluster;
mod commands;
pub mod config;
mod deadlines;
mod figures;
mod handle;
mod lifecycle;
mod outcome;
mod reads;
pub(crate) mod shared;

pub mod admission;
pub mod operator;
pub mod queries;
pub mod recovery;
pub mod session;
pub mod shards;
pub mod stats;
pub mod sweep;
pub mod tenant;

#[cfg(test)]
mod tests;

pub use admission::{NewSession, SessionDefaults, TenantLimits};
pub use cluster::EngineShards;
pub use config::{EngineConfig, PostgresTier};
pub use handle::Engine;
pub use operator::Selection;
pub use queries::{ListQuery, Page, TenantMetrics};
pub use shared::Directory;
