//! Per-request plumbing: the request id (echoed or generated), a tracing
//! span carrying it, the contract's error body, and one access log line.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument as _;

use super::error::ErrorBody;
use crate::telemetry::metrics::RouteHandles;

/// `X-Request-Id`, echoed on every response.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `X-Trace-ID`, accepted as the request id when `X-Request-Id` is absent.
pub(crate) static X_TRACE_ID: HeaderName = HeaderName::from_static("x-trace-id");
/// Longest request id taken from a client.
const MAX_REQUEST_ID_LEN: usize = 128;
/// Most header bytes (names and values) a request may carry; more is 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

fn header_bytes(request: &Request) -> usize {
    request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum()
}

/// The request's id, available to handlers as an extension.
#[derive(Debug, Clone)]
pub struct RequestId(pub Arc<str>);

fn from_client(request: &Request) -> Option<String> {
    [&X_REQUEST_ID, &X_TRACE_ID].into_iter().find_map(|name| {
        let value = request.headers().get(name)?.to_str().ok()?;
        let ok = !value.is_empty()
            && value.len() <= MAX_REQUEST_ID_LEN
            && value.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| value.to_owned())
    })
}

/// A metric label for the method: the standard ones, else `other` (any
/// token is a valid method, and labels must stay few).
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

thread_local! {
    /// Each worker thread's metric handles by (method, route): a few dozen
    /// routes, so a scan beats hashing; resolved once, not per request.
    static ROUTES: std::cell::RefCell<Vec<(&'static str, Option<MatchedPath>, RouteHandles)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

fn route_of(matched: &Option<MatchedPath>) -> &str {
    matched.as_ref().map_or("unmatched", MatchedPath::as_str)
}

/// The middleware: wraps every request of the app.
pub async fn track(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id: Arc<str> = from_client(&request)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
        .into();
    request.extensions_mut().insert(RequestId(id.clone()));
    let method = request.method().clone();
    // The router's own `Arc<str>`: no copy per request.
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let route = route_of(&matched);
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = if header_bytes(&request) > MAX_HEADER_BYTES {
        axum::http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE.into_response()
    } else {
        next.run(request).instrument(span.clone()).await
    };

    let status = response.status();
    crate::telemetry::live::answered(status.as_u16());
    ROUTES.with_borrow_mut(|routes| {
        let method = method_label(&method);
        // The route's text is the router's, so the same address: compare
        // addresses first, and text only for a route not seen that way.
        let at = routes
            .iter()
            .position(|r| r.0 == method && std::ptr::eq(route_of(&r.1), route))
            .or_else(|| {
                routes
                    .iter()
                    .position(|r| r.0 == method && route_of(&r.1) == route)
            });
        let handles = match at {
            Some(at) => &mut routes[at].2,
            None => {
                routes.push((method, matched.clone(), RouteHandles::new(method, route)));
                &mut routes.last_mut().expect("just pushed").2
            }
        };
        handles.requests(status.as_u16()).increment(1);
        handles.duration.record(started.elapsed().as_secs_f64());
    });
    let relayed = response.extensions().get::<Relayed>().is_some();
    if (status.is_client_error() || status.is_server_error()) && !relayed {
        let error = response
            .extensions_mut()
            .remove::<ErrorBody>()
            .unwrap_or_else(|| ErrorBody::for_status(status));
        if let Some(cause) = &error.cause {
            span.in_scope(|| tracing::error!(%status, cause = %cause, "request failed"));
        }
        let mut rendered = axum::Json(error.render(&id)).into_response();
        *rendered.status_mut() = status;
        for (name, value) in response.headers() {
            if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                rendered.headers_mut().insert(name.clone(), value.clone());
            }
        }
        response = rendered;
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), value);
    }
    span.in_scope(|| {
        tracing::info!(
            method = %method,
            route = %route,
            status = status.as_u16(),
            latency_us = started.elapsed().as_micros() as u64,
            "request"
        )
    });
    response
}

/// Marks an answer relayed from another cluster node: its error body is
/// already the contract's (rendered there, under the same request id).
#[derive(Debug, Clone, Copy)]
pub struct Relayed;

/// Turns a panic in a handler into a 500 with the contract's body.
pub fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    super::error::ApiError::Internal("handler panicked".into()).into_response()
}
