//! Key layout of the single sled tree.
//!
//! One tree keeps every kind of record so that one `apply_batch` is atomic
//! across a session, its index entry and its executions. A leading tag byte
//! separates the kinds; the tenant id comes next so every scan is per tenant.
//!
//! | tag | key                                              | value            |
//! |-----|--------------------------------------------------|------------------|
//! | `S` | tenant(16) session_id                            | session record   |
//! | `C` | tenant(16) created_at(8, BE) session_id          | empty            |
//! | `E` | session row id(16) seq(8, BE)                     | execution record |
//! | `F` | terminated_at(8, BE) tenant(16) session_id       | empty            |
//! | `M` | name                                             | engine metadata  |
//! | `O` | seq(8, BE)                                       | outbox entry     |
//! | `X` | at(8, BE) seq(8, BE)                             | dead letter      |
//!
//! `O` is the PostgreSQL outbox (only written when the tier is on): every
//! `S` and `E` record written is also appended there, in the same atomic
//! batch, and stays until PostgreSQL has committed it (see
//! [`super::outbox`]). `X` keeps the rare entry PostgreSQL refused for its
//! content (never retried, kept for inspection).
//!
//! `F` lists final sessions by the time they ended, so the retention purge
//! reads only what is due instead of every record. Executions are keyed by
//! the session's row id (a UUID, unique across tenants) rather than tenant
//! and session id: 25-byte keys instead of up to 281 make every insert and
//! comparison cheaper on the hottest write path.

use uuid::Uuid;

use crate::model::Millis;

const TAG_SESSION: u8 = b'S';
const TAG_CREATED: u8 = b'C';
const TAG_EXECUTION: u8 = b'E';
const TAG_FINISHED: u8 = b'F';
const TAG_META: u8 = b'M';
const TAG_OUTBOX: u8 = b'O';
const TAG_DEAD_LETTER: u8 = b'X';

/// Key of an engine-wide value (e.g. the readiness probe's last write).
pub fn meta(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(TAG_META);
    key.extend_from_slice(name.as_bytes());
    key
}

/// Whether `key` is a session record's.
pub fn is_session(key: &[u8]) -> bool {
    key.first() == Some(&TAG_SESSION)
}

/// Whether `key` is an execution record's.
pub fn is_execution(key: &[u8]) -> bool {
    key.len() == 25 && key[0] == TAG_EXECUTION
}

/// Splits an execution key into `(session row id, seq)`.
pub fn parse_execution(key: &[u8]) -> Option<(Uuid, u64)> {
    if !is_execution(key) {
        return None;
    }
    let row = Uuid::from_slice(&key[1..17]).ok()?;
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&key[17..25]);
    Some((row, u64::from_be_bytes(seq)))
}

/// Key of outbox entry number `seq`.
pub fn outbox(seq: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = TAG_OUTBOX;
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// Key of a dead letter: outbox entry `seq`, which PostgreSQL refused at
/// `at` (entry numbers restart when the outbox is empty at start).
pub fn dead_letter(at: Millis, seq: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = TAG_DEAD_LETTER;
    key[1..9].copy_from_slice(&(at.max(0) as u64).to_be_bytes());
    key[9..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// Prefix of the outbox.
pub fn outbox_prefix() -> [u8; 1] {
    [TAG_OUTBOX]
}

/// The sequence number of an outbox key.
pub fn parse_outbox(key: &[u8]) -> Option<u64> {
    if key.len() != 9 || key[0] != TAG_OUTBOX {
        return None;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&key[1..]);
    Some(u64::from_be_bytes(seq))
}

/// Key of a session record.
pub fn session(tenant: Uuid, session_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(17 + session_id.len());
    key.push(TAG_SESSION);
    key.extend_from_slice(tenant.as_bytes());
    key.extend_from_slice(session_id.as_bytes());
    key
}

/// Prefix of every session record.
pub fn all_sessions() -> [u8; 1] {
    [TAG_SESSION]
}

/// Prefix of every execution value (single or chunk).
pub fn all_executions() -> [u8; 1] {
    [TAG_EXECUTION]
}

/// Splits a session key into tenant and session id.
pub fn parse_session(key: &[u8]) -> Option<(Uuid, &str)> {
    if key.len() < 17 || key[0] != TAG_SESSION {
        return None;
    }
    let tenant = Uuid::from_slice(&key[1..17]).ok()?;
    let id = std::str::from_utf8(&key[17..]).ok()?;
    Some((tenant, id))
}

/// Key of a creation-order index entry.
pub fn created(tenant: Uuid, created_at: Millis, session_id: &str) -> Vec<u8> {
    let mut key = created_prefix(tenant);
    key.extend_from_slice(&(created_at.max(0) as u64).to_be_bytes());
    key.extend_from_slice(session_id.as_bytes());
    key
}

/// Prefix of a tenant's creation-order index.
pub fn created_prefix(tenant: Uuid) -> Vec<u8> {
    let mut key = Vec::with_capacity(25 + 64);
    key.push(TAG_CREATED);
    key.extend_from_slice(tenant.as_bytes());
    key
}

/// Splits a creation-order key into `(created_at, session_id)`.
pub fn parse_created(key: &[u8]) -> Option<(Millis, &str)> {
    if key.len() < 25 || key[0] != TAG_CREATED {
        return None;
    }
    let mut at = [0u8; 8];
    at.copy_from_slice(&key[17..25]);
    let id = std::str::from_utf8(&key[25..]).ok()?;
    Some((u64::from_be_bytes(at) as Millis, id))
}

/// Prefix of one session's executions.
pub fn executions_prefix(session_row: Uuid) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = TAG_EXECUTION;
    key[1..].copy_from_slice(session_row.as_bytes());
    key
}

/// Key of one execution; `seq` orders a session's executions.
pub fn execution(session_row: Uuid, seq: u64) -> [u8; 25] {
    let mut key = [0u8; 25];
    key[..17].copy_from_slice(&executions_prefix(session_row));
    key[17..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// Key of a final session in the by-end-time index.
pub fn finished(terminated_at: Millis, tenant: Uuid, session_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(25 + session_id.len());
    key.push(TAG_FINISHED);
    key.extend_from_slice(&(terminated_at.max(0) as u64).to_be_bytes());
    key.extend_from_slice(tenant.as_bytes());
    key.extend_from_slice(session_id.as_bytes());
    key
}

/// Range start of the by-end-time index.
pub fn finished_start() -> [u8; 1] {
    [TAG_FINISHED]
}

/// Splits a by-end-time key into `(terminated_at, tenant, session_id)`.
pub fn parse_finished(key: &[u8]) -> Option<(Millis, Uuid, &str)> {
    if key.len() < 25 || key[0] != TAG_FINISHED {
        return None;
    }
    let mut at = [0u8; 8];
    at.copy_from_slice(&key[1..9]);
    let tenant = Uuid::from_slice(&key[9..25]).ok()?;
    let id = std::str::from_utf8(&key[25..]).ok()?;
    Some((u64::from_be_bytes(at) as Millis, tenant, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let tenant = Uuid::now_v7();
        let key = session(tenant, "abc");
        assert_eq!(parse_session(&key), Some((tenant, "abc")));
        let key = created(tenant, 1_700_000_000_123, "abc");
        assert_eq!(parse_created(&key), Some((1_700_000_000_123, "abc")));
        assert!(key.starts_with(&created_prefix(tenant)));
        let key = finished(42, tenant, "abc");
        assert_eq!(parse_finished(&key), Some((42, tenant, "abc")));
        assert!(finished(41, tenant, "zzz") < key);
    }

    #[test]
    fn executions_sort_by_sequence_within_their_session() {
        let row = Uuid::now_v7();
        assert!(execution(row, 9) < execution(row, 10));
        assert!(execution(row, u64::MAX).starts_with(&executions_prefix(row)));
        assert!(!execution(Uuid::now_v7(), 1).starts_with(&executions_prefix(row)));
        assert_eq!(parse_execution(&execution(row, 7)), Some((row, 7)));
    }

    #[test]
    fn outbox_keys_sort_by_sequence() {
        assert!(outbox(255) < outbox(256));
        assert_eq!(parse_outbox(&outbox(42)), Some(42));
        assert!(outbox(1).starts_with(&outbox_prefix()));
    }

    #[test]
    fn creation_order_is_byte_order() {
        let tenant = Uuid::nil();
        assert!(created(tenant, 999, "z") < created(tenant, 1000, "a"));
    }
}
