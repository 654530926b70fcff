//! The master keyring: the current master key (new encryptions) and the
//! previous ones (still read), each known by a key id derived from it.
//!
//! A keyring file holds one base64 key (32 bytes) per line, newest first;
//! `#` starts a comment. `edge-sessions rotate-key` prepends a fresh key, so
//! data sealed under the old keys stays readable while new data uses the new
//! one. `EDGE_SESSIONS_MASTER_KEY` holds the same list, comma-separated.

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// One 32-byte master key.
#[derive(Clone)]
pub struct MasterKey {
    id: u32,
    bytes: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({:08x}, [redacted])", self.id)
    }
}

impl MasterKey {
    /// Wraps 32 key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let digest = Sha256::new()
            .chain_update(b"edge-sessions master key id v1")
            .chain_update(bytes)
            .finalize();
        MasterKey {
            id: u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]),
            bytes: Zeroizing::new(bytes),
        }
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self::from_bytes(bytes)
    }

    /// Parses one base64 key.
    pub fn parse(text: &str) -> Result<Self, String> {
        let decoded = Zeroizing::new(
            STANDARD
                .decode(text.trim())
                .map_err(|_| "a master key must be base64".to_owned())?,
        );
        let bytes: [u8; 32] = decoded
            .as_slice()
            .try_into()
            .map_err(|_| format!("a master key must be 32 bytes, not {}", decoded.len()))?;
        Ok(Self::from_bytes(bytes))
    }

    /// The key's id, written in every ciphertext's header.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The key material.
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// The key as base64 (to write a keyring file).
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(*self.bytes))
    }
}

/// The current key first, then the previous ones.
#[derive(Debug, Clone)]
pub struct MasterKeyring {
    keys: Vec<MasterKey>,
}

impl MasterKeyring {
    /// A keyring of `keys`, newest first; at least one.
    pub fn new(keys: Vec<MasterKey>) -> Result<Self, String> {
        if keys.is_empty() {
            return Err("no master key".into());
        }
        Ok(MasterKeyring { keys })
    }

    /// Parses a keyring file's or variable's text: base64 keys separated by
    /// newlines or commas, newest first, `#` comments.
    pub fn parse(text: &str) -> Result<Self, String> {
        let keys = text
            .lines()
            .map(|line| line.split('#').next().unwrap_or(""))
            .flat_map(|line| line.split(','))
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .enumerate()
            .map(|(i, item)| MasterKey::parse(item).map_err(|e| format!("key {}: {e}", i + 1)))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(keys)
    }

    /// Reads a keyring file.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = Zeroizing::new(
            std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
        );
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The keyring file text: one base64 key per line, newest first.
    pub fn to_file_text(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::from(
            "# edge-sessions master keys, newest first (base64, 32 bytes each).\n\
             # The first encrypts; the others still decrypt. Keep this file secret.\n",
        ));
        for key in &self.keys {
            out.push_str(&key.to_base64());
            out.push('\n');
        }
        out
    }

    /// The key new data is sealed with.
    pub fn current(&self) -> &MasterKey {
        &self.keys[0]
    }

    /// The key with id `id`, if the keyring still has it.
    pub fn by_id(&self, id: u32) -> Option<&MasterKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// A keyring with a fresh key in front of these.
    pub fn rotated(&self) -> Self {
        let mut keys = vec![MasterKey::generate()];
        keys.extend(self.keys.iter().cloned());
        MasterKeyring { keys }
    }

    /// How many keys the keyring holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Never true (a keyring has at least one key).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_newest_first_and_rejects_bad_keys() {
        let a = MasterKey::generate();
        let b = MasterKey::generate();
        let text = format!(
            "# comment\n{}\n\n{}  # old\n",
            &*a.to_base64(),
            &*b.to_base64()
        );
        let ring = MasterKeyring::parse(&text).unwrap();
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.current().id(), a.id());
        assert!(ring.by_id(b.id()).is_some());
        let env = format!("{},{}", &*a.to_base64(), &*b.to_base64());
        assert_eq!(MasterKeyring::parse(&env).unwrap().len(), 2);
        assert!(MasterKeyring::parse("").is_err());
        assert!(MasterKeyring::parse("not base64!").is_err());
        assert!(MasterKeyring::parse("AAAA")
            .unwrap_err()
            .contains("32 bytes"));
        let rotated = ring.rotated();
        assert_eq!(rotated.len(), 3);
        assert_ne!(rotated.current().id(), a.id());
        assert_eq!(
            MasterKeyring::parse(&rotated.to_file_text()).unwrap().len(),
            3
        );
        assert!(!format!("{:?}", a).contains(&*a.to_base64()));
    }
}
