//! A session's state and the rules of its lifecycle (expiry, idleness,
//! versions), as pure functions of the state and the current time.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Server-assigned row id (UUID v7).
    pub id: Uuid,
    /// The client-visible id, unique within the tenant.
    pub session_id: Arc<str>,
    /// The owning tenant.
    pub tenant_id: Uuid,
    /// The user the session acts for, if any.
    pub user_id: Option<Uuid>,
    /// The edge-mcp instance that opened it.
    pub edge_mcp_id: Box<str>,
    /// Client display name.
    pub client_name: Option<Box<str>>,
    /// Normalised client kind.
    pub client_type: ClientType,
    /// Client version string.
    pub client_version: Option<Box<str>>,
    /// Lifecycle status.
    pub status: Status,
    /// Whether the client finished its MCP initialisation.
    pub initialized: bool,
    /// Client metadata, a JSON object kept as compact JSON text.
    pub connection_metadata: Box<str>,
    /// Names of the passthrough credential providers.
    pub passthrough_providers: Vec<Box<str>>,
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
    /// When it ended, for final sessions.
    pub terminated_at: Option<Millis>,
    /// Why it ended, for final sessions.
    pub termination_reason: Option<Box<str>>,
    /// Increases with every state change except activity timestamps.
    pub version: u64,
    /// Per-tool counters.
    pub tools: Vec<ToolStats>,
    /// Sealed passthrough credentials and token hashes. Last, so records
    /// written before it existed still decode (see `persist::record`).
    pub credentials: SessionCredentials,
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
    pub retired_refresh: Vec<TokenHash>,
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
        self.retired_refresh.push(old);
        if self.retired_refresh.len() > RETIRED_REFRESH_KEPT {
            self.retired_refresh.remove(0);
        }
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
        self.terminated_at = Some(at);
        self.termination_reason = Some(reason.into());
        self.version += 1;
    }

    /// Applies a PATCH at `now`. It counts as activity; the version moves
    /// only when a field is given.
    pub fn apply_update(&mut self, update: SessionUpdate, now: Millis) {
        let changed = update.client_name.is_some()
            || update.client_version.is_some()
            || update.initialized.is_some()
            || update.connection_metadata.is_some()
            || update.user_id.is_some();
        if let Some(name) = update.client_name {
            self.client_name = Some(name.into());
        }
        if let Some(version) = update.client_version {
            self.client_version = Some(version.into());
        }
        if let Some(initialized) = update.initialized {
            self.initialized = initialized;
        }
        if let Some(metadata) = update.connection_metadata {
            self.connection_metadata = metadata.into();
        }
        if let Some(user_id) = update.user_id {
            self.user_id = Some(user_id);
        }
        self.touch(now);
        if changed {
            self.version += 1;
        }
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
                self.tools.push(ToolStats {
                    name: execution.tool_name.as_str().into(),
                    ..ToolStats::default()
                });
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
        let end = self.terminated_at.unwrap_or(now);
        SessionView {
            id: self.id,
            session_id: self.session_id.to_string(),
            tenant_id: self.tenant_id,
            user_id: self.user_id,
            edge_mcp_id: self.edge_mcp_id.to_string(),
            client_name: self.client_name.as_deref().map(str::to_owned),
            client_type: self.client_type.as_str(),
            client_version: self.client_version.as_deref().map(str::to_owned),
            status: self.status.as_str(),
            initialized: self.initialized,
            connection_metadata: metadata_json(&self.connection_metadata),
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
            terminated_at: self.terminated_at.map(format_rfc3339),
            termination_reason: self.termination_reason.as_deref().map(str::to_owned),
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
            edge_mcp_id: "edge".into(),
            client_name: None,
            client_type: ClientType::Cli,
            client_version: None,
            status: Status::Active,
            initialized: false,
            connection_metadata: "{}".into(),
            passthrough_providers: Vec::new(),
            tool_execution_count: 0,
            tool_error_count: 0,
            total_tokens_used: 0,
            created_at: now,
            lifetime_start: now,
            last_activity_at: now,
            idle_timeout_seconds: idle_timeout,
            ttl_seconds: ttl,
            terminated_at: None,
            termination_reason: None,
            version: 1,
            tools: Vec::new(),
            credentials: SessionCredentials::default(),
        }
    }

    const IDLE_AFTER: Millis = 300_000;

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
