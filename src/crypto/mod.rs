//! Secrets and cryptography: the passthrough-credential vault (AES-256-GCM
//! under per-tenant keys derived from a rotatable master keyring), session
//! tokens, and the `Secret` type that zeroises itself and never prints.
//!
//! Nothing here knows about actors, storage or HTTP.

pub mod keyring;
pub mod secret;
pub mod tokens;
pub mod vault;

pub use keyring::{MasterKey, MasterKeyring};
pub use secret::Secret;
pub use tokens::{SessionTokens, TokenHash};
pub use vault::{Vault, VaultError};
