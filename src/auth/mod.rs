//! Who is calling: tenant API keys and admin keys (stored as SHA-256
//! hashes, compared in constant time), and the first-run development
//! credentials.

pub mod bootstrap;
pub mod keys;
pub mod master_key;

pub use keys::{hash_key_hex, ApiKey, Keyring, Scope};
