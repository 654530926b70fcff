//! Layered configuration: built-in defaults (`config/default.toml`), an
//! optional TOML file, then `EDGE_SESSIONS__SECTION__KEY` environment
//! variables. Validated once at start-up; every error names its key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;
use uuid::Uuid;

/// The shipped defaults, documented key by key.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of environment overrides; `__` separates section and key.
const ENV_PREFIX: &str = "EDGE_SESSIONS__";

/// Everything the service reads from configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `[server]`
    pub server: ServerSettings,
    /// `[storage]`
    pub storage: StorageSettings,
    /// `[sessions]`
    pub sessions: SessionSettings,
    /// `[postgres]`
    pub postgres: PostgresSettings,
    /// `[security]`
    pub security: SecuritySettings,
    /// `[admin]`
    pub admin: AdminSettings,
    /// `[[tenants]]`
    #[serde(default)]
    pub tenants: Vec<TenantSettings>,
    /// `[rate_limits]`
    pub rate_limits: RateLimitSettings,
    /// `[log]`
    pub log: LogSettings,
    /// `[engine]`
    pub engine: EngineSettings,
    /// `[websocket]`
    pub websocket: WebSocketSettings,
    /// `[cluster]`
    pub cluster: ClusterSettings,
}

/// The environment variable that may hold the cluster secret.
pub const CLUSTER_SECRET_ENV: &str = "EDGE_SESSIONS_CLUSTER_SECRET";

/// `[cluster]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// Join the cluster kept in `[postgres] url`.
    pub enabled: bool,
    /// This node's unique id; empty: host name and listen port.
    pub node_id: String,
    /// How the other nodes reach this one; empty: `http://` and `server.listen`.
    pub advertise_url: String,
    /// Virtual shards, fixed for the cluster's life.
    pub shards: u32,
    /// How long a silent node keeps its shards.
    pub lease_seconds: u64,
    /// File holding the secret between nodes (or [`CLUSTER_SECRET_ENV`]).
    pub secret_file: String,
}

impl ClusterSettings {
    /// The secret that authenticates calls between nodes: the environment
    /// variable first, then `secret_file` (trimmed); at least 16 characters.
    pub fn secret(&self) -> Result<String, ConfigError> {
        let fail = |why: String| Err(ConfigError(format!("cluster.secret_file: {why}")));
        let secret = match std::env::var(CLUSTER_SECRET_ENV) {
            Ok(value) if !value.trim().is_empty() => value.trim().to_owned(),
            _ if self.secret_file.trim().is_empty() => {
                return fail(format!(
                    "a cluster needs a shared secret: set secret_file or {CLUSTER_SECRET_ENV}"
                ))
            }
            _ => match std::fs::read_to_string(self.secret_file.trim()) {
                Ok(text) => text.trim().to_owned(),
                Err(e) => return fail(format!("cannot read {}: {e}", self.secret_file.trim())),
            },
        };
        if secret.len() < 16 {
            return fail("the secret must be at least 16 characters".into());
        }
        Ok(secret)
    }

    /// This node's id: `node_id`, or the host name and `port`.
    pub fn node_id_or(&self, port: u16) -> String {
        if !self.node_id.trim().is_empty() {
            return self.node_id.trim().to_owned();
        }
        let mut name = [0u8; 256];
        // SAFETY: gethostname writes at most `len` bytes into the buffer.
        let status = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) };
        let host = if status == 0 {
            let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
            String::from_utf8_lossy(&name[..end]).into_owned()
        } else {
            "localhost".to_owned()
        };
        format!("{host}:{port}")
    }
}

/// `[websocket]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketSettings {
    /// Open sockets one session may have; one more answers 429
    /// `too_many_connections` before the upgrade.
    pub max_connections_per_session: usize,
}

/// Where a session's actor runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// On the arbiter its session id hashes to: one busy tenant uses every core.
    Session,
    /// On its tenant's arbiter, next to the supervisor: a create crosses
    /// one thread instead of two, but a tenant is bound to one core.
    Tenant,
}

/// `[engine]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSettings {
    /// Actix arbiters (threads running actors); 0 means one per core.
    pub shards: usize,
    /// Where session actors run.
    pub placement: Placement,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address for every HTTP surface.
    pub listen: SocketAddr,
    /// A connection that has not sent a whole request head this long after
    /// its first byte (of its accept, for the first request) is closed (10 s
    /// in the contract).
    pub header_read_timeout_ms: u64,
    /// A request whose declared body has not arrived this long after its
    /// head fails (4xx) and its connection is closed (30 s in the contract).
    pub body_read_timeout_ms: u64,
    /// A keep-alive connection idle this long between requests is closed
    /// (60 s in the contract).
    pub idle_timeout_ms: u64,
    /// A second address that serves `/admin/…` and `/metrics` (and the
    /// health probes); the public `listen` then answers 404 for them.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// PEM certificate chain: with `tls_key_file`, both listeners speak
    /// TLS (HTTPS, WSS) only.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
}

/// How a state change is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After its group commit is on disk.
    Sync,
    /// From memory; on disk within `flush_interval_ms`.
    Async,
    /// After the Postgres commit.
    Postgres,
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// Where sled (and the development credentials) live.
    pub data_dir: PathBuf,
    /// Acknowledgement mode.
    pub durability: Durability,
    /// Longest wait of a change in the write-behind queue.
    pub flush_interval_ms: u64,
    /// Most changes per batch.
    pub max_batch: usize,
    /// sled's page cache in MiB (records beyond it are read from disk).
    pub cache_capacity_mb: u64,
    /// Longest time between two checkpoints of the log into sled.
    pub checkpoint_interval_ms: u64,
    /// `serve --salvage`: start from what can be read of a damaged store.
    /// A command-line flag, never a config key.
    #[serde(skip)]
    pub salvage: bool,
}

/// `[sessions]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSettings {
    /// Idle timeout when a create gives none.
    pub default_idle_timeout_seconds: u32,
    /// Ttl when a create gives none.
    pub default_ttl_seconds: u32,
    /// `active -> idle` threshold.
    pub idle_after_seconds: u32,
    /// How long final sessions stay readable.
    pub retention_seconds: u32,
    /// WebSocket `session.expiring` lead time.
    pub expiring_notice_seconds: u32,
    /// Period of the purge sweep and of its wall-clock jump check.
    pub sweep_interval_seconds: u32,
}

/// Largest duration in seconds a session may have (PostgreSQL `integer`).
const MAX_SECONDS: u32 = i32::MAX as u32;

/// `[postgres]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    /// Connection URL; empty disables the tier.
    pub url: String,
    /// Apply migrations at start.
    pub migrate_on_start: bool,
    /// Most pooled connections (recovery, rebuilds, tools); the shipping
    /// lanes keep connections of their own besides.
    pub max_connections: u32,
    /// Server-side limit per statement, in ms.
    pub statement_timeout_ms: u64,
    /// Longest wait for a connection, in ms.
    pub connect_timeout_ms: u64,
    /// Most outbox entries one shipping transaction commits.
    pub batch_size: usize,
    /// Shipping lanes, by session: each a connection of its own with one
    /// transaction in flight.
    pub ship_connections: usize,
    /// Under `durability = "postgres"`, longest an acknowledgement waits for
    /// its commit before the request answers 503, in ms.
    pub commit_timeout_ms: u64,
    /// How long shutdown keeps shipping the outbox, in ms (the rest ships at
    /// the next start).
    pub drain_on_shutdown_ms: u64,
    /// With a new or lost data dir, longest start-up waits for PostgreSQL
    /// to rebuild the live sessions, in seconds, before serving from sled
    /// alone (the rebuild goes on in the background).
    pub rebuild_wait_seconds: u64,
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("PostgresSettings")
            .field("url", &if self.enabled() { "[redacted]" } else { "" })
            .field("migrate_on_start", &self.migrate_on_start)
            .field("batch_size", &self.batch_size)
            .field("ship_connections", &self.ship_connections)
            .finish_non_exhaustive()
    }
}

impl PostgresSettings {
    /// Whether the tier is on.
    pub fn enabled(&self) -> bool {
        !self.url.trim().is_empty()
    }
}

/// `[security]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecuritySettings {
    /// File holding the base64 master key.
    pub master_key_file: String,
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Hex sha256 of each admin key.
    pub key_sha256: Vec<String>,
}

/// One `[[tenants]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// The tenant's UUID.
    pub id: Uuid,
    /// A display name.
    pub name: String,
    /// Live sessions allowed at once.
    #[serde(default = "default_max_active_sessions")]
    pub max_active_sessions: usize,
    /// Cap on a session's ttl.
    #[serde(default = "default_cap_seconds")]
    pub max_ttl_seconds: u32,
    /// Cap on a session's idle timeout.
    #[serde(default = "default_cap_seconds")]
    pub max_idle_timeout_seconds: u32,
    /// The tenant's API keys.
    #[serde(default)]
    pub api_keys: Vec<ApiKeySettings>,
}

fn default_max_active_sessions() -> usize {
    1000
}

fn default_cap_seconds() -> u32 {
    86_400
}

/// One `[[tenants.api_keys]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySettings {
    /// Hex sha256 of the key.
    pub sha256: String,
    /// Granted scopes.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
}

fn default_scopes() -> Vec<String> {
    vec!["sessions".to_owned()]
}

/// `[rate_limits]`: token buckets per API key and endpoint class.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RateLimitSettings {
    pub create_per_second: u32,
    pub create_burst: u32,
    pub read_per_second: u32,
    pub read_burst: u32,
    pub write_per_second: u32,
    pub write_burst: u32,
    pub admin_per_second: u32,
    pub admin_burst: u32,
    /// Failed authentications per client address (IP): refill per second.
    pub failed_auth_per_second: u32,
    /// Failed authentications per client address (IP): burst.
    pub failed_auth_burst: u32,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// Default level filter (RUST_LOG overrides it).
    pub level: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A configuration error; its message names the offending key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    /// An error whose message names the offending key.
    pub fn new(message: String) -> Self {
        ConfigError(message)
    }
}

impl Settings {
    /// Loads defaults, then `file` if given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__"));
        Self::from_figment(figment)
    }

    /// Loads defaults overlaid with a TOML string (tests build configs this way).
    pub fn from_toml(overrides: &str) -> Result<Self, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(DEFAULT_TOML)).merge(Toml::string(overrides)))
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let settings: Settings = figment.extract().map_err(|e| {
            let key = e.path.join(".");
            let message = e.kind.to_string();
            if key.is_empty() {
                ConfigError(message)
            } else {
                ConfigError(format!("{key}: {message}"))
            }
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what types alone cannot.
    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        match (&self.server.tls_cert_file, &self.server.tls_key_file) {
            (Some(_), None) => return fail("server.tls_key_file", "is needed with tls_cert_file"),
            (None, Some(_)) => return fail("server.tls_cert_file", "is needed with tls_key_file"),
            _ => {}
        }
        if self
            .server
            .admin_listen
            .is_some_and(|a| a == self.server.listen && a.port() != 0)
        {
            return fail("server.admin_listen", "must differ from server.listen");
        }
        if self.storage.flush_interval_ms == 0 {
            return fail("storage.flush_interval_ms", "must be at least 1");
        }
        for (key, value) in [
            (
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
            ),
            (
                "server.body_read_timeout_ms",
                self.server.body_read_timeout_ms,
            ),
            ("server.idle_timeout_ms", self.server.idle_timeout_ms),
        ] {
            if value == 0 {
                return fail(key, "must be at least 1");
            }
        }
        if !(1..=60_000).contains(&self.storage.checkpoint_interval_ms) {
            return fail("storage.checkpoint_interval_ms", "must be 1 to 60000");
        }
        if self.storage.cache_capacity_mb == 0 {
            return fail("storage.cache_capacity_mb", "must be at least 1");
        }
        if self.websocket.max_connections_per_session == 0 {
            return fail(
                "websocket.max_connections_per_session",
                "must be at least 1",
            );
        }
        if self.storage.max_batch == 0 {
            return fail("storage.max_batch", "must be at least 1");
        }
        if self.storage.durability == Durability::Postgres && !self.postgres.enabled() {
            return fail(
                "storage.durability",
                "\"postgres\" needs postgres.url to be set",
            );
        }
        if self.cluster.enabled {
            let c = &self.cluster;
            if self.storage.durability != Durability::Postgres {
                return fail(
                    "storage.durability",
                    "a cluster ([cluster] enabled = true) acknowledges only what PostgreSQL committed: set it to \"postgres\"",
                );
            }
            if !(1..=65_536).contains(&c.shards) {
                return fail("cluster.shards", "must be 1 to 65536");
            }
            if !(1..=3_600).contains(&c.lease_seconds) {
                return fail("cluster.lease_seconds", "must be 1 to 3600");
            }
            let url = c.advertise_url.trim();
            if !(url.is_empty() || url.starts_with("http://")) {
                return fail(
                    "cluster.advertise_url",
                    "must start with http:// (nodes call each other over plain HTTP on the private network; see README)",
                );
            }
            if c.node_id.trim().len() > 128
                || !c.node_id.trim().bytes().all(|b| b.is_ascii_graphic())
            {
                return fail(
                    "cluster.node_id",
                    "must be at most 128 visible ASCII characters (it is sent as a header)",
                );
            }
            if self.server.tls_cert_file.is_some() {
                return fail(
                    "server.tls_cert_file",
                    "a cluster node serves plain HTTP (the nodes forward to each other over it); terminate TLS in front of the cluster",
                );
            }
            if url.is_empty() && self.server.listen.ip().is_unspecified() {
                return fail(
                    "cluster.advertise_url",
                    "must be set when server.listen is a wildcard address: how do the other nodes reach this one?",
                );
            }
            if self.tenants.is_empty() {
                return fail(
                    "tenants",
                    "a cluster needs configured tenants (the development tenant is one node's own)",
                );
            }
            // The secret (a file, or the environment) is read at `serve`.
        }
        if self.postgres.enabled() {
            if let Err(e) = crate::persist::postgres::check_url(self.postgres.url.trim()) {
                // The URL may hold a password: only the parser's reason is shown.
                return fail("postgres.url", &format!("not a valid PostgreSQL URL ({e})"));
            }
            let p = &self.postgres;
            for (key, value) in [
                ("postgres.max_connections", u64::from(p.max_connections)),
                ("postgres.statement_timeout_ms", p.statement_timeout_ms),
                ("postgres.connect_timeout_ms", p.connect_timeout_ms),
                ("postgres.batch_size", p.batch_size as u64),
                ("postgres.ship_connections", p.ship_connections as u64),
                ("postgres.commit_timeout_ms", p.commit_timeout_ms),
            ] {
                if value == 0 {
                    return fail(key, "must be at least 1");
                }
            }
        }
        let s = &self.sessions;
        for (key, value) in [
            (
                "sessions.default_idle_timeout_seconds",
                s.default_idle_timeout_seconds,
            ),
            ("sessions.default_ttl_seconds", s.default_ttl_seconds),
            ("sessions.idle_after_seconds", s.idle_after_seconds),
            ("sessions.sweep_interval_seconds", s.sweep_interval_seconds),
        ] {
            if value == 0 {
                return fail(key, "must be at least 1");
            }
        }
        for (i, hash) in self.admin.key_sha256.iter().enumerate() {
            if !is_sha256_hex(hash) {
                return fail(
                    &format!("admin.key_sha256[{i}]"),
                    "must be 64 hex characters",
                );
            }
        }
        let mut ids = std::collections::HashSet::new();
        for (i, tenant) in self.tenants.iter().enumerate() {
            if !ids.insert(tenant.id) {
                return fail(&format!("tenants[{i}].id"), "is used by another tenant");
            }
            if tenant.max_ttl_seconds == 0 || tenant.max_idle_timeout_seconds == 0 {
                return fail(
                    &format!("tenants[{i}]"),
                    "max_ttl_seconds and max_idle_timeout_seconds must be at least 1",
                );
            }
            // PostgreSQL keeps them as `integer`.
            if tenant.max_ttl_seconds > MAX_SECONDS || tenant.max_idle_timeout_seconds > MAX_SECONDS
            {
                return fail(
                    &format!("tenants[{i}]"),
                    "max_ttl_seconds and max_idle_timeout_seconds must be at most 2147483647",
                );
            }
            for (j, key) in tenant.api_keys.iter().enumerate() {
                if !is_sha256_hex(&key.sha256) {
                    return fail(
                        &format!("tenants[{i}].api_keys[{j}].sha256"),
                        "must be 64 hex characters",
                    );
                }
                for scope in &key.scopes {
                    if !KNOWN_SCOPES.contains(&scope.as_str()) {
                        return fail(
                            &format!("tenants[{i}].api_keys[{j}].scopes"),
                            &format!("unknown scope {scope:?} (known: sessions, passthrough:read)"),
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

/// Scopes an API key may carry.
pub const KNOWN_SCOPES: [&str; 2] = ["sessions", "passthrough:read"];

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_defaults_parse() {
        let settings = Settings::from_toml("").unwrap();
        assert_eq!(settings.server.listen.port(), 8081);
        assert_eq!(settings.storage.durability, Durability::Sync);
        assert_eq!(settings.sessions.default_idle_timeout_seconds, 1800);
        assert!(settings.tenants.is_empty());
    }

    #[test]
    fn errors_name_the_key() {
        let err = Settings::from_toml("[storage]\ndurability = \"sometimes\"").unwrap_err();
        assert!(err.to_string().contains("storage.durability"), "{err}");
        let err = Settings::from_toml("[storage]\nflush_interval_ms = 0").unwrap_err();
        assert!(
            err.to_string().contains("storage.flush_interval_ms"),
            "{err}"
        );
        let err = Settings::from_toml("[[tenants]]\nid = \"6f1c0d3e-8a4b-4c6e-9f10-2b3c4d5e6f70\"\nname = \"a\"\n[[tenants.api_keys]]\nsha256 = \"xyz\"").unwrap_err();
        assert!(
            err.to_string().contains("tenants[0].api_keys[0].sha256"),
            "{err}"
        );
    }

    #[test]
    fn tenants_get_contract_defaults() {
        let settings = Settings::from_toml(
            "[[tenants]]\nid = \"6f1c0d3e-8a4b-4c6e-9f10-2b3c4d5e6f70\"\nname = \"acme\"",
        )
        .unwrap();
        assert_eq!(settings.tenants[0].max_active_sessions, 1000);
    }
}
