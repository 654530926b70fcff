//! Extractors that answer in the contract's error body: JSON bodies (size,
//! content type, syntax, unknown fields, field errors), session ids in the
//! path, and the caller's credential (by the rule in [`access`](super::access)).

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use bytes::BytesMut;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;

use super::access::{self, auth_failure, Credential, Proof};
use super::error::{invalid, ApiError};
use super::limits;
use super::AppState;
use uuid::Uuid;

use crate::auth::{ApiKey, Scope};
use crate::model::ids::is_valid_session_id;

/// Largest request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// How much of an oversized body is read and discarded before answering 413.
/// Answering while the client is still sending makes many clients report a
/// broken connection instead of the 413; past this, the connection is closed.
const MAX_DRAIN_BYTES: usize = 1024 * 1024;

pub(crate) async fn read_body(request: Request) -> Result<Bytes, ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = request.into_body();
    if let Some(declared) = declared.filter(|n| *n > MAX_BODY_BYTES as u64) {
        // A body small enough to read to its end keeps the connection
        // usable; a larger one is answered at once (the connection then
        // closes, its body unread) instead of waiting for bytes that may
        // never come.
        if declared <= MAX_DRAIN_BYTES as u64 {
            drain(&mut body, 0).await;
        }
        return Err(ApiError::PayloadTooLarge);
    }
    let mut bytes = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::InvalidJson(format!("reading the body failed: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > MAX_BODY_BYTES {
                drain(&mut body, bytes.len() + data.len()).await;
                return Err(ApiError::PayloadTooLarge);
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes.freeze())
}

/// Reads and discards the rest of a body, up to [`MAX_DRAIN_BYTES`].
async fn drain(body: &mut Body, mut seen: usize) {
    while seen <= MAX_DRAIN_BYTES {
        match body.frame().await {
            Some(Ok(frame)) => seen += frame.data_ref().map_or(0, |d| d.len()),
            _ => return,
        }
    }
}

/// Decodes JSON into `T`, classifying errors as the contract says.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    check_depth(bytes)?;
    // Most bodies are fine: decode them without tracking the path, and
    // only for one that fails decode again, tracking it, to say which
    // field is wrong.
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(classify)?;
    deserializer
        .end()
        .map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    Ok(value)
}

fn too_deep() -> ApiError {
    invalid(
        "body",
        format!("json must not be nested deeper than {MAX_JSON_DEPTH} levels"),
    )
}

/// Deepest JSON nesting a body may have (objects and arrays).
pub const MAX_JSON_DEPTH: usize = 32;

/// Refuses bodies nested deeper than [`MAX_JSON_DEPTH`] before parsing
/// them: deep nesting costs stack and time, and no field needs it.
pub(crate) fn check_depth(bytes: &[u8]) -> Result<(), ApiError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(too_deep());
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn classify(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let message = inner.to_string();
                if let Some(rest) = message.strip_prefix("unknown field `") {
                    let name = rest.split('`').next().unwrap_or("");
                    // The path already ends with the unknown key.
                    let field = if path == "." || path.is_empty() {
                        name.to_owned()
                    } else {
                        path
                    };
                    ApiError::UnknownField(field)
                } else if let Some(rest) = message.strip_prefix("missing field `") {
                    let name = rest.split('`').next().unwrap_or("");
                    let field = if path == "." || path.is_empty() {
                        name.to_owned()
                    } else {
                        format!("{path}.{name}")
                    };
                    invalid(&field, format!("{field} is required"))
                } else if path.starts_with("passthrough_auth") || path.starts_with("refresh_token")
                {
                    // serde's message quotes the offending value: for
                    // credentials and tokens it must not come back.
                    invalid(&path, format!("{path} has the wrong type"))
                } else {
                    let field = if path == "." { "body".to_owned() } else { path };
                    let message = message
                        .split(" at line ")
                        .next()
                        .unwrap_or(&message)
                        .to_owned();
                    invalid(&field, format!("{field}: {message}"))
                }
            }
            _ => ApiError::InvalidJson(inner.to_string()),
        }
    }
}

/// A required JSON body of at most 64 KiB.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Self, ApiError> {
        if !is_json(request.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = read_body(request).await?;
        decode(&bytes).map(JsonBody)
    }
}

/// An optional JSON body: empty is `None` whatever the content type (a
/// body-less DELETE with `Content-Type: application/json` is fine).
pub struct OptionalJsonBody<T>(pub Option<T>);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Self, ApiError> {
        let json = is_json(request.headers());
        let bytes = read_body(request).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(None));
        }
        if !json {
            return Err(ApiError::UnsupportedMediaType);
        }
        decode(&bytes).map(|v| OptionalJsonBody(Some(v)))
    }
}

/// A valid session id from the path.
pub struct SessionId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for SessionId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| invalid("session_id", "session_id in the path is not valid"))?;
        if !is_valid_session_id(&id) {
            return Err(invalid(
                "session_id",
                "session_id must be 1 to 255 characters from A-Z a-z 0-9 . _ : @ ~ -",
            ));
        }
        Ok(SessionId(id))
    }
}

// The credential helpers moved to `access`; still reachable here.
pub use super::access::{bearer, presented_api_key, session_token};

/// A call on one session (the contract's (T) endpoints), authenticated as
/// [`access`](super::access) says: that session's own token, else a tenant
/// API key with scope `sessions`. A session token that is not this
/// session's is 401.
pub struct SessionAccess {
    /// The session's tenant.
    pub tenant: Uuid,
    /// The session id from the path.
    pub id: String,
    /// A session token that is not (or no longer) the session's: only
    /// [`RefreshAccess`] lets it through.
    pub stale_token: bool,
}

impl FromRequestParts<AppState> for SessionAccess {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        session_access(parts, state, false).await
    }
}

/// `POST …/refresh`: as [`SessionAccess`], but a session token that does
/// not authenticate is let through (uncharged, marked stale) for the
/// refresh token in the body to decide: the current one rotates, one
/// rotated away revokes (401 `refresh_token_reused`), anything else is 401
/// `unauthorized`. Without that, a thief who rotated first would leave the
/// real client unable to ever present the old pair.
pub struct RefreshAccess(pub SessionAccess);

impl FromRequestParts<AppState> for RefreshAccess {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        session_access(parts, state, true).await.map(RefreshAccess)
    }
}

async fn session_access(
    parts: &mut Parts,
    state: &AppState,
    allow_stale: bool,
) -> Result<SessionAccess, ApiError> {
    // The credential first: a bad one is 401/403 whatever the path holds.
    let credential = Credential::of_session_call(&parts.headers, None);
    let checked = access::check(state, parts, credential, Scope::Sessions)?;
    let SessionId(id) = SessionId::from_request_parts(parts, state).await?;
    let caller = checked.on_session(state, parts, &id, allow_stale).await?;
    if caller.proof == Proof::SessionToken {
        // Verified: the session's own bucket (charged only now, so forged
        // or stale tokens can neither drain it nor grow the tables).
        charge_session(parts, state, &caller.bucket)?;
    }
    Ok(SessionAccess {
        tenant: caller.tenant,
        id,
        stale_token: caller.proof == Proof::StaleSessionToken,
    })
}

/// Takes a token from the write/read bucket of a session, `who`.
pub(super) fn charge_session(
    parts: &Parts,
    state: &AppState,
    who: &[u8; 32],
) -> Result<(), ApiError> {
    let Some(class) = limits::class_of(&parts.method, parts.uri.path()) else {
        return Ok(());
    };
    charge(
        state,
        class,
        who,
        parts.extensions.get::<limits::RateSlot>(),
    )
}

/// Takes a token from `who`'s bucket of `class` (none when the class is
/// unlimited); the decision goes to `slot`, for the answer's headers.
pub(super) fn charge(
    state: &AppState,
    class: limits::Class,
    who: &[u8; 32],
    slot: Option<&limits::RateSlot>,
) -> Result<(), ApiError> {
    let decision = state.limits.check(class, who);
    if let (Some(decision), Some(slot)) = (decision, slot) {
        slot.put(decision);
    }
    match decision {
        Some(limits::Decision::Refused { .. }) => Err(ApiError::RateLimited),
        _ => Ok(()),
    }
}

/// A caller whose API key carries `passthrough:read`. Not a (T) endpoint:
/// a session token alone is 401 (an API key in `X-API-Key` decides when
/// both are sent).
pub struct CredentialReader(pub ApiKey);

impl FromRequestParts<AppState> for CredentialReader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = presented_api_key(&parts.headers);
        let (_, key) = access::check_api_key(state, parts, key, Scope::PassthroughRead)?;
        Ok(CredentialReader(key.clone()))
    }
}

/// A caller authenticated by a tenant API key (scope `sessions`).
pub struct Tenant(pub ApiKey);

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = presented_api_key(&parts.headers);
        let (_, key) = access::check_api_key(state, parts, key, Scope::Sessions)?;
        Ok(Tenant(key.clone()))
    }
}

/// A caller authenticated by an admin key.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match access::presented_admin_key(&parts.headers) {
            Some(key) if state.keys.is_admin(key) => Ok(Admin),
            _ => {
                auth_failure(parts, "missing or unknown admin key");
                Err(ApiError::Unauthorized)
            }
        }
    }
}

/// Parses `limit` (1–1000) with a default.
pub fn parse_limit(raw: Option<&str>, default: usize) -> Result<usize, ApiError> {
    match raw {
        None => Ok(default),
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => Ok(n),
            _ => Err(invalid("limit", "limit must be an integer from 1 to 1000")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        n: Option<u32>,
    }

    #[test]
    fn errors_are_classified() {
        assert!(matches!(
            decode::<Body>(b"{"),
            Err(ApiError::InvalidJson(_))
        ));
        assert!(matches!(
            decode::<Body>(b"{\"name\":\"a\"} x"),
            Err(ApiError::InvalidJson(_))
        ));
        assert!(
            matches!(decode::<Body>(b"{\"name\":\"a\",\"zzz\":1}"), Err(ApiError::UnknownField(f)) if f == "zzz")
        );
        match decode::<Body>(b"{\"name\":\"a\",\"n\":-1}") {
            Err(ApiError::Session(crate::model::SessionError::Validation { field, .. })) => {
                assert_eq!(field, "n")
            }
            other => panic!("{other:?}"),
        }
        match decode::<Body>(b"{}") {
            Err(ApiError::Session(crate::model::SessionError::Validation { .. })) => {}
            other => panic!("{other:?}"),
        }
        assert!(decode::<Body>(b"{\"name\":\"a\"}").is_ok());
    }

    #[test]
    fn limits() {
        assert_eq!(parse_limit(None, 50).unwrap(), 50);
        assert_eq!(parse_limit(Some("1000"), 50).unwrap(), 1000);
        assert!(parse_limit(Some("0"), 50).is_err());
        assert!(parse_limit(Some("1001"), 50).is_err());
        assert!(parse_limit(Some("ten"), 50).is_err());
    }
}
