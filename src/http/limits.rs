//! Rate limits: a token bucket per API key (or per session, for calls made
//! with a session token) and endpoint class, from `[rate_limits]`.
//!
//! Classes: `create` (`POST /api/v1/sessions`), `read` (every other GET),
//! `write` (every other tenant call), `admin` (`/admin/…`). Health, readiness,
//! metrics and the OpenAPI document are not limited. Only callers whose key
//! is known get a bucket (an unknown key is refused with 401 anyway), so
//! made-up keys cannot grow the tables. Calls made with a session token are
//! charged to that session's bucket by the extractor, after the token is
//! verified, so a forged token neither drains nor creates a bucket. Buckets
//! that are full again are dropped ([`RateLimits::forget_idle`]).
//!
//! Every limited answer carries `RateLimit-Limit` (the burst),
//! `RateLimit-Remaining` and `RateLimit-Reset` (seconds until a token is
//! back); a refused one is 429 `rate_limited` with `Retry-After`.
//!
//! **Failed authentication.** Apart from the classes (and on even when
//! they are off), each client address has a bucket of failed
//! authentications (`failed_auth_per_second`, `failed_auth_burst`; by
//! default 20 at once, then one a second), so a key cannot be guessed at
//! line rate. The address is the connection's peer IP (an IPv6 address
//! counts by its /64, which one client usually holds whole); behind a
//! proxy that is the proxy's. A call under `/api/v1` or `/admin` that
//! presents no known key (none, or an unknown one) takes a token before it
//! runs, and is refused with 429 `rate_limited` and `Retry-After` when the
//! bucket is empty; a call with a session token or a `?token=`/`?ticket=`
//! (checked later, by its handler) is never refused here but takes a token
//! when it is answered 401 or 403. A call with a known API or admin key is
//! neither refused nor charged: an attacker guessing from the same address
//! does not lock out the clients that hold keys. The table is bounded like
//! the others: full buckets are dropped every minute.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use sha2::{Digest, Sha256};

use super::access::{self, Credential};
use super::error::ApiError;
use super::AppState;
use crate::settings::RateLimitSettings;

type Bucket = RateLimiter<
    [u8; 32],
    DefaultKeyedStateStore<[u8; 32]>,
    DefaultClock,
    StateInformationMiddleware,
>;

/// Failed authentications per client address.
type FailedAuthBucket =
    RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock, NoOpMiddleware>;

/// An endpoint class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `POST /api/v1/sessions`.
    Create,
    /// Every other GET.
    Read,
    /// Every other tenant call (and WebSocket frames).
    Write,
    /// `/admin/…`.
    Admin,
}

/// One class's buckets and its figures.
struct Limit {
    buckets: Bucket,
    burst: u32,
    /// Time for one token to come back.
    period: Duration,
}

/// The buckets of every class (`None`: unlimited).
pub struct RateLimits {
    create: Option<Limit>,
    read: Option<Limit>,
    write: Option<Limit>,
    admin: Option<Limit>,
    /// Failed authentications per client address (`None`: off).
    failed_auth: Option<FailedAuthBucket>,
    clock: DefaultClock,
}

/// What a check answered.
#[derive(Debug, Clone, Copy)]
pub enum Decision {
    /// Allowed; tokens left and the burst.
    Allowed {
        /// `RateLimit-Limit`.
        limit: u32,
        /// `RateLimit-Remaining`.
        remaining: u32,
        /// `RateLimit-Reset`, seconds.
        reset: u64,
    },
    /// Refused until `retry_after` seconds from now.
    Refused {
        /// `RateLimit-Limit`.
        limit: u32,
        /// `Retry-After`, seconds.
        retry_after: u64,
    },
}

fn limit(per_second: u32, burst: u32) -> Option<Limit> {
    let rate = NonZeroU32::new(per_second)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    let quota = Quota::per_second(rate).allow_burst(burst);
    Some(Limit {
        buckets: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
        burst: burst.get(),
        period: quota.replenish_interval(),
    })
}

impl RateLimits {
    /// The buckets `[rate_limits]` describes (a `*_per_second` of 0: none).
    pub fn new(settings: &RateLimitSettings) -> Self {
        RateLimits {
            create: limit(settings.create_per_second, settings.create_burst),
            read: limit(settings.read_per_second, settings.read_burst),
            write: limit(settings.write_per_second, settings.write_burst),
            admin: limit(settings.admin_per_second, settings.admin_burst),
            failed_auth: NonZeroU32::new(settings.failed_auth_per_second).map(|rate| {
                let burst = NonZeroU32::new(settings.failed_auth_burst).unwrap_or(rate);
                RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
            }),
            clock: DefaultClock::default(),
        }
    }

    /// Whether failed authentications are limited per client address.
    pub fn guards_failed_auth(&self) -> bool {
        self.failed_auth.is_some()
    }

    /// Takes a token from `client`'s failed-authentication bucket: `Err`
    /// with the seconds until one is back when it is empty (and when the
    /// bucket is off, always `Ok`).
    pub fn charge_failed_auth(&self, client: IpAddr) -> Result<(), u64> {
        let Some(buckets) = &self.failed_auth else {
            return Ok(());
        };
        buckets
            .check_key(&client_key(client))
            .map_err(|not_until| seconds(not_until.wait_time_from(self.clock.now())).max(1))
    }

    fn class(&self, class: Class) -> Option<&Limit> {
        match class {
            Class::Create => self.create.as_ref(),
            Class::Read => self.read.as_ref(),
            Class::Write => self.write.as_ref(),
            Class::Admin => self.admin.as_ref(),
        }
    }

    /// Whether `class` is limited at all.
    pub fn limits(&self, class: Class) -> bool {
        self.class(class).is_some()
    }

    /// Takes a token for `who` in `class`; `None` when the class is unlimited.
    pub fn check(&self, class: Class, who: &[u8; 32]) -> Option<Decision> {
        let limit = self.class(class)?;
        let reset = seconds(limit.period);
        Some(match limit.buckets.check_key(who) {
            Ok(state) => {
                let remaining = state.remaining_burst_capacity();
                Decision::Allowed {
                    limit: limit.burst,
                    remaining,
                    reset: if remaining < limit.burst { reset } else { 0 },
                }
            }
            Err(not_until) => Decision::Refused {
                limit: limit.burst,
                retry_after: seconds(not_until.wait_time_from(self.clock.now())).max(1),
            },
        })
    }

    /// Drops buckets that are full again (nothing to remember); call now
    /// and then so per-session buckets do not accumulate.
    pub fn forget_idle(&self) {
        for limit in [&self.create, &self.read, &self.write, &self.admin]
            .into_iter()
            .flatten()
        {
            limit.buckets.retain_recent();
            limit.buckets.shrink_to_fit();
        }
        if let Some(buckets) = &self.failed_auth {
            buckets.retain_recent();
            buckets.shrink_to_fit();
        }
    }
}

/// The failed-authentication bucket an address draws on: an IPv4 address
/// (also written as IPv6) itself, an IPv6 address by its /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

/// Whether the query string carries a credential a handler checks (the
/// session WebSocket's `?token=`, the stats WebSocket's `?ticket=`).
fn query_credential(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|pair| pair.starts_with("token=") || pair.starts_with("ticket="))
    })
}

/// Whole seconds, rounded up.
fn seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The class of a request, if it is limited at all.
pub fn class_of(method: &Method, path: &str) -> Option<Class> {
    if path.starts_with("/admin/") {
        // The dashboard page itself is static and holds no data.
        return (!matches!(
            path,
            "/admin/dashboard" | "/admin/dashboard.js" | "/admin/dashboard.css"
        ))
        .then_some(Class::Admin);
    }
    if !path.starts_with("/api/v1/") || path == "/api/v1/openapi.json" {
        return None;
    }
    Some(if method == Method::GET || method == Method::HEAD {
        Class::Read
    } else if method == Method::POST && path == "/api/v1/sessions" {
        Class::Create
    } else {
        Class::Write
    })
}

/// Whose bucket a request draws on.
enum Caller {
    /// A known API or admin key: its digest.
    Key([u8; 32]),
    /// A session token on a call of its session: charged by the extractor
    /// once the token is verified (see [`session_key`]).
    Session,
    /// Nobody this middleware can charge: the call is refused with 401.
    Unknown,
}

/// Whose bucket the call draws on, by the rule of [`access`]: an admin
/// key on `/admin/…`; else the session token on a call of its session,
/// else the API key.
fn caller(state: &AppState, request: &Request, class: Class, path: &str) -> Caller {
    let headers = request.headers();
    if class == Class::Admin {
        return match access::presented_admin_key(headers) {
            Some(key) if state.keys.is_admin(key) => Caller::Key(digest(b"admin", key.as_bytes())),
            _ => Caller::Unknown,
        };
    }
    // A WebSocket upgrade by `?token=` is the session's to pay for (its
    // handler charges it once the token is verified), even with a key
    // beside it: the token is what authenticates it.
    let query_token = path
        .ends_with("/ws")
        .then(|| super::ws::query_token(request.uri()))
        .flatten();
    match Credential::of_request(headers, path, query_token.as_deref()) {
        Credential::SessionToken(_) => Caller::Session,
        Credential::ApiKey(key) => match state.keys.tenant_key(key) {
            Some(grants) => Caller::Key(grants.bucket),
            None => Caller::Unknown,
        },
        Credential::Missing => Caller::Unknown,
    }
}

/// The bucket of session `id` of `tenant` (calls made with its token).
pub fn session_key(tenant: uuid::Uuid, id: &str) -> [u8; 32] {
    let mut who = tenant.as_bytes().to_vec();
    who.extend_from_slice(id.as_bytes());
    digest(b"session", &who)
}

fn digest(kind: &[u8], value: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(kind)
        .chain_update([0])
        .chain_update(value)
        .finalize()
        .into()
}

/// Where an extractor leaves the decision it took (session tokens), so the
/// middleware can put the headers on the answer.
#[derive(Clone, Default)]
pub struct RateSlot(Arc<std::sync::Mutex<Option<Decision>>>);

impl RateSlot {
    /// Records a decision.
    pub fn put(&self, decision: Decision) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(decision);
    }

    fn take(&self) -> Option<Decision> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// The middleware: charges API and admin keys before the handler runs (429
/// at once when empty), leaves session tokens to their extractor, and puts
/// the headers on the answer.
pub async fn limit_rate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    let slot = RateSlot::default();
    request.extensions_mut().insert(slot.clone());
    let class = class_of(request.method(), &path);
    // The failed-authentication bucket of the caller's address, when on;
    // an app served without addresses (`ConnectInfo`) has none.
    let client = class
        .filter(|_| state.limits.guards_failed_auth())
        .and_then(|_| request.extensions().get::<ConnectInfo<SocketAddr>>())
        .map(|ConnectInfo(peer)| peer.ip());
    // An unlimited class costs nothing (no key digests), unless the
    // failed-authentication bucket needs to know the caller.
    let caller = class
        .filter(|class| state.limits.limits(*class) || client.is_some())
        .map(|class| (class, caller(&state, &request, class, &path)));
    // Who the failed-authentication bucket charges after the answer.
    let mut charge_on_failure = None;
    if let (Some(ip), Some((_, who))) = (client, &caller) {
        match who {
            Caller::Key(_) => {}
            Caller::Unknown if !query_credential(request.uri().query()) => {
                if let Err(retry_after) = state.limits.charge_failed_auth(ip) {
                    tracing::info!(event = "rate_limited", path = %path, client = %ip, retry_after, "failed-authentication limit reached");
                    let mut response = ApiError::RateLimited.into_response();
                    response
                        .headers_mut()
                        .insert("retry-after", HeaderValue::from(retry_after));
                    return response;
                }
            }
            Caller::Session | Caller::Unknown => charge_on_failure = Some(ip),
        }
    }
    let decision = match caller {
        Some((class, Caller::Key(who))) => {
            // A tenant key's bucket is its digest: the extractor looks the
            // key up by it instead of hashing it again.
            if class != Class::Admin {
                request.extensions_mut().insert(access::KeyDigest(who));
            }
            state.limits.check(class, &who)
        }
        _ => None,
    };
    let mut response = match decision {
        Some(Decision::Refused { .. }) => ApiError::RateLimited.into_response(),
        _ => next.run(request).await,
    };
    if let Some(ip) = charge_on_failure {
        if matches!(
            response.status(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ) {
            let _ = state.limits.charge_failed_auth(ip);
        }
    }
    if let Some(decision) = decision.or_else(|| slot.take()) {
        let headers = response.headers_mut();
        match decision {
            Decision::Allowed {
                limit,
                remaining,
                reset,
            } => {
                headers.insert("ratelimit-limit", HeaderValue::from(limit));
                headers.insert("ratelimit-remaining", HeaderValue::from(remaining));
                headers.insert("ratelimit-reset", HeaderValue::from(reset));
            }
            Decision::Refused { limit, retry_after } => {
                tracing::info!(event = "rate_limited", path = %path, retry_after, "rate limit reached");
                headers.insert("retry-after", HeaderValue::from(retry_after));
                headers.insert("ratelimit-limit", HeaderValue::from(limit));
                headers.insert("ratelimit-remaining", HeaderValue::from(0u32));
                headers.insert("ratelimit-reset", HeaderValue::from(retry_after));
            }
        }
    }
    response
}

/// Forgets idle buckets every minute, for as long as the server runs.
pub async fn forget_idle_forever(limits: Arc<RateLimits>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(60));
    loop {
        ticker.tick().await;
        limits.forget_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_the_contract() {
        assert_eq!(
            class_of(&Method::POST, "/api/v1/sessions"),
            Some(Class::Create)
        );
        assert_eq!(
            class_of(&Method::GET, "/api/v1/sessions"),
            Some(Class::Read)
        );
        assert_eq!(
            class_of(&Method::GET, "/api/v1/sessions/x/metrics"),
            Some(Class::Read)
        );
        assert_eq!(
            class_of(&Method::POST, "/api/v1/executions"),
            Some(Class::Write)
        );
        assert_eq!(
            class_of(&Method::DELETE, "/api/v1/sessions/x"),
            Some(Class::Write)
        );
        assert_eq!(
            class_of(&Method::POST, "/admin/sessions/cleanup"),
            Some(Class::Admin)
        );
        assert_eq!(class_of(&Method::GET, "/api/v1/openapi.json"), None);
        assert_eq!(class_of(&Method::GET, "/readyz"), None);
        assert_eq!(class_of(&Method::GET, "/admin/dashboard.js"), None);
    }

    #[test]
    fn failed_auth_counts_per_address_and_ipv6_prefix() {
        let limits = RateLimits::new(&RateLimitSettings {
            create_per_second: 0,
            create_burst: 0,
            read_per_second: 0,
            read_burst: 0,
            write_per_second: 0,
            write_burst: 0,
            admin_per_second: 0,
            admin_burst: 0,
            failed_auth_per_second: 1,
            failed_auth_burst: 2,
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(limits.charge_failed_auth(a).is_ok());
        assert!(limits.charge_failed_auth(a).is_ok());
        assert_eq!(limits.charge_failed_auth(a), Err(1));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(
            limits.charge_failed_auth(mapped).is_err(),
            "the same address"
        );
        assert!(limits
            .charge_failed_auth("192.0.2.2".parse().unwrap())
            .is_ok());
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8::ffff:1".parse().unwrap();
        assert!(limits.charge_failed_auth(v6).is_ok());
        assert!(limits.charge_failed_auth(same_64).is_ok());
        assert!(
            limits.charge_failed_auth(v6).is_err(),
            "one /64, one bucket"
        );
        assert!(query_credential(Some("ticket=etk_x")));
        assert!(query_credential(Some("a=1&token=est_x")));
        assert!(!query_credential(Some("mytoken=x")));
        assert!(!query_credential(None));
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refuses() {
        let limits = RateLimits::new(&RateLimitSettings {
            create_per_second: 1,
            create_burst: 3,
            read_per_second: 0,
            read_burst: 0,
            write_per_second: 10,
            write_burst: 0,
            admin_per_second: 1,
            admin_burst: 1,
            failed_auth_per_second: 0,
            failed_auth_burst: 0,
        });
        let who = [7u8; 32];
        for left in [2, 1, 0] {
            assert!(matches!(
                limits.check(Class::Create, &who),
                Some(Decision::Allowed { limit: 3, remaining, reset: 1 }) if remaining == left
            ));
        }
        assert!(matches!(
            limits.check(Class::Create, &who),
            Some(Decision::Refused {
                limit: 3,
                retry_after: 1
            })
        ));
        assert!(
            limits.check(Class::Create, &[8u8; 32]).is_some(),
            "another key has its own bucket"
        );
        assert!(
            limits.check(Class::Read, &who).is_none(),
            "0 per second is unlimited"
        );
        assert!(matches!(
            limits.check(Class::Write, &who),
            Some(Decision::Allowed { limit: 10, .. })
        ));
    }
}
