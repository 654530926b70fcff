//! The on-disk record format: one format-version byte, then postcard.
//!
//! The version byte lets the format evolve: a reader matches on it and
//! decodes older layouts explicitly instead of misreading them.

use serde::{de::DeserializeOwned, Serialize};

use crate::model::session::SessionCredentials;
use crate::model::Session;

/// The first record format.
pub const FORMAT_V1: u8 = 1;
/// The current record format: as format 1, with the session's
/// `credentials` appended at the end of its record.
pub const FORMAT_V2: u8 = 2;

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The record is empty.
    #[error("empty record")]
    Empty,
    /// The record was written by a newer or unknown format.
    #[error("unknown record format {0}")]
    UnknownFormat(u8),
    /// A chunk of executions (see `persist::executions`) is cut short.
    #[error("damaged chunk of executions")]
    Chunk,
    /// The payload does not decode.
    #[error("corrupt record: {0}")]
    Corrupt(#[from] postcard::Error),
}

/// Encodes `value` in the current format.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let bytes = vec![FORMAT_V2];
    // postcard only fails on writer errors (none for a Vec) or on types it
    // cannot represent (ours are plain structs), so this cannot fail.
    postcard::to_extend(value, bytes).expect("postcard encodes plain structs into a Vec")
}

/// Decodes a record of any known format. Formats 1 and 2 differ only in
/// the session record (see [`decode_session`]).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    match bytes.split_first() {
        None => Err(RecordError::Empty),
        Some((&(FORMAT_V1 | FORMAT_V2), payload)) => Ok(postcard::from_bytes(payload)?),
        Some((&other, _)) => Err(RecordError::UnknownFormat(other)),
    }
}

/// Decodes a session record of any known format. A format-1 record is the
/// format-2 record without its last field (`credentials`): it is read with
/// that field's empty value appended (no credentials, no tokens).
pub fn decode_session(bytes: &[u8]) -> Result<Session, RecordError> {
    match bytes.split_first() {
        Some((&FORMAT_V1, payload)) => {
            let mut upgraded = payload.to_vec();
            upgraded.extend(
                postcard::to_allocvec(&SessionCredentials::default())
                    .expect("postcard encodes plain structs into a Vec"),
            );
            Ok(postcard::from_bytes(&upgraded)?)
        }
        _ => decode(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::session::tests::session_at;

    #[test]
    fn sessions_round_trip_with_a_version_byte() {
        let session = session_at(1_700_000_000_000, 60, 3600);
        let bytes = encode(&session);
        assert_eq!(bytes[0], FORMAT_V2);
        let back: Session = decode(&bytes).unwrap();
        assert_eq!(back, session);
        assert_eq!(decode_session(&bytes).unwrap(), session);
    }

    #[test]
    fn a_format_1_session_reads_with_empty_credentials() {
        let mut session = session_at(1_700_000_000_000, 60, 3600);
        session.credentials.passthrough = Some(vec![1, 2, 3].into());
        let v2 = encode(&session);
        // Format 1 was the same record without the trailing credentials.
        let without = postcard::to_allocvec(&session.credentials).unwrap();
        let mut v1 = vec![FORMAT_V1];
        v1.extend_from_slice(&v2[1..v2.len() - without.len()]);
        let back = decode_session(&v1).unwrap();
        assert_eq!(back.credentials, SessionCredentials::default());
        assert_eq!(back.tools, session.tools);
        assert_eq!(back.version, session.version);
    }

    #[test]
    fn unknown_formats_are_refused() {
        assert!(matches!(
            decode::<Session>(&[9, 1, 2]),
            Err(RecordError::UnknownFormat(9))
        ));
        assert!(matches!(decode::<Session>(&[]), Err(RecordError::Empty)));
    }
}
