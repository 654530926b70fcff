//! `GET /api/v1/sessions/{session_id}/ws`: the edge-mcp's live channel,
//! JSON-RPC 2.0 over a WebSocket.
//!
//! Authenticated by the session token (`Authorization: Bearer est_…`, or
//! `?token=est_…`) or the tenant's API key. The connection subscribes to its
//! session's actor, which pushes `session.expiring` before expiry and
//! `session.terminated` / `session.expired` when the session ends, however it
//! ended (REST, admin, expiry, revocation); the socket then closes with 4000
//! (terminated), 4001 (expired) or 4002 (revoked). A refresh that rotates
//! the tokens closes every socket opened with the old session token with
//! 4003 (the session goes on), except the socket whose own
//! `session.refresh` rotated them.
//!
//! At most `websocket.max_connections_per_session` sockets per session (one
//! more: 429 `too_many_connections` before the upgrade); every upgrade is
//! charged to the read bucket of the credential that opened it. While a
//! socket is open its session does not idle out (the session's actor
//! counts an open socket as activity), even if the client only answers
//! pings.
//!
//! Every inbound frame counts as activity, pings included. The server pings
//! every 30 s and closes a connection silent for 90 s. A reply is written
//! before the next frame is read, so nothing is buffered for a client
//! beyond its socket: a send that waits 10 s ends the connection (4008
//! `client not reading` is offered for 1 s, then the socket gets 10 s to
//! close before it is dropped). Frames draw on
//! a write bucket: the session's own with a session token, the key's with an
//! API key (over the limit: error -32029, the connection stays open).

use std::borrow::Cow;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::request::Parts;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures::{SinkExt, StreamExt as _};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::access::{self, Credential, Proof, SessionCaller};
use super::error::ApiError;
use super::extract::{charge, charge_session, check_depth, decode, SessionId};
use super::limits::Class;
use super::openapi::ErrorResponse;
use super::sessions::{session_update, with_tokens, RefreshBody, TerminateBody, UpdateBody};
use super::tools::{from_execute_body, ExecuteBody};
use super::AppState;
use crate::auth::Scope;
use crate::crypto::Secret;
use crate::engine::session::Push;
use crate::model::time::format_rfc3339;
use crate::model::{Requester, SessionError, Status};
use crate::telemetry::metrics as names;

/// Server ping period.
const PING_EVERY: Duration = Duration::from_secs(30);
/// A connection silent (no frame, no pong) this long is closed.
const SILENT_LIMIT: Duration = Duration::from_secs(90);
/// Pushes queued in the session actor per connection.
const PUSH_QUEUE: usize = 16;
/// Longest a single send to the client may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest inbound message (the REST body limit), and frame: a frame
/// declaring more is refused from its header, before anything is reserved
/// for it.
const MAX_MESSAGE: usize = 64 * 1024;
/// What each socket keeps for reading. tungstenite's default (128 KiB,
/// zero-filled on the first read) made every open socket cost 138 KiB of
/// RSS; messages here are a few hundred bytes, and the rare large one
/// grows the buffer for as long as it needs.
const READ_BUFFER: usize = 4 * 1024;

/// Close codes of the contract.
const CLOSE_TERMINATED: u16 = 4000;
const CLOSE_EXPIRED: u16 = 4001;
const CLOSE_REVOKED: u16 = 4002;
const CLOSE_ROTATED: u16 = 4003;
/// A frame or message over [`MAX_MESSAGE`] (RFC 6455: message too big).
const CLOSE_TOO_BIG: u16 = 1009;
/// Ours: the client did not take a message within [`SEND_TIMEOUT`].
const CLOSE_TOO_SLOW: u16 = 4008;

/// Whether a read failed because a frame or message was over the limit
/// (tungstenite refuses it from the frame's header).
fn too_large(error: &axum::Error) -> bool {
    std::error::Error::source(error)
        .and_then(|e| e.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}

/// JSON-RPC error codes of the contract.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const SESSION_GONE: i64 = -32001;
const RATE_LIMITED: i64 = -32029;
const INTERNAL: i64 = -32603;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/sessions/{session_id}/ws", get(upgrade))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct WsParams {
    /// The session token, for clients that cannot set headers.
    token: Option<String>,
}

/// The `?token=` of an upgrade request, read as its handler reads it (for
/// the rate-limit middleware, which runs first).
pub(crate) fn query_token(uri: &axum::http::Uri) -> Option<String> {
    Query::<WsParams>::try_from_uri(uri).ok()?.0.token
}

/// Authenticates the upgrade request by the rule of [`access`]: a session
/// token (header, else query) for this very session, else an API key with
/// scope `sessions`. Whichever it was is whose write bucket frames draw on;
/// the upgrade itself is charged to its read bucket (the middleware charged
/// a key already; a session token is charged here, once verified).
async fn authenticate(
    state: &AppState,
    parts: &Parts,
    id: &str,
    query_token: Option<&str>,
) -> Result<SessionCaller, ApiError> {
    let credential = Credential::of_session_call(&parts.headers, query_token);
    let caller = access::check(state, parts, credential, Scope::Sessions)?
        .on_session(state, parts, id, false)
        .await?;
    if caller.proof == Proof::SessionToken {
        charge_session(parts, state, &caller.bucket)?;
    }
    Ok(caller)
}

/// Opens the channel (101), or refuses with the contract's error body.
#[utoipa::path(
    get,
    path = "/api/v1/sessions/{session_id}/ws",
    tag = "sessions",
    description = "JSON-RPC 2.0 over a WebSocket (see the README's WebSocket section). Methods: session.heartbeat, session.get, session.update, session.refresh, tool.executed, session.terminate. Pushes: session.expiring, session.terminated, session.expired, then close 4000/4001/4002.",
    params(("session_id" = String, Path, description = "The session id"), WsParams),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "validation_failed, or not a WebSocket upgrade", body = ErrorResponse),
        (status = 401, description = "unauthorized (a session token that is not this session's included)", body = ErrorResponse),
        (status = 403, description = "forbidden", body = ErrorResponse),
        (status = 404, description = "session_not_found", body = ErrorResponse),
        (status = 410, description = "session_expired or session_terminated", body = ErrorResponse),
        (status = 429, description = "rate_limited (the upgrade draws on the read bucket), or too_many_connections (websocket.max_connections_per_session sockets are open)", body = ErrorResponse),
        (status = 503, description = "service_unavailable", body = ErrorResponse)
    ),
    security(("api_key" = []), ("session_token" = []))
)]
pub(crate) async fn upgrade(
    State(state): State<AppState>,
    SessionId(id): SessionId,
    params: Result<Query<WsParams>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let (parts, _) = request.into_parts();
    let Query(params) =
        params.map_err(|_| super::error::invalid("token", "query string is not valid"))?;
    let caller = authenticate(&state, &parts, &id, params.token.as_deref()).await?;
    let ws = ws.map_err(|_| {
        super::error::invalid("upgrade", "this endpoint needs a WebSocket upgrade request")
    })?;
    let (_, subscription, pushes) = state
        .engine
        .subscribe(
            caller.tenant,
            &id,
            PUSH_QUEUE,
            caller.token,
            state.max_sockets_per_session,
        )
        .await?;
    tracing::info!(session_id = %id, tenant = %caller.tenant, "websocket opened");
    Ok(ws
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| async move {
            metrics::gauge!(names::WS_OPEN).increment(1.0);
            crate::telemetry::live::websockets(1);
            let connection = Connection {
                state: state.clone(),
                tenant: caller.tenant,
                id: id.clone(),
                bucket: caller.bucket,
                subscription,
            };
            connection.run(socket, pushes).await;
            state
                .engine
                .unsubscribe(caller.tenant, &id, subscription)
                .await;
            metrics::gauge!(names::WS_OPEN).decrement(1.0);
            crate::telemetry::live::websockets(-1);
            tracing::info!(session_id = %id, "websocket closed");
        }))
}

struct Connection {
    state: AppState,
    tenant: Uuid,
    id: String,
    bucket: [u8; 32],
    /// Its subscription to the session's actor.
    subscription: u64,
}

/// Why the loop ended, and how to close.
enum End {
    Close(u16, &'static str),
    Gone,
}

impl Connection {
    /// The connection's loop. It owns the socket: a reply is written
    /// before the next frame is read, so a client that sends without
    /// reading is held back by TCP itself, and one that stops reading for
    /// [`SEND_TIMEOUT`] is disconnected.
    async fn run(&self, mut socket: WebSocket, mut pushes: mpsc::Receiver<Push>) {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        let mut last_heard = Instant::now();
        // One timer for the connection's life: a frame only moves
        // `last_heard`, and the timer, when it fires, looks at it.
        let silence = tokio::time::sleep(SILENT_LIMIT);
        tokio::pin!(silence);
        let end = loop {
            tokio::select! {
                () = &mut silence => {
                    let deadline = last_heard + SILENT_LIMIT;
                    if Instant::now() >= deadline {
                        break End::Close(1001, "silent for 90 s");
                    }
                    silence.as_mut().reset(deadline.into());
                }
                push = pushes.recv() => match push {
                    Some(push) => {
                        let (note, end) = notice(push);
                        if let Some(note) = note {
                            if let Err(end) = send(&mut socket, Message::Text(note.into())).await {
                                break end;
                            }
                        }
                        if let Some(end) = end {
                            break end;
                        }
                    }
                    // Closed by the actor without an end: it restarted, the
                    // engine is stopping, or this socket fell behind on pushes.
                    // On a cluster node, the session's shard may have gone
                    // to another node: 1012 (service restart), reconnect.
                    None if self.moved() => {
                        break End::Close(1012, "the session moved to another node, reconnect")
                    }
                    None => break End::Close(1001, "session channel closed, reconnect"),
                },
                frame = socket.next() => match frame {
                    Some(Err(e)) if too_large(&e) => {
                        break End::Close(CLOSE_TOO_BIG, "frame larger than 64 KiB")
                    }
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break End::Gone,
                    // A cluster node that no longer holds the session's
                    // shard (handed over, or its lease ran out while it
                    // was frozen) answers nothing more from it.
                    Some(Ok(_)) if self.moved() => {
                        break End::Close(1012, "the session moved to another node, reconnect")
                    }
                    Some(Ok(frame)) => {
                        last_heard = Instant::now();
                        // Every inbound frame is activity, pings included
                        // (`handle` says how a text frame's is noted), and
                        // draws on the write bucket.
                        let limited = charge(&self.state, Class::Write, &self.bucket, None).is_err();
                        let reply = match frame {
                            Message::Text(text) => self.handle(text.as_str(), limited).await,
                            Message::Binary(_) => {
                                self.touch().await;
                                Some(error_reply("null", INVALID_REQUEST, "frames are JSON text"))
                            }
                            _ => {
                                self.touch().await;
                                None
                            }
                        };
                        if let Some(reply) = reply {
                            if let Err(end) = send(&mut socket, Message::Text(reply.into())).await {
                                break end;
                            }
                        }
                    }
                },
                _ = ping.tick() => {
                    if let Err(end) = send(&mut socket, Message::Ping(Vec::new().into())).await {
                        break end;
                    }
                }
            }
        };
        if let End::Close(code, reason) = end {
            tracing::info!(session_id = %self.id, code, reason, "closing websocket");
            // A client that is not reading gets a second to take it.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                socket.send(close_frame(code, reason)),
            )
            .await;
        }
        // Sends what is still buffered (the reply to a client's close
        // included); a client that does not read is dropped.
        let _ = tokio::time::timeout(SEND_TIMEOUT, SinkExt::close(&mut socket)).await;
    }

    /// On a cluster node, whether this node no longer serves the session
    /// (its shard's tenure here ended or ends, or its lease ran out on
    /// this node's clock).
    fn moved(&self) -> bool {
        self.state
            .cluster
            .as_ref()
            .is_some_and(|cluster| !cluster.serves(self.tenant, &self.id))
    }

    /// Notes the activity of a frame.
    async fn touch(&self) {
        let _ = self.state.engine.touch(self.tenant, &self.id).await;
    }

    /// Handles one text frame; answers the reply, if any (requests get one,
    /// notifications none; a frame that is not JSON-RPC gets an error).
    ///
    /// The frame's activity is noted first, so that a heartbeat answers the
    /// expiry it moved; `tool.executed` is activity of its own (the
    /// session's actor notes it with the execution), and only one that was
    /// not recorded is noted apart, afterwards: one message to the actor per
    /// tool call instead of two.
    async fn handle(&self, text: &str, limited: bool) -> Option<String> {
        let request = parse_request(text);
        let records =
            matches!(&request, Ok(request) if !limited && request.method == "tool.executed");
        if !records {
            self.touch().await;
        }
        let request = match request {
            Ok(request) => request,
            Err(reply) => return Some(reply),
        };
        if limited {
            return request
                .id
                .map(|id| error_reply(&id, RATE_LIMITED, "rate limited"));
        }
        let outcome = self.call(&request.method, request.params.as_deref()).await;
        if records && outcome.is_err() {
            self.touch().await;
        }
        // The fast reading checks params only for syntax: params the tree
        // refuses (a lone surrogate, a number out of range) fail to decode,
        // and the frame gets the tree's answer, a parse error. (A frame the
        // tree read already passes again.)
        if matches!(outcome, Err((INVALID_PARAMS, _))) {
            if let Err(reply) = parse_request_tree(text) {
                return Some(reply);
            }
        }
        let id = request.id?;
        Some(match outcome {
            Ok(result) => format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#),
            Err((code, message)) => error_reply(&id, code, &message),
        })
    }

    /// Runs one method; answers its result as JSON text.
    async fn call(&self, method: &str, params: Option<&str>) -> Result<String, (i64, String)> {
        let engine = &self.state.engine;
        let (tenant, id) = (self.tenant, self.id.as_str());
        match method {
            "session.heartbeat" => {
                // The frame itself was the activity (see `run`).
                let view = engine.validate(tenant, id).await.map_err(rpc)?;
                text(&json!({ "expires_at": view.expires_at }))
            }
            "session.get" => text(&engine.get(tenant, id).await.map_err(rpc)?),
            "session.update" => {
                let body: UpdateBody = params_as(params)?;
                let update = session_update(body).map_err(api)?;
                text(&engine.update(tenant, id, update, None).await.map_err(rpc)?)
            }
            "session.refresh" => {
                let body: Option<RefreshBody> = optional_params(params)?;
                let presented = body.and_then(|b| b.refresh_token).map(Secret::new);
                let (view, tokens) = engine
                    .refresh(tenant, id, presented.as_ref(), Some(self.subscription))
                    .await
                    .map_err(rpc)?;
                text(&with_tokens(&view, tokens.as_ref()))
            }
            "tool.executed" => {
                let body: ExecuteBody = params_as(params)?;
                let execution = from_execute_body(body).map_err(api)?;
                let count = engine
                    .record_tool(tenant, id, execution)
                    .await
                    .map_err(rpc)?;
                Ok(format!(r#"{{"tool_execution_count":{count}}}"#))
            }
            "session.terminate" => {
                let body: Option<TerminateBody> = optional_params(params)?;
                let reason = body.and_then(|b| b.reason);
                // The actor's push waits in this connection's channel until
                // the answer `{}` is sent, so `session.terminated` and the
                // close follow it.
                engine
                    .terminate(tenant, id, reason, Requester::Client)
                    .await
                    .map_err(rpc)?;
                Ok("{}".to_owned())
            }
            _ => Err((METHOD_NOT_FOUND, format!("method not found: {method}"))),
        }
    }
}

/// Writes one message; a client that does not take it within
/// [`SEND_TIMEOUT`] is too slow, one whose socket failed is gone.
async fn send(socket: &mut WebSocket, message: Message) -> Result<(), End> {
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Gone),
        Err(_) => Err(End::Close(CLOSE_TOO_SLOW, "client not reading")),
    }
}

/// A push as the notification it sends (none for a rotated token, which
/// only closes), and the end it brings, if any.
fn notice(push: Push) -> (Option<String>, Option<End>) {
    match push {
        Push::Expiring {
            expires_at,
            seconds_left,
        } => (
            Some(notification(
                "session.expiring",
                json!({ "expires_at": format_rfc3339(expires_at), "seconds_left": seconds_left }),
            )),
            None,
        ),
        Push::Ended {
            status,
            reason,
            revoked,
        } => {
            let end = match status {
                Status::Expired => (CLOSE_EXPIRED, "session expired"),
                _ if revoked => (CLOSE_REVOKED, "session revoked"),
                _ => (CLOSE_TERMINATED, "session terminated"),
            };
            let note = if status == Status::Expired {
                notification("session.expired", json!({}))
            } else {
                notification("session.terminated", json!({ "reason": reason }))
            };
            (Some(note), Some(End::Close(end.0, end.1)))
        }
        // No notification: the session itself goes on.
        Push::TokenRotated => (None, Some(End::Close(CLOSE_ROTATED, "token rotated"))),
    }
}

/// A JSON-RPC request: the id's JSON text (none for a notification), the
/// method, and the params' JSON text (none when absent or null).
struct Request<'a> {
    id: Option<Cow<'a, str>>,
    method: Cow<'a, str>,
    params: Option<Cow<'a, str>>,
}

/// A frame read as a JSON-RPC request without building a JSON tree: the
/// id and params stay text, and the params are decoded once, into their
/// method's body. Anything unusual (escapes in `jsonrpc` or `method`,
/// a duplicate key, a wrong type) fails here and is read again by
/// [`parse_request_tree`], which says what is wrong.
#[derive(Deserialize)]
struct Envelope<'a> {
    jsonrpc: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    method: Option<&'a str>,
    #[serde(borrow)]
    params: Option<&'a RawValue>,
}

/// Tells an `"id": null` (a request, answered with id null) from no id (a
/// notification): the field's deserializer only runs when the key is there.
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// Whether an id's JSON text is one the fast reading takes as it is: null,
/// an integer, or a string without escapes. Others (a fraction, an
/// exponent, an escape, or something that is not a valid id) are read
/// through the tree, which checks what raw text does not (a lone
/// surrogate, a number out of range).
fn plain_id(id: &str) -> bool {
    let digits = id.strip_prefix('-').unwrap_or(id);
    id == "null"
        || (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        || (id.len() >= 2 && id.starts_with('"') && !id.contains('\\'))
}

/// A text frame as a JSON-RPC request; or the error reply for a frame that
/// is not one.
fn parse_request(text: &str) -> Result<Request<'_>, String> {
    parse_request_fast(text).map_or_else(|| parse_request_tree(text), Ok)
}

/// The request in `text` when it is read as it is: an object (a struct
/// also reads from an array, by position), nested no deeper than a body may
/// be (the tree enforces its own limit on fields this skips), with
/// `"jsonrpc": "2.0"`, a method and a plain id.
fn parse_request_fast(text: &str) -> Option<Request<'_>> {
    if !text.trim_start().starts_with('{') || check_depth(text.as_bytes()).is_err() {
        return None;
    }
    let frame = serde_json::from_str::<Envelope<'_>>(text).ok()?;
    if frame.jsonrpc != Some("2.0") || !frame.id.is_none_or(|id| plain_id(id.get())) {
        return None;
    }
    Some(Request {
        id: frame.id.map(|id| Cow::Borrowed(id.get())),
        method: Cow::Borrowed(frame.method?),
        params: frame.params.map(|params| Cow::Borrowed(params.get())),
    })
}

/// [`parse_request`] through a JSON tree, for the frames its fast reading
/// does not take: the same requests, and the error reply for the others.
fn parse_request_tree(text: &str) -> Result<Request<'static>, String> {
    let Ok(mut frame) = serde_json::from_str::<Value>(text) else {
        return Err(error_reply("null", PARSE_ERROR, "parse error"));
    };
    let Some(object) = frame.as_object_mut() else {
        return Err(error_reply("null", INVALID_REQUEST, "invalid request"));
    };
    let id = object.remove("id");
    let valid_id = id
        .as_ref()
        .is_none_or(|i| i.is_string() || i.is_number() || i.is_null());
    let reply_id = id.clone().filter(|_| valid_id).unwrap_or(Value::Null);
    let method = match object.remove("method") {
        Some(Value::String(method)) => Some(method),
        _ => None,
    };
    let (Some(method), true, Some("2.0")) = (
        method,
        valid_id,
        object.get("jsonrpc").and_then(Value::as_str),
    ) else {
        return Err(error_reply(
            &reply_id.to_string(),
            INVALID_REQUEST,
            "invalid request",
        ));
    };
    let params = object
        .remove("params")
        .filter(|params| !params.is_null())
        .map(|params| Cow::Owned(params.to_string()));
    Ok(Request {
        id: id.map(|id| Cow::Owned(id.to_string())),
        method: Cow::Owned(method),
        params,
    })
}

/// Decodes a method's params (absent or null: `{}`) as a REST body is
/// decoded: the same depth rule and the same errors.
fn params_as<T: serde::de::DeserializeOwned>(params: Option<&str>) -> Result<T, (i64, String)> {
    decode(params.unwrap_or("{}").as_bytes()).map_err(api)
}

fn optional_params<T: serde::de::DeserializeOwned>(
    params: Option<&str>,
) -> Result<Option<T>, (i64, String)> {
    match params {
        None => Ok(None),
        Some(_) => params_as(params).map(Some),
    }
}

/// A result as JSON text.
fn text(result: &impl serde::Serialize) -> Result<String, (i64, String)> {
    serde_json::to_string(result).map_err(|_| (INTERNAL, "internal error".to_owned()))
}

/// A domain error as a JSON-RPC error.
fn rpc(e: SessionError) -> (i64, String) {
    let code = match e {
        SessionError::NotFound
        | SessionError::Expired
        | SessionError::Terminated
        | SessionError::TokenMismatch
        | SessionError::RefreshTokenReused => SESSION_GONE,
        SessionError::Validation { .. }
        | SessionError::VersionMismatch { .. }
        | SessionError::InvalidRefreshToken
        | SessionError::PassthroughNotFound
        | SessionError::AlreadyExists
        | SessionError::TenantLimit { .. } => INVALID_PARAMS,
        SessionError::TooManyConnections { .. } => RATE_LIMITED,
        SessionError::Unavailable | SessionError::StorageUnavailable | SessionError::Storage(_) => {
            INTERNAL
        }
    };
    let message = match &e {
        SessionError::Storage(_) => "internal error".to_owned(),
        other => other.to_string(),
    };
    (code, message)
}

/// A request error (bad params) as a JSON-RPC error.
fn api(e: ApiError) -> (i64, String) {
    match e {
        ApiError::Session(e) => rpc(e),
        ApiError::InvalidJson(_) | ApiError::UnknownField(_) => {
            (INVALID_PARAMS, "invalid params".into())
        }
        _ => (INTERNAL, "internal error".into()),
    }
}

/// An error reply to the request whose id is `id` (JSON text).
fn error_reply(id: &str, code: i64, message: &str) -> String {
    let error = json!({ "code": code, "message": message });
    format!(r#"{{"jsonrpc":"2.0","id":{id},"error":{error}}}"#)
}

fn notification(method: &str, params: Value) -> String {
    json!({ "jsonrpc": "2.0", "method": method, "params": params }).to_string()
}

fn close_frame(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request as JSON values, to compare two readings of one frame.
    fn as_values(
        request: Result<Request<'_>, String>,
    ) -> Result<(Option<Value>, String, Value), Value> {
        let json = |text: &str| serde_json::from_str::<Value>(text).unwrap();
        match request {
            Ok(r) => Ok((
                r.id.as_deref().map(json),
                r.method.into_owned(),
                r.params.as_deref().map_or(Value::Null, json),
            )),
            Err(reply) => Err(json(&reply)),
        }
    }

    #[test]
    fn the_fast_reading_of_a_frame_agrees_with_the_tree() {
        let frames = [
            r#"{"jsonrpc":"2.0","id":7,"method":"tool.executed","params":{"tool_name":"grep","arguments":{"a":[1,{"b":null}]}}}"#,
            r#"{"jsonrpc":"2.0","id":"abc","method":"session.get"}"#,
            r#"{"jsonrpc":"2.0","id":null,"method":"session.get"}"#,
            r#"{"jsonrpc":"2.0","method":"session.heartbeat"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"session.get","params":null}"#,
            r#"{"jsonrpc":"2.0","id":-15,"method":"session.get","params":[]}"#,
            r#"{"params":{"x":1},"method":"session.update","id":2,"jsonrpc":"2.0","extra":true}"#,
            r#" { "jsonrpc" : "2.0" , "id" : 3 , "method" : "session.get" } "#,
            // Read by the tree only: escapes, a duplicate key.
            r#"{"jsonrpc":"2.0","id":4,"method":"tool\u002eexecuted","params":{}}"#,
            r#"{"jsonrpc":"2.0","id":5,"id":6,"method":"session.get"}"#,
            // Errors.
            r#"{"jsonrpc":"1.0","id":8,"method":"session.get"}"#,
            r#"{"id":9,"method":"session.get"}"#,
            r#"{"jsonrpc":"2.0","id":10,"method":7}"#,
            r#"{"jsonrpc":"2.0","id":{"a":1},"method":"session.get"}"#,
            r#"{"jsonrpc":"2.0","id":true,"method":"session.get"}"#,
            r#"{"jsonrpc":"2.0","id":11}"#,
            r#"[{"jsonrpc":"2.0","id":12,"method":"session.get"}]"#,
            r#"{"jsonrpc":"2.0","id":13,"method":"session.get"} x"#,
            r#"{"jsonrpc":"2.0","id":14,"method":"#,
            "",
            // A struct reads an array by position; the tree does not.
            r#"["2.0",15,"tool.executed",{"tool_name":"grep"}]"#,
            // Raw text the tree refuses: a lone surrogate, a number out of
            // range; and ids the fast reading leaves to the tree.
            r#"{"jsonrpc":"2.0","id":"\ud800","method":"session.get"}"#,
            r#"{"jsonrpc":"2.0","id":1e400,"method":"session.get"}"#,
            r#"{"jsonrpc":"2.0","id":1.5,"method":"session.get"}"#,
            r#"{"jsonrpc":"2.0","id":"a\"b","method":"session.get"}"#,
        ];
        for (i, frame) in frames.iter().enumerate() {
            // The first eight are read without a tree.
            if i < 8 {
                let fast = parse_request(frame).unwrap();
                assert!(matches!(fast.method, Cow::Borrowed(_)), "{frame}");
            }
            assert_eq!(
                as_values(parse_request(frame)),
                as_values(parse_request_tree(frame)),
                "{frame}"
            );
        }
        // Nested past serde_json's limit in a field the fast reading skips.
        let deep = format!(
            r#"{{"jsonrpc":"2.0","id":16,"method":"session.get","junk":{}1{}}}"#,
            "[".repeat(130),
            "]".repeat(130)
        );
        assert_eq!(
            as_values(parse_request(&deep)),
            as_values(parse_request_tree(&deep))
        );
        assert!(parse_request_tree(&deep).is_err());
        // Params are raw text to the fast reading; `handle` answers the
        // tree's parse error when such params fail to decode.
        let surrogate =
            r#"{"jsonrpc":"2.0","id":17,"method":"tool.executed","params":{"tool_name":"\ud800"}}"#;
        assert!(parse_request(surrogate).is_ok());
        assert!(parse_request_tree(surrogate).is_err());
        // The fast reading keeps a notification apart from `"id": null`.
        assert!(parse_request(r#"{"jsonrpc":"2.0","method":"m"}"#)
            .unwrap()
            .id
            .is_none());
        assert_eq!(
            parse_request(r#"{"jsonrpc":"2.0","id":null,"method":"m"}"#)
                .unwrap()
                .id
                .as_deref(),
            Some("null")
        );
    }

    #[test]
    fn replies_are_json_rpc() {
        let reply: Value =
            serde_json::from_str(&error_reply(r#""a\"b""#, -32602, "bad \"x\"")).unwrap();
        assert_eq!(
            reply,
            json!({ "jsonrpc": "2.0", "id": "a\"b", "error": { "code": -32602, "message": "bad \"x\"" } })
        );
    }
}
