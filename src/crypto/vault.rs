//! The passthrough-credential vault.
//!
//! A bundle is sealed with AES-256-GCM under a data key derived per tenant
//! from a master key (HKDF-SHA256, info = tenant id), with a fresh random
//! 96-bit nonce per encryption. The associated data binds the ciphertext to
//! its tenant and its session's row id, so a ciphertext copied to another
//! row, or another tenant, does not decrypt.
//!
//! Layout: `version(1) key_id(4, BE) nonce(12) ciphertext+tag`. The key id
//! names the master key, so data sealed before a rotation is opened with
//! the previous key while new data uses the current one.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use hkdf::Hkdf;
use rand::RngCore;
use sha2::Sha256;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::keyring::{MasterKey, MasterKeyring};
use super::secret::Secret;

/// Format version of a sealed bundle.
const VERSION: u8 = 1;
const HEADER: usize = 1 + 4 + 12;
/// Domain separation for the data keys and the associated data.
const CONTEXT: &[u8] = b"edge-sessions passthrough v1";

/// Why a sealed bundle did not open. Deliberately vague: which check failed
/// is nobody's business but the log's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    /// Too short or of an unknown version.
    #[error("sealed credentials are malformed")]
    Malformed,
    /// Sealed with a master key the keyring no longer has.
    #[error("sealed with an unknown master key {0:08x}")]
    UnknownKey(u32),
    /// Wrong key, tenant or session, or tampered with.
    #[error("sealed credentials do not open for this tenant and session")]
    Rejected,
}

/// Seals and opens passthrough credentials.
#[derive(Debug, Clone)]
pub struct Vault {
    keyring: MasterKeyring,
}

impl Vault {
    /// A vault over `keyring`.
    pub fn new(keyring: MasterKeyring) -> Self {
        Vault { keyring }
    }

    /// A vault with a random key that lives only in memory (engine tests and
    /// benchmarks; nothing it seals survives the process).
    pub fn ephemeral() -> Self {
        Vault::new(MasterKeyring::new(vec![MasterKey::generate()]).expect("one key"))
    }

    /// The id of the key new data is sealed with.
    pub fn current_key_id(&self) -> u32 {
        self.keyring.current().id()
    }

    /// Encrypts `plain` for the session with row id `session_row` of `tenant`.
    pub fn seal(&self, tenant: Uuid, session_row: Uuid, plain: &Secret) -> Vec<u8> {
        let key = self.keyring.current();
        let mut nonce = [0u8; 12];
        // 96 random bits from ThreadRng (a CSPRNG seeded from the OS): a
        // repeat is as unlikely as with the OS's generator, without a
        // syscall per seal.
        rand::thread_rng().fill_bytes(&mut nonce);
        let mut out = Vec::with_capacity(HEADER + plain.expose().len() + 16);
        out.push(VERSION);
        out.extend_from_slice(&key.id().to_be_bytes());
        out.extend_from_slice(&nonce);
        let aad = associated_data(&out[..5], tenant, session_row);
        let cipher = cipher(key, tenant);
        // AES-GCM encryption fails only for messages beyond 64 GiB.
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain.expose().as_bytes(),
                    aad: &aad,
                },
            )
            .expect("AES-GCM encrypts any message below 64 GiB");
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts what [`Vault::seal`] produced for the same tenant and session.
    pub fn open(
        &self,
        tenant: Uuid,
        session_row: Uuid,
        sealed: &[u8],
    ) -> Result<Secret, VaultError> {
        if sealed.len() < HEADER + 16 || sealed[0] != VERSION {
            return Err(VaultError::Malformed);
        }
        let id = u32::from_be_bytes([sealed[1], sealed[2], sealed[3], sealed[4]]);
        let key = self.keyring.by_id(id).ok_or(VaultError::UnknownKey(id))?;
        let aad = associated_data(&sealed[..5], tenant, session_row);
        let plain = Zeroizing::new(
            cipher(key, tenant)
                .decrypt(
                    Nonce::from_slice(&sealed[5..HEADER]),
                    Payload {
                        msg: &sealed[HEADER..],
                        aad: &aad,
                    },
                )
                .map_err(|_| VaultError::Rejected)?,
        );
        let text = std::str::from_utf8(&plain).map_err(|_| VaultError::Malformed)?;
        Ok(Secret::new(text.to_owned()))
    }
}

/// The tenant's data key under `master`: HKDF-SHA256(master, info = context
/// ‖ tenant id).
fn cipher(master: &MasterKey, tenant: Uuid) -> Aes256Gcm {
    let hkdf = Hkdf::<Sha256>::new(Some(CONTEXT), master.bytes());
    let mut key = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit.
    hkdf.expand_multi_info(&[CONTEXT, tenant.as_bytes()], key.as_mut())
        .expect("HKDF-SHA256 yields 32 bytes");
    Aes256Gcm::new_from_slice(key.as_ref()).expect("AES-256 takes a 32-byte key")
}

/// Header (version and key id), tenant and session row id.
fn associated_data(header: &[u8], tenant: Uuid, session_row: Uuid) -> Vec<u8> {
    let mut aad = Vec::with_capacity(CONTEXT.len() + header.len() + 32);
    aad.extend_from_slice(CONTEXT);
    aad.extend_from_slice(header);
    aad.extend_from_slice(tenant.as_bytes());
    aad.extend_from_slice(session_row.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vault() -> Vault {
        Vault::new(MasterKeyring::new(vec![MasterKey::generate()]).unwrap())
    }

    #[test]
    fn round_trips_with_a_fresh_nonce_each_time() {
        let vault = vault();
        let (tenant, row) = (Uuid::new_v4(), Uuid::now_v7());
        let plain = Secret::new(r#"{"github":{"token":"ghp_x"}}"#.into());
        let a = vault.seal(tenant, row, &plain);
        let b = vault.seal(tenant, row, &plain);
        assert_ne!(a, b, "a fresh nonce per encryption");
        assert_eq!(vault.open(tenant, row, &a).unwrap(), plain);
        assert!(!a.windows(5).any(|w| w == b"ghp_x"));
    }

    #[test]
    fn another_tenant_or_session_or_a_tampered_byte_does_not_open() {
        let vault = vault();
        let (tenant, row) = (Uuid::new_v4(), Uuid::now_v7());
        let sealed = vault.seal(tenant, row, &Secret::new("s".into()));
        assert_eq!(
            vault.open(Uuid::new_v4(), row, &sealed),
            Err(VaultError::Rejected)
        );
        assert_eq!(
            vault.open(tenant, Uuid::now_v7(), &sealed),
            Err(VaultError::Rejected)
        );
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            vault.open(tenant, row, &tampered),
            Err(VaultError::Rejected)
        );
        assert_eq!(
            vault.open(tenant, row, &sealed[..10]),
            Err(VaultError::Malformed)
        );
        // Another master key does not open it either.
        assert!(matches!(
            super::super::Vault::new(MasterKeyring::new(vec![MasterKey::generate()]).unwrap())
                .open(tenant, row, &sealed),
            Err(VaultError::UnknownKey(_))
        ));
    }

    #[test]
    fn after_a_rotation_old_data_opens_and_new_data_uses_the_new_key() {
        let old = vault();
        let (tenant, row) = (Uuid::new_v4(), Uuid::now_v7());
        let before = old.seal(tenant, row, &Secret::new("old".into()));
        let rotated = Vault::new(old.keyring.rotated());
        assert_ne!(rotated.current_key_id(), old.current_key_id());
        assert_eq!(rotated.open(tenant, row, &before).unwrap().expose(), "old");
        let after = rotated.seal(tenant, row, &Secret::new("new".into()));
        assert_eq!(
            u32::from_be_bytes(after[1..5].try_into().unwrap()),
            rotated.current_key_id()
        );
        assert!(matches!(
            old.open(tenant, row, &after),
            Err(VaultError::UnknownKey(_))
        ));
    }
}
