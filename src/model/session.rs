//! A session's state and the rules of its lifecycle (expiry, idleness,
//! versions), as pure functions of the state and the current time.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::client_text::ClientText;
use super::error::SessionError;
use super::time::{format_rfc3339, secs, Millis};
use super::tool::{ToolExecution, ToolStats};
use crate::crypto::TokenHash;

/// Where a session is in its life. `Expired` and `Terminated` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Live, with activity within `idle_after`.
    Active,
    /// Live, but no activity for `idle_after`.
    Idle,
    /// Ended by its idle timeout or ttl.
    Expired,
    /// Ended by a client, an admin or a revocation.
    Terminated,
}

impl Status {
    /// Whether the session has ended for good.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Expired | Status::Terminated)
    }

    /// The wire name (`active`, `idle`, `expired`, `terminated`).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Idle => "idle",
            Status::Expired => "expired",
            Status::Terminated => "terminated",
        }
    }

    /// Parses a wire name.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(Status::Active),
            "idle" => Some(Status::Idle),
            "expired" => Some(Status::Expired),
            "terminated" => Some(Status::Terminated),
            _ => None,
        }
    }
}

/// The kind of edge-mcp client, normalised as edge-mcp does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClientType {
    /// Claude Code.
    ClaudeCode,
    /// An IDE (`cursor`, `vscode`, `editor` map here).
    Ide,
    /// An autonomous agent.
    Agent,
    /// A command-line client; the default.
    Cli,
}

impl ClientType {
    /// Every client type.
    pub const ALL: [ClientType; 4] = [
        ClientType::ClaudeCode,
        ClientType::Ide,
        ClientType::Agent,
        ClientType::Cli,
    ];

    /// Normalises a client's `client_type`: absent or empty is `cli`,
    /// editor names are `ide`, anything else unknown is `None`.
    pub fn normalise(text: Option<&str>) -> Option<Self> {
        match text.unwrap_or("") {
            "" | "cli" => Some(ClientType::Cli),
            "claude-code" => Some(ClientType::ClaudeCode),
            "ide" | "cursor" | "vscode" | "editor" => Some(ClientType::Ide),
            "agent" => Some(ClientType::Agent),
            _ => None,
        }
    }

    /// Parses a canonical wire name exactly (used by list filters).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "claude-code" => Some(ClientType::ClaudeCode),
            "ide" => Some(ClientType::Ide),
            "agent" => Some(ClientType::Agent),
            "cli" => Some(ClientType::Cli),
            _ => None,
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientType::ClaudeCode => "claude-code",
            ClientType::Ide => "ide",
            ClientType::Agent => "agent",
            ClientType::Cli => "cli",
        }
    }
}

/// What the passage of time does to a live session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing is due.
    None,
    /// `active -> idle`.
    BecomeIdle,
    /// The session is overdue; the reason is `idle_timeout` or `ttl_expired`.
    Expire(&'static str),
}

/// Termination reason for an idle-timeout expiry.
pub const REASON_IDLE_TIMEOUT: &str = "idle_timeout";
/// Termination reason for a ttl expiry.
pub const REASON_TTL_EXPIRED: &str = "ttl_expired";
/// Termination reason when a DELETE gives none.
pub const REASON_CLIENT_REQUEST: &str = "client_request";
/// Termination reason when an operator gives none (the admin API).
pub const REASON_ADMIN_REQUEST: &str = "admin_request";
/// Termination reason of a session revoked for refresh-token reuse.
pub const REASON_REFRESH_TOKEN_REUSE: &str = "refresh_token_reuse";
/// The reasons only the engine gives: they mean something to audits and to
/// the WebSocket's close codes, so a client may not give them.
pub const ENGINE_REASONS: [&str; 4] = [
    REASON_IDLE_TIMEOUT,
    REASON_TTL_EXPIRED,
    REASON_REFRESH_TOKEN_REUSE,
    REASON_ADMIN_REQUEST,
];

/// Fraction of the lifetime (the ttl, counted from creation or the last
/// refresh) after which `should_refresh` turns true.
const REFRESH_AFTER_FRACTION: f64 = 0.8;

/// The whole state of one session: what the actor owns and what sled stores.
///
/// Its stored form is that of a plain struct of the wire fields in their
/// documented order (see `StoredSessionRef`); in memory, a few of them are
/// kept more compactly, since a million of these live at once.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// Server-assigned row id (UUID v7).
    pub id: Uuid,
    /// The client-visible id, unique within the tenant.
    pub session_id: Arc<str>,
    /// The owning tenant.
    pub tenant_id: Uuid,
    /// The user the session acts for, if any.
    pub user_id: Option<Uuid>,
    /// The edge-mcp instance that opened it, the client's name and version,
    /// and the client's metadata (a JSON object kept as compact JSON text).
    pub client: ClientText,
    /// Normalised client kind.
    pub client_type: ClientType,
    /// Lifecycle status.
    pub status: Status,
    /// Whether the client finished its MCP initialisation.
    pub initialized: bool,
    /// Names of the passthrough credential providers.
    pub passthrough_providers: Box<[Box<str>]>,
    /// Executions recorded, failed ones included.
    pub tool_execution_count: u64,
    /// Executions with an error.
    pub tool_error_count: u64,
    /// Tokens used over all executions.
    pub total_tokens_used: u64,
    /// When the session was created.
    pub created_at: Millis,
    /// When the current lifetime began: creation, or the last refresh.
    pub lifetime_start: Millis,
    /// Last activity (heartbeat, tool call, update, refresh).
    pub last_activity_at: Millis,
    /// Idle timeout in seconds.
    pub idle_timeout_seconds: u32,
    /// Absolute lifetime in seconds.
    pub ttl_seconds: u32,
    /// When and why it ended, for final sessions only (boxed: the sessions
    /// kept in memory are the live ones).
    pub ending: Option<Box<Ending>>,
    /// Increases with every state change except activity timestamps.
    pub version: u64,
    /// Per-tool counters.
    pub tools: Box<[ToolStats]>,
    /// Sealed passthrough credentials and token hashes.
    pub credentials: SessionCredentials,
}

/// When and why a session ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Ending {
    /// When it ended.
    pub at: Millis,
    /// Why (`termination_reason`).
    pub reason: Box<str>,
}

/// A session as it is stored (sled records, backups): the fields in their
/// order of the first format, so records written by earlier releases and by
/// this one are the same bytes. Serialising borrows from the [`Session`].
/// `credentials` stays last, so records written before it existed still
/// decode (see `persist::record`).
#[derive(Serialize)]
struct StoredSessionRef<'a> {
    id: &'a Uuid,
    session_id: &'a str,
    tenant_id: &'a Uuid,
    user_id: &'a Option<Uuid>,
    edge_mcp_id: &'a str,
    client_name: Option<&'a str>,
    client_type: ClientType,
    client_version: Option<&'a str>,
    status: Status,
    initialized: bool,
    connection_metadata: &'a str,
    passthrough_providers: &'a [Box<str>],
    tool_execution_count: u64,
    tool_error_count: u64,
    total_tokens_used: u64,
    created_at: Millis,
    lifetime_start: Millis,
    last_activity_at: Millis,
    idle_timeout_seconds: u32,
    ttl_seconds: u32,
    terminated_at: Option<Millis>,
    termination_reason: Option<&'a str>,
    version: u64,
    tools: &'a [ToolStats],
    credentials: &'a SessionCredentials,
}

/// The decoding counterpart of [`StoredSessionRef`]. Its texts borrow from
/// the record where the decoder allows (postcard does), so decoding a
/// session allocates its texts once, joined, rather than once each and
/// again to join them (recovery decodes a million of these).
#[derive(Deserialize)]
struct StoredSession<'a> {
    id: Uuid,
    session_id: Arc<str>,
    tenant_id: Uuid,
    user_id: Option<Uuid>,
    #[serde(borrow)]
    edge_mcp_id: Cow<'a, str>,
    #[serde(borrow)]
    client_name: Option<Text<'a>>,
    client_type: ClientType,
    #[serde(borrow)]
    client_version: Option<Text<'a>>,
    status: Status,
    initialized: bool,
    #[serde(borrow)]
    connection_metadata: Cow<'a, str>,
    passthrough_providers: Box<[Box<str>]>,
    tool_execution_count: u64,
    tool_error_count: u64,
    total_tokens_used: u64,
    created_at: Millis,
    lifetime_start: Millis,
    last_activity_at: Millis,
    idle_timeout_seconds: u32,
    ttl_seconds: u32,
    terminated_at: Option<Millis>,
    termination_reason: Option<Box<str>>,
    version: u64,
    tools: Box<[ToolStats]>,
    credentials: SessionCredentials,
}

/// A text that borrows from the record when it can. serde borrows only for
/// a field that is itself a `Cow`, not for one inside an `Option`; a
/// newtype is stored exactly as what it wraps.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl Serialize for Session {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        StoredSessionRef {
            id: &self.id,
            session_id: &self.session_id,
            tenant_id: &self.tenant_id,
            user_id: &self.user_id,
            edge_mcp_id: self.client.edge_mcp_id(),
            client_name: self.client.client_name(),
            client_type: self.client_type,
            client_version: self.client.client_version(),
            status: self.status,
            initialized: self.initialized,
            connection_metadata: self.client.metadata(),
            passthrough_providers: &self.passthrough_providers,
            tool_execution_count: self.tool_execution_count,
            tool_error_count: self.tool_error_count,
            total_tokens_used: self.total_tokens_used,
            created_at: self.created_at,
            lifetime_start: self.lifetime_start,
            last_activity_at: self.last_activity_at,
            idle_timeout_seconds: self.idle_timeout_seconds,
            ttl_seconds: self.ttl_seconds,
            terminated_at: self.terminated_at(),
            termination_reason: self.termination_reason(),
            version: self.version,
            tools: &self.tools,
            credentials: &self.credentials,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Session {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let stored = StoredSession::deserialize(deserializer)?;
        // A final record has both; one without the other was never written,
        // and reads as ended at its time with no reason rather than failing.
        let ending = stored.terminated_at.map(|at| {
            Box::new(Ending {
                at,
                reason: stored.termination_reason.unwrap_or_default(),
            })
        });
        Ok(Session {
            id: stored.id,
            session_id: stored.session_id,
            tenant_id: stored.tenant_id,
            user_id: stored.user_id,
            client: ClientText::new(
                &stored.edge_mcp_id,
                stored.client_name.as_ref().map(|t| &*t.0),
                stored.client_version.as_ref().map(|t| &*t.0),
                &stored.connection_metadata,
            )
            .map_err(serde::de::Error::custom)?,
            client_type: stored.client_type,
            status: stored.status,
            initialized: stored.initialized,
            passthrough_providers: stored.passthrough_providers,
            tool_execution_count: stored.tool_execution_count,
            tool_error_count: stored.tool_error_count,
            total_tokens_used: stored.total_tokens_used,
            created_at: stored.created_at,
            lifetime_start: stored.lifetime_start,
            last_activity_at: stored.last_activity_at,
            idle_timeout_seconds: stored.idle_timeout_seconds,
            ttl_seconds: stored.ttl_seconds,
            ending,
            version: stored.version,
            tools: stored.tools,
            credentials: stored.credentials,
        })
    }
}

/// What a session keeps to authenticate its client and to hand its
/// credentials on: never plaintext.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionCredentials {
    /// The passthrough bundle, sealed by the vault (bound to tenant and row id).
    pub passthrough: Option<Box<[u8]>>,
    /// Hash of the current session token (`est_`).
    pub session_token: TokenHash,
    /// Hash of the current refresh token (`ert_`).
    pub refresh_token: TokenHash,
    /// Hashes of refresh tokens rotated away: presenting one revokes the
    /// session (the most recent [`RETIRED_REFRESH_KEPT`]).
    pub retired_refresh: Box<[TokenHash]>,
}

/// Rotated-away refresh tokens remembered per session.
pub const RETIRED_REFRESH_KEPT: usize = 16;

/// What presenting a refresh token means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshCheck {
    /// The current one: rotate.
    Current,
    /// One rotated away: the pair leaked, revoke the session.
    Reused,
    /// Not this session's.
    Unknown,
}

impl SessionCredentials {
    /// Classifies a presented refresh token (constant-time comparisons).
    pub fn check_refresh(&self, presented: &TokenHash) -> RefreshCheck {
        if self.refresh_token.matches(presented) {
            RefreshCheck::Current
        } else if self.retired_refresh.iter().any(|h| h.matches(presented)) {
            RefreshCheck::Reused
        } else {
            RefreshCheck::Unknown
        }
    }

    /// Installs a new pair, retiring the current refresh token.
    pub fn rotate(&mut self, session_token: TokenHash, refresh_token: TokenHash) {
        let old = std::mem::replace(&mut self.refresh_token, refresh_token);
        let mut retired = std::mem::take(&mut self.retired_refresh).into_vec();
        retired.push(old);
        if retired.len() > RETIRED_REFRESH_KEPT {
            retired.remove(0);
        }
        self.retired_refresh = retired.into_boxed_slice();
        self.session_token = session_token;
    }
}

/// A PATCH: every field optional; `None` leaves a field unchanged.
#[derive(Debug, Clone, Default)]
pub struct SessionUpdate {
    /// New client name.
    pub client_name: Option<String>,
    /// New client version.
    pub client_version: Option<String>,
    /// New initialised flag.
    pub initialized: Option<bool>,
    /// New metadata (compact JSON object text).
    pub connection_metadata: Option<String>,
    /// New user id.
    pub user_id: Option<Uuid>,
}

impl Session {
    /// When it ended, for final sessions.
    pub fn terminated_at(&self) -> Option<Millis> {
        self.ending.as_ref().map(|ending| ending.at)
    }

    /// Why it ended, for final sessions.
    pub fn termination_reason(&self) -> Option<&str> {
        self.ending.as_ref().map(|ending| &*ending.reason)
    }

    /// The instant the session expires unless it sees activity:
    /// `min(last_activity + idle_timeout, lifetime_start + ttl)`.
    pub fn expires_at(&self) -> Millis {
        self.idle_deadline().min(self.ttl_deadline())
    }

    fn idle_deadline(&self) -> Millis {
        self.last_activity_at + secs(self.idle_timeout_seconds)
    }

    /// When the absolute ttl ends the session, activity or not.
    pub fn ttl_deadline(&self) -> Millis {
        self.lifetime_start + secs(self.ttl_seconds)
    }

    /// What is due at `now`, given the `idle_after` threshold.
    pub fn due(&self, now: Millis, idle_after_ms: Millis) -> Transition {
        if self.status.is_final() {
            return Transition::None;
        }
        if now >= self.expires_at() {
            return Transition::Expire(self.expiry_reason());
        }
        if self.status == Status::Active && now >= self.last_activity_at + idle_after_ms {
            return Transition::BecomeIdle;
        }
        Transition::None
    }

    /// Which deadline an overdue session hit first.
    fn expiry_reason(&self) -> &'static str {
        if self.idle_deadline() <= self.ttl_deadline() {
            REASON_IDLE_TIMEOUT
        } else {
            REASON_TTL_EXPIRED
        }
    }

    /// The next instant at which [`Session::due`] may change its answer.
    pub fn next_deadline(&self, idle_after_ms: Millis) -> Millis {
        let expires = self.expires_at();
        match self.status {
            Status::Active => expires.min(self.last_activity_at + idle_after_ms),
            _ => expires,
        }
    }

    /// Fails with the right 410 error when the session has ended.
    pub fn ensure_live(&self) -> Result<(), SessionError> {
        match self.status {
            Status::Expired => Err(SessionError::Expired),
            Status::Terminated => Err(SessionError::Terminated),
            Status::Active | Status::Idle => Ok(()),
        }
    }

    /// Records activity at `now`. An idle session becomes active again,
    /// which is a status change and bumps the version.
    pub fn touch(&mut self, now: Millis) {
        self.last_activity_at = self.last_activity_at.max(now);
        if self.status == Status::Idle {
            self.status = Status::Active;
            self.version += 1;
        }
    }

    /// `active -> idle`.
    pub fn become_idle(&mut self) {
        if self.status == Status::Active {
            self.status = Status::Idle;
            self.version += 1;
        }
    }

    /// Ends the session with a final `status` and `reason` at `at`.
    pub fn finish(&mut self, status: Status, reason: &str, at: Millis) {
        debug_assert!(status.is_final());
        self.status = status;
        self.ending = Some(Box::new(Ending {
            at,
            reason: reason.into(),
        }));
        self.version += 1;
    }

    /// Applies a PATCH at `now`. It counts as activity; the version moves
    /// only when a field is given. A text too long to keep changes nothing
    /// (the API refuses such texts before they get here).
    pub fn apply_update(&mut self, update: SessionUpdate, now: Millis) -> Result<(), SessionError> {
        let changed = update.client_name.is_some()
            || update.client_version.is_some()
            || update.initialized.is_some()
            || update.connection_metadata.is_some()
            || update.user_id.is_some();
        if update.client_name.is_some()
            || update.client_version.is_some()
            || update.connection_metadata.is_some()
        {
            self.client = self.client.with(
                update.client_name.as_deref(),
                update.client_version.as_deref(),
                update.connection_metadata.as_deref(),
            )?;
        }
        if let Some(initialized) = update.initialized {
            self.initialized = initialized;
        }
        if let Some(user_id) = update.user_id {
            self.user_id = Some(user_id);
        }
        self.touch(now);
        if changed {
            self.version += 1;
        }
        Ok(())
    }

    /// Restarts the lifetime at `now` (refresh).
    pub fn refresh(&mut self, now: Millis) {
        self.touch(now);
        self.lifetime_start = now;
        self.version += 1;
    }

    /// Records one tool execution; it also counts as activity at `now`.
    pub fn record_execution(&mut self, execution: &ToolExecution, now: Millis) {
        self.touch(now);
        let failed = execution.error.is_some();
        self.tool_execution_count += 1;
        self.tool_error_count += u64::from(failed);
        self.total_tokens_used = self.total_tokens_used.saturating_add(execution.tokens_used);
        let index = match self
            .tools
            .iter()
            .position(|t| *t.name == *execution.tool_name)
        {
            Some(index) => index,
            None => {
                // A new tool name is rare against calls of known ones, so the
                // list is a boxed slice (8 bytes less than a `Vec` in every
                // session), rebuilt here.
                let mut tools = std::mem::take(&mut self.tools).into_vec();
                tools.push(ToolStats {
                    name: execution.tool_name.as_str().into(),
                    ..ToolStats::default()
                });
                self.tools = tools.into_boxed_slice();
                self.tools.len() - 1
            }
        };
        let tool = &mut self.tools[index];
        tool.count += 1;
        tool.errors += u64::from(failed);
        tool.tokens = tool.tokens.saturating_add(execution.tokens_used);
        tool.durations.record(execution.duration_ms);
        self.version += 1;
    }

    /// The wire representation at `now`.
    pub fn view(&self, now: Millis) -> SessionView {
        let expires_at = self.expires_at();
        let end = self.terminated_at().unwrap_or(now);
        SessionView {
            id: self.id,
            session_id: self.session_id.to_string(),
            tenant_id: self.tenant_id,
            user_id: self.user_id,
            edge_mcp_id: self.client.edge_mcp_id().to_owned(),
            client_name: self.client.client_name().map(str::to_owned),
            client_type: self.client_type.as_str(),
            client_version: self.client.client_version().map(str::to_owned),
            status: self.status.as_str(),
            initialized: self.initialized,
            connection_metadata: metadata_json(self.client.metadata()),
            has_passthrough_auth: !self.passthrough_providers.is_empty(),
            passthrough_providers: self
                .passthrough_providers
                .iter()
                .map(|p| p.to_string())
                .collect(),
            tool_execution_count: self.tool_execution_count,
            tool_error_count: self.tool_error_count,
            total_tokens_used: self.total_tokens_used,
            created_at: format_rfc3339(self.created_at),
            last_activity_at: format_rfc3339(self.last_activity_at),
            expires_at: format_rfc3339(expires_at),
            idle_timeout_seconds: self.idle_timeout_seconds,
            ttl_seconds: self.ttl_seconds,
            terminated_at: self.terminated_at().map(format_rfc3339),
            termination_reason: self.termination_reason().map(str::to_owned),
            version: self.version,
            session_age_seconds: ((end - self.created_at).max(0) / 1000) as u64,
            idle_seconds: ((end - self.last_activity_at).max(0) / 1000) as u64,
            is_expired: self.status == Status::Expired
                || (!self.status.is_final() && now >= expires_at),
            should_refresh: !self.status.is_final()
                && (now - self.lifetime_start) as f64
                    >= REFRESH_AFTER_FRACTION * secs(self.ttl_seconds) as f64,
        }
    }
}

impl Session {
    /// Per-session metrics: totals, and per tool count, errors, tokens and
    /// duration mean/p50/p99/max.
    pub fn metrics(&self) -> SessionMetrics {
        SessionMetrics {
            session_id: self.session_id.to_string(),
            tool_execution_count: self.tool_execution_count,
            tool_error_count: self.tool_error_count,
            total_tokens_used: self.total_tokens_used,
            tools: self
                .tools
                .iter()
                .map(|t| {
                    let metrics = ToolMetrics {
                        count: t.count,
                        errors: t.errors,
                        tokens: t.tokens,
                        mean_ms: t.durations.mean(),
                        p50_ms: t.durations.quantile(0.50),
                        p99_ms: t.durations.quantile(0.99),
                        max_ms: t.durations.max(),
                    };
                    (t.name.to_string(), metrics)
                })
                .collect(),
        }
    }
}

/// The per-session metrics resource.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SessionMetrics {
    /// The session's id.
    pub session_id: String,
    /// Executions, failed ones included.
    pub tool_execution_count: u64,
    /// Failed executions.
    pub tool_error_count: u64,
    /// Tokens over all executions.
    pub total_tokens_used: u64,
    /// Per tool name.
    pub tools: std::collections::BTreeMap<String, ToolMetrics>,
}

/// One tool's figures within a session.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ToolMetrics {
    /// Executions.
    pub count: u64,
    /// Failed executions.
    pub errors: u64,
    /// Tokens used.
    pub tokens: u64,
    /// Mean duration.
    pub mean_ms: f64,
    /// Median duration (bucketed, within 6.25 %).
    pub p50_ms: u64,
    /// 99th percentile duration (bucketed, within 6.25 %).
    pub p99_ms: u64,
    /// Longest duration, exact.
    pub max_ms: u64,
}

fn metadata_json(text: &str) -> Box<serde_json::value::RawValue> {
    serde_json::value::RawValue::from_string(text.to_owned()).unwrap_or_else(|_| {
        // Metadata is validated as a JSON object before it is stored, so
        // this only guards against a corrupted record.
        serde_json::value::RawValue::from_string("{}".to_owned()).expect("{} is valid JSON")
    })
}

/// The session resource of the wire contract (fields as documented there).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[allow(missing_docs)]
#[schema(as = Session)]
pub struct SessionView {
    pub id: Uuid,
    pub session_id: String,
    pub tenant_id: Uuid,
    pub user_id: Option<Uuid>,
    pub edge_mcp_id: String,
    pub client_name: Option<String>,
    #[schema(value_type = String, pattern = "^(claude-code|ide|agent|cli)$")]
    pub client_type: &'static str,
    pub client_version: Option<String>,
    #[schema(value_type = String, pattern = "^(active|idle|expired|terminated)$")]
    pub status: &'static str,
    pub initialized: bool,
    #[schema(value_type = Object)]
    pub connection_metadata: Box<serde_json::value::RawValue>,
    pub has_passthrough_auth: bool,
    pub passthrough_providers: Vec<String>,
    pub tool_execution_count: u64,
    pub tool_error_count: u64,
    pub total_tokens_used: u64,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub last_activity_at: String,
    #[schema(format = DateTime)]
    pub expires_at: String,
    pub idle_timeout_seconds: u32,
    pub ttl_seconds: u32,
    #[schema(format = DateTime)]
    pub terminated_at: Option<String>,
    pub termination_reason: Option<String>,
    pub version: u64,
    pub session_age_seconds: u64,
    pub idle_seconds: u64,
    pub is_expired: bool,
    pub should_refresh: bool,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A successful `grep` call made and recorded at `at`.
    pub(crate) fn execution_at(at: Millis) -> ToolExecution {
        ToolExecution {
            tool_name: "grep".into(),
            tool_id: None,
            arguments: "{}".into(),
            result: "{}".into(),
            error: None,
            duration_ms: 1,
            tokens_used: 2,
            executed_at: at,
            recorded_at: at,
        }
    }

    pub(crate) fn session_at(now: Millis, idle_timeout: u32, ttl: u32) -> Session {
        Session {
            id: Uuid::now_v7(),
            session_id: "s-1".into(),
            tenant_id: Uuid::nil(),
            user_id: None,
            client: ClientText::new("edge", None, None, "{}").unwrap(),
            client_type: ClientType::Cli,
            status: Status::Active,
            initialized: false,
            passthrough_providers: Box::default(),
            tool_execution_count: 0,
            tool_error_count: 0,
            total_tokens_used: 0,
            created_at: now,
            lifetime_start: now,
            last_activity_at: now,
            idle_timeout_seconds: idle_timeout,
            ttl_seconds: ttl,
            ending: None,
            version: 1,
            tools: Box::default(),
            credentials: SessionCredentials::default(),
        }
    }

    const IDLE_AFTER: Millis = 300_000;

    /// The record layout up to this release: the wire fields as plain
    /// owned fields, in order. The compact in-memory form must store the
    /// same bytes, or data dirs and backups of earlier releases misread.
    #[derive(Serialize)]
    struct PlainSession {
        id: Uuid,
        session_id: Arc<str>,
        tenant_id: Uuid,
        user_id: Option<Uuid>,
        edge_mcp_id: Box<str>,
        client_name: Option<Box<str>>,
        client_type: ClientType,
        client_version: Option<Box<str>>,
        status: Status,
        initialized: bool,
        connection_metadata: Box<str>,
        passthrough_providers: Vec<Box<str>>,
        tool_execution_count: u64,
        tool_error_count: u64,
        total_tokens_used: u64,
        created_at: Millis,
        lifetime_start: Millis,
        last_activity_at: Millis,
        idle_timeout_seconds: u32,
        ttl_seconds: u32,
        terminated_at: Option<Millis>,
        termination_reason: Option<Box<str>>,
        version: u64,
        tools: Vec<ToolStats>,
        credentials: SessionCredentials,
    }

    /// The plain layout of `s`, with the parts it keeps compactly in
    /// memory given as they were written: the four texts and the ending.
    fn plain(
        s: &Session,
        (edge_mcp_id, client_name, client_version, metadata): (
            &str,
            Option<&str>,
            Option<&str>,
            &str,
        ),
        ending: Option<(Millis, &str)>,
    ) -> PlainSession {
        PlainSession {
            id: s.id,
            session_id: s.session_id.clone(),
            tenant_id: s.tenant_id,
            user_id: s.user_id,
            edge_mcp_id: edge_mcp_id.into(),
            client_name: client_name.map(Into::into),
            client_type: s.client_type,
            client_version: client_version.map(Into::into),
            status: s.status,
            initialized: s.initialized,
            connection_metadata: metadata.into(),
            passthrough_providers: s.passthrough_providers.to_vec(),
            tool_execution_count: s.tool_execution_count,
            tool_error_count: s.tool_error_count,
            total_tokens_used: s.total_tokens_used,
            created_at: s.created_at,
            lifetime_start: s.lifetime_start,
            last_activity_at: s.last_activity_at,
            idle_timeout_seconds: s.idle_timeout_seconds,
            ttl_seconds: s.ttl_seconds,
            terminated_at: ending.map(|(at, _)| at),
            termination_reason: ending.map(|(_, reason)| reason.into()),
            version: s.version,
            tools: s.tools.to_vec(),
            credentials: s.credentials.clone(),
        }
    }

    /// `s` stores the bytes of `plain`, and decodes back to itself.
    fn assert_stores_as(s: &Session, plain: &PlainSession) -> Session {
        let bytes = postcard::to_allocvec(s).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(plain).unwrap());
        let back: Session = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(&back, s);
        back
    }

    #[test]
    fn the_compact_session_stores_the_bytes_of_the_plain_layout() {
        let mut s = session_at(1_700_000_000_000, 60, 3600);
        s.user_id = Some(Uuid::now_v7());
        s.client = ClientText::new("edge-7", Some("Claude Code"), None, r#"{"k":"v"}"#).unwrap();
        s.passthrough_providers = vec!["github".into(), "jira".into()].into();
        s.record_execution(&execution_at(1_700_000_000_500), 1_700_000_000_500);
        s.credentials.passthrough = Some(vec![9, 8, 7].into());
        s.credentials.rotate(TokenHash([1; 32]), TokenHash([2; 32]));
        s.finish(Status::Terminated, REASON_CLIENT_REQUEST, 1_700_000_001_000);
        let texts = ("edge-7", Some("Claude Code"), None, r#"{"k":"v"}"#);
        let ending = Some((1_700_000_001_000, REASON_CLIENT_REQUEST));
        let back = assert_stores_as(&s, &plain(&s, texts, ending));
        assert_eq!(back.termination_reason(), Some(REASON_CLIENT_REQUEST));
        assert_eq!(back.client.client_version(), None);
    }

    #[test]
    fn a_live_session_with_empty_names_stores_the_plain_bytes_too() {
        let mut s = session_at(1_700_000_000_000, 60, 3600);
        s.client = ClientText::new("e", Some(""), Some(""), "{}").unwrap();
        let back = assert_stores_as(&s, &plain(&s, ("e", Some(""), Some(""), "{}"), None));
        assert_eq!(back.client.client_name(), Some(""));
        assert_eq!(back.terminated_at(), None);
    }

    #[test]
    fn expires_at_the_earlier_deadline() {
        let s = session_at(0, 60, 3600);
        assert_eq!(s.expires_at(), 60_000);
        assert_eq!(s.due(59_999, IDLE_AFTER), Transition::None);
        assert_eq!(
            s.due(60_000, IDLE_AFTER),
            Transition::Expire(REASON_IDLE_TIMEOUT)
        );

        let s = session_at(0, 3600, 60);
        assert_eq!(
            s.due(60_000, IDLE_AFTER),
            Transition::Expire(REASON_TTL_EXPIRED)
        );
    }

    #[test]
    fn activity_pushes_the_idle_deadline_but_not_the_ttl() {
        let mut s = session_at(0, 60, 100);
        s.touch(50_000);
        assert_eq!(s.expires_at(), 100_000);
        assert_eq!(s.version, 1, "heartbeats do not bump the version");
        assert_eq!(
            s.due(100_000, IDLE_AFTER),
            Transition::Expire(REASON_TTL_EXPIRED)
        );
    }

    #[test]
    fn idle_then_active_again_bumps_the_version_twice() {
        let mut s = session_at(0, 3600, 86_400);
        assert_eq!(s.next_deadline(IDLE_AFTER), IDLE_AFTER);
        assert_eq!(s.due(IDLE_AFTER, IDLE_AFTER), Transition::BecomeIdle);
        s.become_idle();
        assert_eq!(s.status, Status::Idle);
        assert_eq!(s.next_deadline(IDLE_AFTER), 3_600_000);
        s.touch(IDLE_AFTER + 1);
        assert_eq!(s.status, Status::Active);
        assert_eq!(s.version, 3);
    }

    #[test]
    fn refresh_restarts_the_lifetime() {
        let mut s = session_at(0, 3600, 100);
        s.refresh(90_000);
        assert_eq!(s.expires_at(), 190_000);
        assert_eq!(s.version, 2);
    }

    #[test]
    fn executions_count_errors_and_tokens_per_tool() {
        let mut s = session_at(0, 3600, 86_400);
        let mut call = ToolExecution {
            tool_name: "grep".into(),
            tool_id: None,
            arguments: "{}".into(),
            result: "{}".into(),
            error: None,
            duration_ms: 10,
            tokens_used: 5,
            executed_at: 1,
            recorded_at: 1,
        };
        s.record_execution(&call, 1);
        call.error = Some("boom".into());
        s.record_execution(&call, 2);
        assert_eq!(
            (
                s.tool_execution_count,
                s.tool_error_count,
                s.total_tokens_used
            ),
            (2, 1, 10)
        );
        assert_eq!(s.tools.len(), 1);
        assert_eq!((s.tools[0].count, s.tools[0].errors), (2, 1));
        assert_eq!(s.version, 3);
    }

    #[test]
    fn should_refresh_follows_the_ttl_not_the_idle_deadline() {
        let s = session_at(0, 1800, 86_400);
        assert!(!s.view(3_600_000).should_refresh);
        assert!(s.view(69_120_000).should_refresh);
    }

    #[test]
    fn view_flags() {
        let s = session_at(0, 100, 100);
        let v = s.view(79_000);
        assert!(!v.should_refresh);
        assert!(!v.is_expired);
        let v = s.view(80_000);
        assert!(v.should_refresh);
        assert_eq!(v.expires_at, "1970-01-01T00:01:40.000Z");
        assert!(s.view(100_000).is_expired);
    }

    #[test]
    fn final_sessions_answer_410() {
        let mut s = session_at(0, 100, 100);
        s.finish(Status::Terminated, REASON_CLIENT_REQUEST, 5);
        assert_eq!(s.ensure_live(), Err(SessionError::Terminated));
        assert_eq!(s.due(1_000_000, IDLE_AFTER), Transition::None);
        assert_eq!(s.view(1_000_000).session_age_seconds, 0);
    }

    #[test]
    fn client_types_are_normalised() {
        assert_eq!(ClientType::normalise(None), Some(ClientType::Cli));
        assert_eq!(ClientType::normalise(Some("")), Some(ClientType::Cli));
        assert_eq!(ClientType::normalise(Some("vscode")), Some(ClientType::Ide));
        assert_eq!(
            ClientType::normalise(Some("claude-code")),
            Some(ClientType::ClaudeCode)
        );
        assert_eq!(ClientType::normalise(Some("emacs")), None);
    }
}
