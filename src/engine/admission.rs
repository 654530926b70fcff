//! Turning a create request into a session: field rules, tenant caps and
//! defaults. [`super::tenant::admit`] then decides whether it fits.

use uuid::Uuid;

use crate::model::ids::{generate_session_id, is_valid_session_id};
use crate::model::session::{SessionCredentials, ENGINE_REASONS};
use crate::model::{ClientText, ClientType, Millis, Session, SessionError, Status};

/// Longest free-text field (names, versions, edge_mcp_id, tool names).
pub const MAX_TEXT_LEN: usize = 255;
/// Largest `metadata` / `connection_metadata` object, as compact JSON.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Most passthrough credential providers per session.
pub const MAX_PROVIDERS: usize = 32;

/// A tenant's limits, from configuration.
#[derive(Debug, Clone)]
pub struct TenantLimits {
    /// The tenant's id.
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// Live sessions allowed at once.
    pub max_active_sessions: usize,
    /// Cap on `ttl`.
    pub max_ttl_seconds: u32,
    /// Cap on `idle_timeout`.
    pub max_idle_timeout_seconds: u32,
}

/// Engine-wide session defaults.
#[derive(Debug, Clone, Copy)]
pub struct SessionDefaults {
    /// Idle timeout when none is asked for.
    pub idle_timeout_seconds: u32,
    /// Ttl when none is asked for.
    pub ttl_seconds: u32,
}

/// A create request, already decoded from JSON.
#[derive(Debug, Clone, Default)]
pub struct NewSession {
    /// Client-chosen id, if any.
    pub session_id: Option<String>,
    /// Required edge-mcp id.
    pub edge_mcp_id: String,
    /// Client display name.
    pub client_name: Option<String>,
    /// Raw client type, normalised here.
    pub client_type: Option<String>,
    /// Client version.
    pub client_version: Option<String>,
    /// User id.
    pub user_id: Option<Uuid>,
    /// Provider names of the passthrough credentials.
    pub passthrough_providers: Vec<String>,
    /// The passthrough bundle (JSON), sealed by the engine at admission.
    pub passthrough: Option<crate::crypto::Secret>,
    /// Metadata as compact JSON object text.
    pub metadata: Option<String>,
    /// Requested ttl in seconds.
    pub ttl: Option<u64>,
    /// Requested idle timeout in seconds.
    pub idle_timeout: Option<u64>,
}

/// Checks a free-text field's length.
pub fn check_text(field: &str, value: &str, min: usize) -> Result<(), SessionError> {
    let len = value.chars().count();
    if len < min || len > MAX_TEXT_LEN {
        return Err(SessionError::validation(
            field,
            format!("{field} must be {min} to {MAX_TEXT_LEN} characters"),
        ));
    }
    Ok(())
}

/// Checks a termination reason a caller gave (DELETE, `session.terminate`,
/// admin calls): 1 to [`MAX_TEXT_LEN`] characters, none of them a control
/// or format character (Unicode general categories Cc and Cf: line breaks,
/// escapes, zero-width and bidi marks, which would forge or hide text in
/// audits and logs), and not one of the engine's own reasons
/// ([`ENGINE_REASONS`]). `client_request`, the DELETE default, may be given.
pub fn check_reason(reason: &str) -> Result<(), SessionError> {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory as _};
    check_text("reason", reason, 1)?;
    if reason.chars().any(|c| {
        matches!(
            c.general_category(),
            GeneralCategory::Control | GeneralCategory::Format
        )
    }) {
        return Err(SessionError::validation(
            "reason",
            "reason must not contain control or format characters",
        ));
    }
    if ENGINE_REASONS.contains(&reason) {
        return Err(SessionError::validation(
            "reason",
            format!(
                "reason must not be one the engine uses ({})",
                ENGINE_REASONS.join(", ")
            ),
        ));
    }
    Ok(())
}

/// Checks a metadata object's size.
pub fn check_metadata(field: &str, json: &str) -> Result<(), SessionError> {
    if json.len() > MAX_METADATA_BYTES {
        return Err(SessionError::validation(
            field,
            format!("{field} must be at most {MAX_METADATA_BYTES} bytes of JSON"),
        ));
    }
    Ok(())
}

fn seconds(field: &str, asked: Option<u64>, default: u32, cap: u32) -> Result<u32, SessionError> {
    match asked {
        None => Ok(default.min(cap)),
        Some(0) => Err(SessionError::validation(
            field,
            format!("{field} must be at least 1 second"),
        )),
        Some(s) if s > u64::from(cap) => Err(SessionError::validation(
            field,
            format!("{field} must be at most {cap} seconds for this tenant"),
        )),
        Some(s) => Ok(s as u32),
    }
}

/// Validates `request` against the tenant's caps and builds the new session
/// (version 1, status active) created at `now`.
pub fn build(
    request: NewSession,
    tenant: &TenantLimits,
    defaults: SessionDefaults,
    now: Millis,
) -> Result<Session, SessionError> {
    let session_id = match request.session_id {
        Some(id) if !is_valid_session_id(&id) => {
            return Err(SessionError::validation(
                "session_id",
                "session_id must be 1 to 255 characters from A-Z a-z 0-9 . _ : @ ~ - and not a reserved word",
            ))
        }
        Some(id) => id,
        None => generate_session_id(),
    };
    check_text("edge_mcp_id", &request.edge_mcp_id, 1)?;
    for (field, value) in [
        ("client_name", &request.client_name),
        ("client_version", &request.client_version),
    ] {
        if let Some(value) = value {
            check_text(field, value, 0)?;
        }
    }
    let client_type = ClientType::normalise(request.client_type.as_deref()).ok_or_else(|| {
        SessionError::validation(
            "client_type",
            "client_type must be one of claude-code, ide, agent, cli",
        )
    })?;
    let metadata = request.metadata.unwrap_or_else(|| "{}".to_owned());
    check_metadata("metadata", &metadata)?;
    let ttl_seconds = seconds(
        "ttl",
        request.ttl,
        defaults.ttl_seconds,
        tenant.max_ttl_seconds,
    )?;
    let idle_timeout_seconds = seconds(
        "idle_timeout",
        request.idle_timeout,
        defaults.idle_timeout_seconds,
        tenant.max_idle_timeout_seconds,
    )?;
    if request.passthrough_providers.len() > MAX_PROVIDERS {
        return Err(SessionError::validation(
            "passthrough_auth.credentials",
            format!("passthrough_auth.credentials must name at most {MAX_PROVIDERS} providers"),
        ));
    }
    for provider in &request.passthrough_providers {
        check_text("passthrough_auth.credentials", provider, 1)?;
    }

    Ok(Session {
        id: Uuid::now_v7(),
        session_id: session_id.into(),
        tenant_id: tenant.id,
        user_id: request.user_id,
        client: ClientText::new(
            &request.edge_mcp_id,
            request.client_name.as_deref(),
            request.client_version.as_deref(),
            &metadata,
        )?,
        client_type,
        status: Status::Active,
        initialized: false,
        passthrough_providers: request
            .passthrough_providers
            .into_iter()
            .map(Into::into)
            .collect(),
        tool_execution_count: 0,
        tool_error_count: 0,
        total_tokens_used: 0,
        created_at: now,
        lifetime_start: now,
        last_activity_at: now,
        idle_timeout_seconds,
        ttl_seconds,
        ending: None,
        version: 1,
        tools: Box::default(),
        credentials: SessionCredentials::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> TenantLimits {
        TenantLimits {
            id: Uuid::nil(),
            name: "t".into(),
            max_active_sessions: 10,
            max_ttl_seconds: 3600,
            max_idle_timeout_seconds: 600,
        }
    }

    const DEFAULTS: SessionDefaults = SessionDefaults {
        idle_timeout_seconds: 1800,
        ttl_seconds: 86_400,
    };

    fn request() -> NewSession {
        NewSession {
            edge_mcp_id: "edge-1".into(),
            ..NewSession::default()
        }
    }

    #[test]
    fn defaults_above_the_cap_are_lowered() {
        let s = build(request(), &tenant(), DEFAULTS, 0).unwrap();
        assert_eq!((s.ttl_seconds, s.idle_timeout_seconds), (3600, 600));
        assert_eq!(s.client_type, ClientType::Cli);
        assert!(s.session_id.starts_with("ses_"));
    }

    #[test]
    fn explicit_values_above_the_cap_are_refused() {
        let mut r = request();
        r.ttl = Some(3601);
        let err = build(r, &tenant(), DEFAULTS, 0).unwrap_err();
        assert!(matches!(err, SessionError::Validation { ref field, .. } if field == "ttl"));
        let mut r = request();
        r.idle_timeout = Some(0);
        assert!(build(r, &tenant(), DEFAULTS, 0).is_err());
    }

    #[test]
    fn bad_fields_are_named() {
        let mut r = request();
        r.edge_mcp_id = String::new();
        let err = build(r, &tenant(), DEFAULTS, 0).unwrap_err();
        assert!(
            matches!(err, SessionError::Validation { ref field, .. } if field == "edge_mcp_id")
        );
        let mut r = request();
        r.session_id = Some("no spaces".into());
        assert!(build(r, &tenant(), DEFAULTS, 0).is_err());
        let mut r = request();
        r.client_type = Some("emacs".into());
        assert!(build(r, &tenant(), DEFAULTS, 0).is_err());
        let mut r = request();
        r.client_name = Some("x".repeat(256));
        assert!(build(r, &tenant(), DEFAULTS, 0).is_err());
    }

    #[test]
    fn reasons_follow_the_contract() {
        for good in [
            "done",
            "client_request",
            "user closed the laptop",
            "日本語",
            "a",
        ] {
            assert!(check_reason(good).is_ok(), "{good:?}");
        }
        let long = "x".repeat(MAX_TEXT_LEN + 1);
        for bad in [
            "",
            long.as_str(),
            "line\nbreak",
            "tab\tinside",
            "esc\u{1b}[31m",
            "zero\u{200b}width",
            "bidi\u{202e}override",
            "bom\u{feff}",
            "idle_timeout",
            "ttl_expired",
            "refresh_token_reuse",
            "admin_request",
        ] {
            let e = check_reason(bad).unwrap_err();
            assert!(
                matches!(e, SessionError::Validation { .. }),
                "{bad:?}: {e:?}"
            );
        }
    }
}
