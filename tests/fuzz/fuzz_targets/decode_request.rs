//! Request decoding under arbitrary bytes: every JSON body the API accepts
//! (create, tools/execute, POST /executions) through the same decode and
//! validation path as the handlers, then admission; and the path, query and
//! header parsers (session ids, RFC 3339 times, session tokens).
//!
//! Whatever the input: no panic, and anything admitted respects the limits.
//! Run: `cargo +nightly fuzz run decode_request --fuzz-dir tests/fuzz`.

#![no_main]

use edge_sessions::crypto::tokens;
use edge_sessions::engine::admission::{self, MAX_METADATA_BYTES, MAX_TEXT_LEN};
use edge_sessions::engine::{SessionDefaults, TenantLimits};
use edge_sessions::http::{sessions, tools};
use edge_sessions::model::ids::is_valid_session_id;
use edge_sessions::model::time::parse_rfc3339;
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

fuzz_target!(|data: &[u8]| {
    let tenant = TenantLimits {
        id: Uuid::nil(),
        name: "fuzz".into(),
        max_active_sessions: 10,
        max_ttl_seconds: 86_400,
        max_idle_timeout_seconds: 3_600,
    };
    let defaults = SessionDefaults {
        idle_timeout_seconds: 1_800,
        ttl_seconds: 86_400,
    };
    if let Ok(request) = sessions::check_create_body(data) {
        if let Ok(session) = admission::build(request, &tenant, defaults, 1_700_000_000_000) {
            assert!(is_valid_session_id(&session.session_id));
            assert!(session.ttl_seconds >= 1 && session.ttl_seconds <= 86_400);
            assert!(session.idle_timeout_seconds >= 1 && session.idle_timeout_seconds <= 3_600);
            assert!(session.edge_mcp_id.chars().count() <= MAX_TEXT_LEN);
            assert!(session.connection_metadata.len() <= MAX_METADATA_BYTES);
            assert!(serde_json::from_str::<serde_json::Value>(&session.connection_metadata)
                .is_ok_and(|v| v.is_object()));
        }
    }
    for execution in tools::check_execution_bodies(data).into_iter().flatten() {
        assert!(!execution.tool_name.is_empty());
        assert!(execution.tool_name.chars().count() <= MAX_TEXT_LEN);
        assert!(execution.tokens_used <= i64::MAX as u64);
        assert!(serde_json::from_str::<serde_json::Value>(&execution.arguments).is_ok());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = is_valid_session_id(text);
        let _ = parse_rfc3339(text);
        let _ = tokens::tenant_of(text, tokens::SESSION_PREFIX);
    }
});
