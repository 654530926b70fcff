//! The domain model: sessions, tool statistics, ids, time and the domain error.
//!
//! Nothing here knows about actors, storage or HTTP; every function is pure
//! and takes the current time as an argument, so expiry rules are tested
//! without clocks.

pub mod audit;
pub mod client_text;
pub mod error;
pub mod ids;
pub mod session;
pub mod time;
pub mod tool;

pub use audit::{AuditAction, AuditEntry, Requester};
pub use client_text::ClientText;
pub use error::SessionError;
pub use session::{ClientType, Session, SessionView, Status, Transition};
pub use time::Millis;
pub use tool::{DurationStats, ToolExecution, ToolStats};
