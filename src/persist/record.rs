//! The on-disk record format: one format-version byte, then postcard.
//!
//! The version byte lets the format evolve: a reader matches on it and
//! decodes older layouts explicitly instead of misreading them.

use serde::{de::DeserializeOwned, Serialize};

/// The current record format.
pub const FORMAT_V1: u8 = 1;

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The record is empty.
    #[error("empty record")]
    Empty,
    /// The record was written by a newer or unknown format.
    #[error("unknown record format {0}")]
    UnknownFormat(u8),
    /// The payload does not decode.
    #[error("corrupt record: {0}")]
    Corrupt(#[from] postcard::Error),
}

/// Encodes `value` in the current format.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let bytes = vec![FORMAT_V1];
    // postcard only fails on writer errors (none for a Vec) or on types it
    // cannot represent (ours are plain structs), so this cannot fail.
    postcard::to_extend(value, bytes).expect("postcard encodes plain structs into a Vec")
}

/// Decodes a record of any known format.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    match bytes.split_first() {
        None => Err(RecordError::Empty),
        Some((&FORMAT_V1, payload)) => Ok(postcard::from_bytes(payload)?),
        Some((&other, _)) => Err(RecordError::UnknownFormat(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::session::tests::session_at;
    use crate::model::Session;

    #[test]
    fn sessions_round_trip_with_a_version_byte() {
        let session = session_at(1_700_000_000_000, 60, 3600);
        let bytes = encode(&session);
        assert_eq!(bytes[0], FORMAT_V1);
        let back: Session = decode(&bytes).unwrap();
        assert_eq!(back, session);
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
