//! API keys and admin keys, known only by their SHA-256 hashes.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::engine::TenantLimits;
use crate::settings::Settings;

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything under `/api/v1/sessions` except reading credentials.
    Sessions,
    /// Reading passthrough credentials.
    PassthroughRead,
}

impl Scope {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "sessions" => Some(Scope::Sessions),
            "passthrough:read" => Some(Scope::PassthroughRead),
            _ => None,
        }
    }
}

/// A tenant API key's grants.
#[derive(Debug, Clone)]
pub struct ApiKey {
    /// The tenant the key belongs to.
    pub tenant_id: Uuid,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// Its rate bucket: the key's stored SHA-256, so a call that found the
    /// key by its digest does not hash it again for its bucket.
    pub bucket: [u8; 32],
}

impl ApiKey {
    /// Whether the key carries `scope`.
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// The SHA-256 of a key.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The SHA-256 of a key as lowercase hex, as a config file holds it.
pub fn hash_key_hex(key: &str) -> String {
    hex::encode(hash_key(key))
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// Every configured key.
#[derive(Debug, Default)]
pub struct Keyring {
    tenant_keys: HashMap<[u8; 32], ApiKey>,
    admin_keys: Vec<[u8; 32]>,
}

impl Keyring {
    /// The keyring and tenant limits of validated settings.
    pub fn from_settings(settings: &Settings) -> (Keyring, Vec<TenantLimits>) {
        let mut keyring = Keyring::default();
        let mut tenants = Vec::new();
        for tenant in &settings.tenants {
            for key in &tenant.api_keys {
                // Settings::validate checked hashes and scopes already.
                let Some(hash) = parse_hash(&key.sha256) else {
                    continue;
                };
                let scopes = key.scopes.iter().filter_map(|s| Scope::parse(s)).collect();
                keyring.tenant_keys.insert(
                    hash,
                    ApiKey {
                        tenant_id: tenant.id,
                        scopes,
                        bucket: hash,
                    },
                );
            }
            tenants.push(TenantLimits {
                id: tenant.id,
                name: tenant.name.clone(),
                max_active_sessions: tenant.max_active_sessions,
                max_ttl_seconds: tenant.max_ttl_seconds,
                max_idle_timeout_seconds: tenant.max_idle_timeout_seconds,
            });
        }
        keyring.admin_keys = settings
            .admin
            .key_sha256
            .iter()
            .filter_map(|h| parse_hash(h))
            .collect();
        (keyring, tenants)
    }

    /// The tenant key matching `presented`, if any.
    pub fn tenant_key(&self, presented: &str) -> Option<&ApiKey> {
        // The map is keyed by the digest: a lookup compares the SHA-256 of
        // what was presented, so its timing can reveal nothing about a
        // stored key beyond what a preimage of SHA-256 would.
        self.tenant_keys.get(&hash_key(presented))
    }

    /// The tenant key whose SHA-256 is `digest` (already computed for this
    /// request by the rate limiter).
    pub fn tenant_key_by_digest(&self, digest: &[u8; 32]) -> Option<&ApiKey> {
        self.tenant_keys.get(digest)
    }

    /// Whether `presented` is an admin key. Compares against every admin key
    /// without stopping early.
    pub fn is_admin(&self, presented: &str) -> bool {
        let hash = hash_key(presented);
        self.admin_keys
            .iter()
            .fold(subtle::Choice::from(0), |found, key| {
                found | key.ct_eq(&hash)
            })
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_only_their_hash() {
        let settings = Settings::from_toml(&format!(
            "[admin]\nkey_sha256 = [\"{}\"]\n[[tenants]]\nid = \"6f1c0d3e-8a4b-4c6e-9f10-2b3c4d5e6f70\"\nname = \"acme\"\n[[tenants.api_keys]]\nsha256 = \"{}\"\nscopes = [\"sessions\", \"passthrough:read\"]",
            hash_key_hex("admin-secret"),
            hash_key_hex("tenant-secret"),
        ))
        .unwrap();
        let (keyring, tenants) = Keyring::from_settings(&settings);
        assert_eq!(tenants.len(), 1);
        let key = keyring.tenant_key("tenant-secret").unwrap();
        assert_eq!(key.tenant_id, tenants[0].id);
        assert!(key.allows(Scope::PassthroughRead));
        assert!(keyring.tenant_key("admin-secret").is_none());
        assert!(keyring.is_admin("admin-secret"));
        assert!(!keyring.is_admin("tenant-secret"));
    }

    #[test]
    fn hash_matches_sha256sum() {
        // printf 'abc' | sha256sum
        assert_eq!(
            hash_key_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
