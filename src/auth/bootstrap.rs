//! First-run development credentials: with no tenant and no admin key
//! configured, `serve` makes a development tenant and an admin key, keeps
//! them in `data_dir/dev-credentials.toml` (mode 0600) and prints both keys
//! at start-up, so a fresh checkout works with no configuration at all.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::keys::hash_key_hex;
use crate::settings::{ApiKeySettings, Settings, TenantSettings};

/// File name of the development credentials inside `data_dir`.
pub const DEV_CREDENTIALS_FILE: &str = "dev-credentials.toml";

/// The development tenant and keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevCredentials {
    /// The development tenant's id.
    pub tenant_id: Uuid,
    /// Its API key (scopes `sessions` and `passthrough:read`).
    pub api_key: String,
    /// The admin key.
    pub admin_key: String,
}

fn random_key(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Whether `settings` name no tenant and no admin key.
pub fn needs_dev_credentials(settings: &Settings) -> bool {
    settings.tenants.is_empty() && settings.admin.key_sha256.is_empty()
}

/// Loads (or creates) the development credentials in `data_dir` and adds
/// them to `settings`. Answers the credentials and whether they are new.
pub fn apply_dev_credentials(settings: &mut Settings) -> anyhow::Result<(DevCredentials, PathBuf)> {
    let dir = settings.storage.data_dir.clone();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating data_dir {}", dir.display()))?;
    let path = dir.join(DEV_CREDENTIALS_FILE);
    let credentials = if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
    } else {
        let credentials = DevCredentials {
            tenant_id: Uuid::new_v4(),
            api_key: random_key("esk_dev_"),
            admin_key: random_key("esa_dev_"),
        };
        write_private(&path, &toml::to_string(&credentials)?)?;
        credentials
    };
    settings.tenants.push(TenantSettings {
        id: credentials.tenant_id,
        name: "development".into(),
        max_active_sessions: 1000,
        max_ttl_seconds: 86_400,
        max_idle_timeout_seconds: 86_400,
        api_keys: vec![ApiKeySettings {
            sha256: hash_key_hex(&credentials.api_key),
            scopes: vec!["sessions".into(), "passthrough:read".into()],
        }],
    });
    settings
        .admin
        .key_sha256
        .push(hash_key_hex(&credentials.admin_key));
    Ok((credentials, path))
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "[storage]\ndata_dir = {:?}",
            dir.path().display().to_string()
        );
        let mut first = Settings::from_toml(&toml).unwrap();
        assert!(needs_dev_credentials(&first));
        let (a, _) = apply_dev_credentials(&mut first).unwrap();
        let mut second = Settings::from_toml(&toml).unwrap();
        let (b, _) = apply_dev_credentials(&mut second).unwrap();
        assert_eq!(a.api_key, b.api_key);
        assert_eq!(first.tenants[0].id, second.tenants[0].id);
        assert!(a.api_key.starts_with("esk_dev_") && a.admin_key.starts_with("esa_dev_"));
    }
}
