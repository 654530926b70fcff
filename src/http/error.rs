//! The one place where errors become HTTP answers.
//!
//! Handlers return [`ApiError`]; its `IntoResponse` sets the status and
//! attaches an [`ErrorBody`] extension. The request-id middleware then
//! writes the contract's body (`error`, `code`, `request_id`, `details`),
//! because only it knows the request id. 5xx causes are logged there and
//! never sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::model::SessionError;

/// Everything an HTTP call can answer besides success.
#[derive(Debug)]
pub enum ApiError {
    /// A domain error.
    Session(SessionError),
    /// The body is not JSON.
    InvalidJson(String),
    /// The body names a field the endpoint does not know.
    UnknownField(String),
    /// The body is over the limit.
    PayloadTooLarge,
    /// The body is not `application/json`.
    UnsupportedMediaType,
    /// No key, an unknown key, or a key of the wrong kind.
    Unauthorized,
    /// The key lacks the scope.
    Forbidden,
    /// A browser request from another site's page (`Origin` is not the
    /// request's own `Host`).
    ForeignOrigin,
    /// No such route.
    RouteNotFound,
    /// The caller's token bucket for this class is empty.
    RateLimited,
    /// A failure of ours; the cause is logged with the request id.
    Internal(String),
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        ApiError::Session(e)
    }
}

/// The error as the middleware renders it.
#[derive(Debug, Clone)]
pub struct ErrorBody {
    /// Lowercase human sentence.
    pub message: String,
    /// Stable machine code.
    pub code: &'static str,
    /// Optional details (field errors).
    pub details: Value,
    /// For 5xx: the cause, logged and never sent.
    pub cause: Option<String>,
}

/// The contract's error body as sent: the one definition of its shape,
/// for the wire and for the OpenAPI document.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorResponse {
    /// A lowercase human sentence.
    pub error: String,
    /// A stable machine code (snake_case), e.g. `session_not_found`.
    pub code: String,
    /// The request's id, as in `X-Request-Id` and the server's logs.
    pub request_id: String,
    /// Details, e.g. `{"field": "ttl"}` for a validation error.
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

impl ErrorBody {
    /// The contract's body for the request `request_id`.
    pub fn render(&self, request_id: &str) -> ErrorResponse {
        ErrorResponse {
            error: self.message.clone(),
            code: self.code.to_owned(),
            request_id: request_id.to_owned(),
            details: self.details.clone(),
        }
    }

    /// The body for a bare status from the framework (405, 404 …).
    pub fn for_status(status: StatusCode) -> Self {
        let (code, message) = match status {
            StatusCode::NOT_FOUND => ("not_found", "no such route"),
            StatusCode::METHOD_NOT_ALLOWED => {
                ("method_not_allowed", "method not allowed on this route")
            }
            StatusCode::PAYLOAD_TOO_LARGE => {
                ("payload_too_large", "request body is larger than 64 KiB")
            }
            StatusCode::UNSUPPORTED_MEDIA_TYPE => (
                "unsupported_media_type",
                "content type must be application/json",
            ),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
                ("headers_too_large", "request headers are too large")
            }
            s if s.is_server_error() => ("internal_error", "internal error"),
            _ => ("bad_request", "bad request"),
        };
        ErrorBody {
            message: message.into(),
            code,
            details: json!({}),
            cause: None,
        }
    }
}

fn field_details(field: &str, message: &str) -> Value {
    json!({ "field": field, "fields": { field: message } })
}

impl ApiError {
    fn parts(self) -> (StatusCode, ErrorBody) {
        let body = |message: &str, code: &'static str, details: Value| ErrorBody {
            message: message.to_owned(),
            code,
            details,
            cause: None,
        };
        match self {
            ApiError::Session(e) => {
                // The domain error's own message is the sentence clients get,
                // except for a storage failure, whose cause stays in the log.
                let message = e.to_string();
                let (status, code, details) = match e {
                    SessionError::NotFound => {
                        (StatusCode::NOT_FOUND, "session_not_found", json!({}))
                    }
                    SessionError::AlreadyExists => {
                        (StatusCode::CONFLICT, "session_exists", json!({}))
                    }
                    SessionError::TenantLimit { limit } => (
                        StatusCode::TOO_MANY_REQUESTS,
                        "tenant_session_limit",
                        json!({ "max_active_sessions": limit }),
                    ),
                    SessionError::Expired => (StatusCode::GONE, "session_expired", json!({})),
                    SessionError::RefreshTokenReused => {
                        (StatusCode::UNAUTHORIZED, "refresh_token_reused", json!({}))
                    }
                    SessionError::InvalidRefreshToken => (
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        json!({ "field": "refresh_token" }),
                    ),
                    SessionError::TokenMismatch => {
                        (StatusCode::UNAUTHORIZED, "unauthorized", json!({}))
                    }
                    SessionError::TooManyConnections { limit } => (
                        StatusCode::TOO_MANY_REQUESTS,
                        "too_many_connections",
                        json!({ "max_connections_per_session": limit }),
                    ),
                    SessionError::PassthroughNotFound => (
                        StatusCode::NOT_FOUND,
                        "passthrough_auth_not_found",
                        json!({}),
                    ),
                    SessionError::Terminated => (StatusCode::GONE, "session_terminated", json!({})),
                    SessionError::VersionMismatch { current } => (
                        StatusCode::PRECONDITION_FAILED,
                        "version_mismatch",
                        json!({ "current_version": current }),
                    ),
                    SessionError::Validation { field, message } => (
                        StatusCode::BAD_REQUEST,
                        "validation_failed",
                        field_details(&field, &message),
                    ),
                    SessionError::Unavailable => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "service_unavailable",
                        json!({}),
                    ),
                    SessionError::StorageUnavailable => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "storage_unavailable",
                        json!({}),
                    ),
                    SessionError::Storage(cause) => {
                        return (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            ErrorBody {
                                cause: Some(cause),
                                ..body("internal error", "internal_error", json!({}))
                            },
                        )
                    }
                };
                (status, body(&message, code, details))
            }
            ApiError::InvalidJson(why) => (
                StatusCode::BAD_REQUEST,
                body(
                    "request body is not valid json",
                    "invalid_json",
                    json!({ "reason": why }),
                ),
            ),
            ApiError::UnknownField(field) => (
                StatusCode::BAD_REQUEST,
                body(
                    &format!("unknown field {field}"),
                    "unknown_field",
                    json!({ "field": field }),
                ),
            ),
            ApiError::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorBody::for_status(StatusCode::PAYLOAD_TOO_LARGE),
            ),
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorBody::for_status(StatusCode::UNSUPPORTED_MEDIA_TYPE),
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                body("missing or invalid credentials", "unauthorized", json!({})),
            ),
            ApiError::Forbidden => (
                StatusCode::FORBIDDEN,
                body(
                    "the key lacks the scope for this call",
                    "forbidden",
                    json!({}),
                ),
            ),
            ApiError::ForeignOrigin => (
                StatusCode::FORBIDDEN,
                body(
                    "the request's origin is not this server",
                    "forbidden",
                    json!({}),
                ),
            ),
            ApiError::RateLimited => (
                StatusCode::TOO_MANY_REQUESTS,
                body(
                    "rate limit exceeded, retry later",
                    "rate_limited",
                    json!({}),
                ),
            ),
            ApiError::RouteNotFound => (
                StatusCode::NOT_FOUND,
                ErrorBody::for_status(StatusCode::NOT_FOUND),
            ),
            ApiError::Internal(cause) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorBody {
                    cause: Some(cause),
                    ..body("internal error", "internal_error", json!({}))
                },
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.parts();
        let mut response = status.into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response.extensions_mut().insert(body);
        response
    }
}

/// A validation error for `field`.
pub fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::Session(SessionError::validation(field, message))
}
