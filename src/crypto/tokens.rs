//! Session tokens (`est_…`) and refresh tokens (`ert_…`).
//!
//! A token is its prefix and the base64url of the tenant id (16 bytes, so a
//! request names its tenant without a lookup; session ids are per tenant)
//! followed by 32 random bytes (256 bits). The server keeps only SHA-256
//! hashes and compares them in constant time.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::secret::Secret;

/// Prefix of a session token.
pub const SESSION_PREFIX: &str = "est_";
/// Prefix of a refresh token.
pub const REFRESH_PREFIX: &str = "ert_";
/// Random bytes per token.
const RANDOM_BYTES: usize = 32;

/// The SHA-256 of a token, as stored.
#[derive(Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
pub struct TokenHash(pub [u8; 32]);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenHash([redacted])")
    }
}

impl TokenHash {
    /// The hash of `token`.
    pub fn of(token: &str) -> Self {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    /// Constant-time equality.
    pub fn matches(&self, other: &TokenHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

/// A new pair, shown once to the client.
#[derive(Debug, Clone)]
pub struct SessionTokens {
    /// `est_…`
    pub session_token: Secret,
    /// `ert_…`
    pub refresh_token: Secret,
}

impl SessionTokens {
    /// A fresh pair for a session of `tenant`.
    pub fn generate(tenant: Uuid) -> Self {
        SessionTokens {
            session_token: generate(SESSION_PREFIX, tenant),
            refresh_token: generate(REFRESH_PREFIX, tenant),
        }
    }

    /// Their hashes: `(session, refresh)`.
    pub fn hashes(&self) -> (TokenHash, TokenHash) {
        (
            TokenHash::of(self.session_token.expose()),
            TokenHash::of(self.refresh_token.expose()),
        )
    }
}

fn generate(prefix: &str, tenant: Uuid) -> Secret {
    let mut bytes = [0u8; 16 + RANDOM_BYTES];
    bytes[..16].copy_from_slice(tenant.as_bytes());
    // ThreadRng: a CSPRNG (ChaCha) seeded from the OS and reseeded
    // periodically, without a getrandom syscall per token.
    rand::thread_rng().fill_bytes(&mut bytes[16..]);
    let token = format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes));
    zeroize::Zeroize::zeroize(&mut bytes);
    Secret::new(token)
}

/// The tenant a token with `prefix` names, if it is well-formed.
pub fn tenant_of(token: &str, prefix: &str) -> Option<Uuid> {
    let body = token.strip_prefix(prefix)?;
    let bytes = URL_SAFE_NO_PAD.decode(body).ok()?;
    if bytes.len() != 16 + RANDOM_BYTES {
        return None;
    }
    Uuid::from_slice(&bytes[..16]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_tenant_and_carry_256_random_bits() {
        let tenant = Uuid::new_v4();
        let a = SessionTokens::generate(tenant);
        let b = SessionTokens::generate(tenant);
        let token = a.session_token.expose();
        assert!(token.starts_with("est_"));
        assert!(a.refresh_token.expose().starts_with("ert_"));
        assert_eq!(tenant_of(token, SESSION_PREFIX), Some(tenant));
        assert_eq!(tenant_of(token, REFRESH_PREFIX), None);
        assert_eq!(tenant_of("est_short", SESSION_PREFIX), None);
        assert_ne!(a.session_token, b.session_token);
        let (hash, _) = a.hashes();
        assert!(hash.matches(&TokenHash::of(token)));
        assert!(!hash.matches(&TokenHash::of(b.session_token.expose())));
    }
}
