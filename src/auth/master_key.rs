//! Where the master keyring comes from:
//!
//! 1. `EDGE_SESSIONS_MASTER_KEY`: base64 keys, comma-separated, newest first;
//! 2. else `security.master_key_file`: one base64 key per line, newest first;
//! 3. else, in the first-run development mode only (no tenant and no admin
//!    key configured), `data_dir/master.key`, generated with a warning.
//!
//! With tenants configured and no key, `serve` refuses to start: sealing
//! credentials under a key nobody keeps would lose them at the next start.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::crypto::MasterKeyring;
use crate::settings::Settings;

/// The environment variable holding the keyring.
pub const MASTER_KEY_ENV: &str = "EDGE_SESSIONS_MASTER_KEY";
/// File name of the development keyring inside `data_dir`.
pub const DEV_MASTER_KEY_FILE: &str = "master.key";

/// The keyring file `rotate-key` works on: the configured one, or the
/// development one.
pub fn keyring_path(settings: &Settings) -> PathBuf {
    if settings.security.master_key_file.trim().is_empty() {
        settings.storage.data_dir.join(DEV_MASTER_KEY_FILE)
    } else {
        PathBuf::from(settings.security.master_key_file.trim())
    }
}

/// Loads the keyring; `dev_mode` allows generating one in `data_dir`.
pub fn load(settings: &Settings, dev_mode: bool) -> anyhow::Result<MasterKeyring> {
    if let Ok(text) = std::env::var(MASTER_KEY_ENV) {
        if !text.trim().is_empty() {
            return MasterKeyring::parse(&text)
                .map_err(|e| anyhow::anyhow!("{MASTER_KEY_ENV}: {e}"));
        }
    }
    let file = settings.security.master_key_file.trim();
    if !file.is_empty() {
        return MasterKeyring::read(Path::new(file))
            .map_err(|e| anyhow::anyhow!("security.master_key_file: {e}"));
    }
    if !dev_mode {
        anyhow::bail!(
            "security.master_key_file: no master key; set {MASTER_KEY_ENV} or \
             security.master_key_file (32 random bytes, base64: openssl rand -base64 32)"
        );
    }
    let path = settings.storage.data_dir.join(DEV_MASTER_KEY_FILE);
    if path.exists() {
        return MasterKeyring::read(&path).map_err(|e| anyhow::anyhow!("{e}"));
    }
    std::fs::create_dir_all(&settings.storage.data_dir)
        .with_context(|| format!("creating {}", settings.storage.data_dir.display()))?;
    let keyring = MasterKeyring::new(vec![crate::crypto::MasterKey::generate()])
        .map_err(|e| anyhow::anyhow!(e))?;
    write_keyring(&path, &keyring, true)?;
    tracing::warn!(
        path = %path.display(),
        "development mode: generated a master key in the data dir; configure security.master_key_file for anything real"
    );
    Ok(keyring)
}

/// Prepends a fresh key to the keyring file and answers the new keyring.
/// Data sealed under the previous keys stays readable; the server uses the
/// new key after its next start.
pub fn rotate(path: &Path) -> anyhow::Result<MasterKeyring> {
    let current = MasterKeyring::read(path).map_err(|e| anyhow::anyhow!(e))?;
    let rotated = current.rotated();
    write_keyring(path, &rotated, false)?;
    Ok(rotated)
}

/// Writes a keyring file (mode 0600), atomically when it replaces one.
fn write_keyring(path: &Path, keyring: &MasterKeyring, create_new: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("key.tmp");
    let target = if create_new { path } else { tmp.as_path() };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if create_new {
        options.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(target)
        .with_context(|| format!("creating {}", target.display()))?;
    file.write_all(keyring.to_file_text().as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", target.display()))?;
    if !create_new {
        std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_prepends_a_key_and_keeps_the_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let first = MasterKeyring::new(vec![crate::crypto::MasterKey::generate()]).unwrap();
        write_keyring(&path, &first, true).unwrap();
        let rotated = rotate(&path).unwrap();
        assert_eq!(rotated.len(), 2);
        let back = MasterKeyring::read(&path).unwrap();
        assert_eq!(back.current().id(), rotated.current().id());
        assert!(back.by_id(first.current().id()).is_some());
    }
}
