//! Session id rules: what a client may choose and what the server generates.

use base64::Engine as _;
use rand::RngCore;

/// Longest client-chosen session id, in bytes.
pub const MAX_SESSION_ID_LEN: usize = 255;

/// Ids that would collide with routes or path segments.
const RESERVED_IDS: [&str; 4] = ["active", "metrics", ".", ".."];

/// Whether `id` is a valid session id: 1–255 characters from
/// `A-Z a-z 0-9 . _ : @ ~ -`, and not a reserved word.
pub fn is_valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SESSION_ID_LEN
        && id.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'~' | b'-')
        })
        && !RESERVED_IDS.contains(&id)
}

/// A fresh server-chosen id: `ses_` and 43 base64url characters (256 random bits).
pub fn generate_session_id() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let mut id = String::with_capacity(47);
    id.push_str("ses_");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(bytes, &mut id);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = generate_session_id();
        let b = generate_session_id();
        assert_eq!(a.len(), 47);
        assert!(is_valid_session_id(&a));
        assert_ne!(a, b);
    }

    #[test]
    fn rules_of_the_contract() {
        assert!(is_valid_session_id("test-123"));
        assert!(is_valid_session_id("a.b_c:d@e~f-g"));
        assert!(!is_valid_session_id(""));
        assert!(!is_valid_session_id("has space"));
        assert!(!is_valid_session_id("slash/inside"));
        assert!(!is_valid_session_id("ünïcode"));
        assert!(!is_valid_session_id("active"));
        assert!(!is_valid_session_id("metrics"));
        assert!(!is_valid_session_id(".."));
        assert!(is_valid_session_id(&"x".repeat(255)));
        assert!(!is_valid_session_id(&"x".repeat(256)));
    }
}
