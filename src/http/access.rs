//! Who a tenant call is: the one rule the extractors, the WebSocket and the
//! rate-limit middleware all follow.
//!
//! A call on one session (the contract's (T) endpoints, see
//! [`is_session_call`], and its WebSocket) is authenticated by that
//! session's own token when it presents one (`Authorization: Bearer est_…`,
//! or `?token=` on the WebSocket; it wins over an API key sent beside it),
//! else by a tenant API key with the scope the call needs. Every other
//! tenant call takes only the API key: `X-API-Key`, else a bearer that is
//! not a session token.
//!
//! - No credential, an unknown key or a malformed session token: 401
//!   `unauthorized`. A known key without the scope: 403 `forbidden`.
//! - A session token that does not authenticate (made up, another
//!   session's, rotated away, or naming no session at all) is 401
//!   `unauthorized` whatever the session's state, so a token reveals
//!   nothing about which sessions exist or how they stand. The one
//!   exception is refresh: such a token passes, marked stale, and the
//!   refresh token in the body must then prove the caller (the current one
//!   rotates; one rotated away revokes the session, 401
//!   `refresh_token_reused`: the stolen-pair case); anything else is 401
//!   `unauthorized` as well.
//! - The credential that authenticated is whose rate bucket the call draws
//!   on: the session's own for a session token, the key's otherwise. The
//!   middleware charges keys before the handler runs; a session token is
//!   charged by its extractor only once verified, so a token that does not
//!   authenticate touches no session's bucket.
//!
//! [`Credential`] says what a request presents (pure); [`check`] refuses
//! what is wrong without looking at any session; [`Checked::on_session`]
//! verifies a session token against the session the path names.

use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use uuid::Uuid;

use super::error::ApiError;
use super::limits;
use super::AppState;
use crate::auth::{ApiKey, Scope};
use crate::crypto::{tokens, TokenHash};
use crate::model::SessionError;

/// What a request presents to authenticate a tenant call, before anything
/// is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    /// A session token, on a call of one session.
    SessionToken(&'a str),
    /// A tenant API key.
    ApiKey(&'a str),
    /// Neither.
    Missing,
}

impl<'a> Credential<'a> {
    /// What a call on one session presents: its session token (the
    /// header's, else a non-empty `query_token`), else its API key.
    pub fn of_session_call(headers: &'a HeaderMap, query_token: Option<&'a str>) -> Self {
        match session_token(headers).or(query_token.filter(|t| !t.is_empty())) {
            Some(token) => Credential::SessionToken(token),
            None => Self::of_tenant_call(headers),
        }
    }

    /// What any other tenant call presents: its API key, nothing else.
    pub fn of_tenant_call(headers: &'a HeaderMap) -> Self {
        presented_api_key(headers).map_or(Credential::Missing, Credential::ApiKey)
    }

    /// What a request for `path` presents to the handler that will serve it
    /// (for the middleware, which runs before the handler is known);
    /// `query_token`: the `?token=` of a route that reads one.
    pub fn of_request(headers: &'a HeaderMap, path: &str, query_token: Option<&'a str>) -> Self {
        if is_session_call(path) {
            Self::of_session_call(headers, query_token)
        } else {
            Self::of_tenant_call(headers)
        }
    }
}

/// Whether `path` is a call on one session, where a session token
/// authenticates: `/api/v1/sessions/{id}` and below, except the tenant-wide
/// `active` and `metrics` and the credential read `…/passthrough-auth`.
pub fn is_session_call(path: &str) -> bool {
    path.strip_prefix("/api/v1/sessions/").is_some_and(|rest| {
        !rest.is_empty()
            && !matches!(rest, "active" | "metrics")
            && !rest.ends_with("/passthrough-auth")
    })
}

/// The tenant API key a request presents: `X-API-Key`, else a bearer token
/// that is not a session token.
pub fn presented_api_key(headers: &HeaderMap) -> Option<&str> {
    match headers.get("x-api-key") {
        Some(value) => value.to_str().ok(),
        None => bearer(headers).filter(|t| !t.starts_with(tokens::SESSION_PREFIX)),
    }
}

/// The admin key a request presents (`X-Admin-Key`; never a bearer).
pub fn presented_admin_key(headers: &HeaderMap) -> Option<&str> {
    headers.get("x-admin-key")?.to_str().ok()
}

/// The session token (`Bearer est_…`) of `Authorization`, if any.
pub fn session_token(headers: &HeaderMap) -> Option<&str> {
    bearer(headers).filter(|t| t.starts_with(tokens::SESSION_PREFIX))
}

/// The bearer token of `Authorization`, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// A credential that passed every check that needs no session.
pub enum Checked {
    /// A well-formed session token: the tenant it names and its hash.
    SessionToken {
        /// The tenant the token names.
        tenant: Uuid,
        /// What the session stores of its token.
        hash: TokenHash,
    },
    /// A known API key with the scope.
    ApiKey {
        /// The key's tenant.
        tenant: Uuid,
        /// The key's rate bucket.
        bucket: [u8; 32],
    },
}

/// Refuses what `credential` gets wrong on its own: nothing presented or an
/// unknown key (401), a key without `scope` (403), a malformed session
/// token (401). Logs each refusal.
pub fn check(
    state: &AppState,
    parts: &Parts,
    credential: Credential<'_>,
    scope: Scope,
) -> Result<Checked, ApiError> {
    let key = match credential {
        Credential::SessionToken(token) => {
            let Some(tenant) = tokens::tenant_of(token, tokens::SESSION_PREFIX) else {
                auth_failure(parts, "malformed session token");
                return Err(ApiError::Unauthorized);
            };
            return Ok(Checked::SessionToken {
                tenant,
                hash: TokenHash::of(token),
            });
        }
        Credential::ApiKey(key) => Some(key),
        Credential::Missing => None,
    };
    let (_, grants) = check_api_key(state, parts, key, scope)?;
    Ok(Checked::ApiKey {
        tenant: grants.tenant_id,
        bucket: grants.bucket,
    })
}

/// The SHA-256 of the tenant API key a request presents, put in the
/// request's extensions by the rate limiter once it has found the key by it.
#[derive(Debug, Clone, Copy)]
pub struct KeyDigest(pub [u8; 32]);

/// The `presented` key and its grants if it is known (else 401) and
/// carries `scope` (else 403). Logs each refusal.
pub fn check_api_key<'s, 'k>(
    state: &'s AppState,
    parts: &Parts,
    presented: Option<&'k str>,
    scope: Scope,
) -> Result<(&'k str, &'s ApiKey), ApiError> {
    // The rate limiter hashed this request's key already when its class is
    // limited: look the key up by that digest instead of hashing it again.
    let known = parts.extensions.get::<KeyDigest>();
    let lookup = |k| match known {
        Some(digest) => state.keys.tenant_key_by_digest(&digest.0),
        None => state.keys.tenant_key(k),
    };
    let Some((key, grants)) = presented.and_then(|k| Some((k, lookup(k)?))) else {
        let reason = if presented.is_none() && session_token(&parts.headers).is_some() {
            "session token on a call that takes only an api key"
        } else {
            "missing or unknown api key"
        };
        auth_failure(parts, reason);
        return Err(ApiError::Unauthorized);
    };
    if !grants.allows(scope) {
        auth_failure(
            parts,
            match scope {
                Scope::Sessions => "api key lacks scope sessions",
                Scope::PassthroughRead => "api key lacks scope passthrough:read",
            },
        );
        return Err(ApiError::Forbidden);
    }
    Ok((key, grants))
}

/// How a caller of one session proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// A tenant API key (charged by the middleware already).
    ApiKey,
    /// The session's own token.
    SessionToken,
    /// A well-formed token that is not (or no longer) the session's: only
    /// refresh lets it through, for the refresh token to decide.
    StaleSessionToken,
}

/// A caller of one session, authenticated.
#[derive(Debug, Clone, Copy)]
pub struct SessionCaller {
    /// The session's tenant.
    pub tenant: Uuid,
    /// The rate bucket its calls draw on.
    pub bucket: [u8; 32],
    /// What authenticated it.
    pub proof: Proof,
    /// The session token's hash, when one authenticated it.
    pub token: Option<TokenHash>,
}

impl Checked {
    /// Finishes authenticating a call on session `id`: a key needs nothing
    /// more; a session token must be that session's, else the call is 401,
    /// unless `allow_stale` (refresh) lets it through as
    /// [`Proof::StaleSessionToken`] for the refresh token to decide.
    pub async fn on_session(
        self,
        state: &AppState,
        parts: &Parts,
        id: &str,
        allow_stale: bool,
    ) -> Result<SessionCaller, ApiError> {
        let (tenant, hash) = match self {
            Checked::ApiKey { tenant, bucket } => {
                return Ok(SessionCaller {
                    tenant,
                    bucket,
                    proof: Proof::ApiKey,
                    token: None,
                })
            }
            Checked::SessionToken { tenant, hash } => (tenant, hash),
        };
        let proof = match state.engine.verify_token(tenant, id, &hash).await {
            Ok(()) => Proof::SessionToken,
            Err(SessionError::TokenMismatch | SessionError::NotFound) if allow_stale => {
                Proof::StaleSessionToken
            }
            Err(SessionError::TokenMismatch | SessionError::NotFound) => {
                auth_failure(parts, "session token not valid for this session");
                return Err(ApiError::Unauthorized);
            }
            Err(e) => return Err(e.into()),
        };
        Ok(SessionCaller {
            tenant,
            bucket: limits::session_key(tenant, id),
            proof,
            token: Some(hash),
        })
    }
}

/// Logs an authentication failure: what and where, never key material.
pub fn auth_failure(parts: &Parts, reason: &'static str) {
    tracing::warn!(
        event = "auth_failure",
        reason,
        method = %parts.method,
        path = %parts.uri.path(),
        "authentication failed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const TOKEN: &str = "est_abc";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn on_a_session_call_its_token_wins_over_a_key() {
        let both = headers(&[
            ("x-api-key", "key"),
            ("authorization", &format!("Bearer {TOKEN}")),
        ]);
        assert_eq!(
            Credential::of_session_call(&both, None),
            Credential::SessionToken(TOKEN)
        );
        assert_eq!(
            Credential::of_session_call(&both, Some("est_query")),
            Credential::SessionToken(TOKEN),
            "the header's token before the query's"
        );
        let key = headers(&[("x-api-key", "key")]);
        assert_eq!(
            Credential::of_session_call(&key, Some("est_query")),
            Credential::SessionToken("est_query")
        );
        assert_eq!(
            Credential::of_session_call(&key, Some("")),
            Credential::ApiKey("key"),
            "an empty ?token= is none"
        );
        assert_eq!(
            Credential::of_session_call(&HeaderMap::new(), None),
            Credential::Missing
        );
    }

    #[test]
    fn other_tenant_calls_take_only_the_key() {
        let token = headers(&[("authorization", &format!("bearer {TOKEN}"))]);
        assert_eq!(Credential::of_tenant_call(&token), Credential::Missing);
        let both = headers(&[
            ("x-api-key", "key"),
            ("authorization", &format!("Bearer {TOKEN}")),
        ]);
        assert_eq!(Credential::of_tenant_call(&both), Credential::ApiKey("key"));
        let bearer_key = headers(&[("authorization", "Bearer key ")]);
        assert_eq!(
            Credential::of_tenant_call(&bearer_key),
            Credential::ApiKey("key")
        );
        let basic = headers(&[("authorization", "Basic key")]);
        assert_eq!(Credential::of_tenant_call(&basic), Credential::Missing);
        let admin = headers(&[("x-admin-key", "key")]);
        assert_eq!(Credential::of_tenant_call(&admin), Credential::Missing);
        assert_eq!(presented_admin_key(&admin), Some("key"));
        assert_eq!(presented_admin_key(&bearer_key), None);
    }

    #[test]
    fn the_middleware_sees_what_the_handler_will() {
        let token = headers(&[("authorization", &format!("Bearer {TOKEN}"))]);
        for path in [
            "/api/v1/sessions/s-1",
            "/api/v1/sessions/s-1/refresh",
            "/api/v1/sessions/s-1/ws",
            "/api/v1/sessions/s-1/metrics",
        ] {
            assert_eq!(
                Credential::of_request(&token, path, None),
                Credential::SessionToken(TOKEN),
                "{path}"
            );
        }
        for path in [
            "/api/v1/sessions",
            "/api/v1/sessions/",
            "/api/v1/sessions/active",
            "/api/v1/sessions/metrics",
            "/api/v1/sessions/s-1/passthrough-auth",
            "/api/v1/executions",
        ] {
            assert_eq!(
                Credential::of_request(&token, path, None),
                Credential::Missing,
                "{path}"
            );
        }
    }

    /// The handlers that take a session token say so in the OpenAPI
    /// document; [`is_session_call`] must name exactly their paths, or the
    /// middleware would charge (or skip) the wrong bucket.
    #[test]
    fn session_calls_are_the_documented_token_endpoints() {
        use utoipa::OpenApi as _;
        let doc = serde_json::to_value(super::super::openapi::ApiDoc::openapi()).unwrap();
        let mut seen = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            let operations = item.as_object().unwrap().iter().filter(|(method, _)| {
                matches!(
                    method.as_str(),
                    "get" | "put" | "post" | "delete" | "patch" | "head"
                )
            });
            for (method, operation) in operations {
                let takes_token = operation["security"]
                    .as_array()
                    .is_some_and(|all| all.iter().any(|s| s.get("session_token").is_some()));
                let concrete = path.replace("{session_id}", "s-1");
                assert_eq!(is_session_call(&concrete), takes_token, "{method} {path}");
                seen += usize::from(takes_token);
            }
        }
        assert!(seen >= 10, "only {seen} token endpoints documented");
    }
}
