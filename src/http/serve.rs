//! Serving the app on the engine's arbiters.
//!
//! One accept loop (on the tokio runtime) takes each new connection and
//! hands it, round robin, to one of the actix arbiters, which serves it
//! with hyper for as long as it stays open: every request of a keep-alive
//! connection or a WebSocket runs on that arbiter's thread, where the
//! sessions it created live too (see `engine::shards`). A call for a
//! session on another arbiter takes one hop, as every call did when HTTP
//! ran on its own runtime. The hand-off costs one wake-up per connection,
//! not per request.
//!
//! Why not one `SO_REUSEPORT` listener per arbiter: the listener is bound
//! by the caller (`127.0.0.1:0` in tests, the configured address in
//! `main`), before the arbiters exist, and the kernel's spread of
//! connections by address hash is no better than round robin here.
//!
//! **Slow clients** ([`ConnectionTimeouts`], `[server]` in the config): a
//! connection that has not sent a whole request head within
//! `header_read_timeout` of its first byte (for its first request: of its
//! accept, so a connection that sends nothing is not kept either) is
//! closed; a request body that
//! has not arrived within `body_read_timeout` of its head fails (the
//! handler answers 4xx; hyper then closes the connection, as the body was
//! not read to its end); a keep-alive connection idle for `idle_timeout`
//! between requests is closed, and so is one whose client has not taken
//! any of an answer for `idle_timeout` (a stalled reader would otherwise
//! hold the connection, and a graceful shutdown, for ever); a handler that
//! works long without writing is not cut. hyper's own `header_read_timeout` is not
//! used: its clock runs from the end of the previous response, so it
//! would also close idle keep-alive connections after the head timeout.
//! Instead each connection's reads and writes are watched ([`Watched`])
//! and one timer per connection checks the deadline that applies.
//! Every request carries its peer address as axum's
//! `ConnectInfo<SocketAddr>` (the failed-authentication limit uses it).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_rt::ArbiterHandle;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

/// How long a client may take, per connection (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionTimeouts {
    /// From a request head's first byte to its end.
    pub header_read: Duration,
    /// From a request head's end to its body's end.
    pub body_read: Duration,
    /// Between requests on a keep-alive connection.
    pub idle: Duration,
}

impl ConnectionTimeouts {
    /// The contract's figures: 10 s, 30 s, 60 s.
    pub const CONTRACT: ConnectionTimeouts = ConnectionTimeouts {
        header_read: Duration::from_secs(10),
        body_read: Duration::from_secs(30),
        idle: Duration::from_secs(60),
    };
}

/// What one connection did when, shared by its [`Watched`] stream, its
/// service and its timer. Times are milliseconds since `born`.
struct ConnectionClock {
    born: Instant,
    /// The last read or write of a byte.
    last_activity: AtomicU64,
    /// When the first byte of a request head not yet complete was read
    /// (for the first request, when the connection was accepted), plus one
    /// (0: none pending).
    head_started: AtomicU64,
    /// A request is being served (from its head to the end of its answer).
    in_flight: AtomicBool,
    /// Since when a write has been waiting for the client to read, plus
    /// one (0: no write waiting).
    write_blocked: AtomicU64,
}

impl ConnectionClock {
    fn new() -> Self {
        ConnectionClock {
            born: Instant::now(),
            last_activity: AtomicU64::new(0),
            // A new connection owes its first head from the start.
            head_started: AtomicU64::new(1),
            in_flight: AtomicBool::new(false),
            write_blocked: AtomicU64::new(0),
        }
    }

    /// A write could not go out: the client is not reading.
    fn write_waits(&self) {
        self.write_waits_at(self.now());
    }

    fn write_waits_at(&self, now: u64) {
        let _ =
            self.write_blocked
                .compare_exchange(0, now + 1, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn now(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.born + Duration::from_millis(ms)
    }

    fn read_bytes(&self) {
        self.read_bytes_at(self.now());
    }

    fn read_bytes_at(&self, now: u64) {
        self.last_activity.store(now, Ordering::Relaxed);
        // Bytes between requests start the next request's head.
        if !self.in_flight.load(Ordering::Relaxed) {
            let _ = self.head_started.compare_exchange(
                0,
                now + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    fn wrote_bytes(&self) {
        self.last_activity.store(self.now(), Ordering::Relaxed);
        self.write_blocked.store(0, Ordering::Relaxed);
    }

    fn request_started(&self) {
        self.in_flight.store(true, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
    }

    fn request_finished(&self) {
        self.request_finished_at(self.now());
    }

    fn request_finished_at(&self, now: u64) {
        self.last_activity.store(now, Ordering::Relaxed);
        self.in_flight.store(false, Ordering::Relaxed);
    }

    /// When to look again, or `Err` with why the connection must close now.
    fn check(&self, timeouts: &ConnectionTimeouts) -> Result<Instant, &'static str> {
        self.check_at(self.now(), timeouts).map(|ms| self.at(ms))
    }

    /// [`ConnectionClock::check`] at `now`, in milliseconds since `born`.
    fn check_at(&self, now: u64, timeouts: &ConnectionTimeouts) -> Result<u64, &'static str> {
        let blocked = self.write_blocked.load(Ordering::Relaxed);
        if blocked > 0 {
            // An answer the client does not take: closed after the idle
            // time, so a stalled reader holds no connection (nor a
            // shutdown) for ever.
            let deadline = blocked - 1 + timeouts.idle.as_millis() as u64;
            if now >= deadline {
                return Err("answer not read in time");
            }
        }
        if self.in_flight.load(Ordering::Relaxed) {
            // The body has its own deadline, and a handler may work for
            // long without writing (a bulk termination); look again later.
            return Ok(now + timeouts.header_read.min(timeouts.idle).as_millis() as u64);
        }
        let head = self.head_started.load(Ordering::Relaxed);
        let (deadline, why) = if head > 0 {
            (
                head - 1 + timeouts.header_read.as_millis() as u64,
                "request head not received in time",
            )
        } else {
            (
                self.last_activity.load(Ordering::Relaxed) + timeouts.idle.as_millis() as u64,
                "keep-alive connection idle",
            )
        };
        if now >= deadline {
            Err(why)
        } else {
            Ok(deadline)
        }
    }
}

/// A TCP stream whose reads and writes are noted on its connection's clock.
struct Watched {
    stream: TcpStream,
    clock: Arc<ConnectionClock>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.read_bytes();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        match polled {
            Poll::Ready(Ok(n)) if n > 0 => self.clock.wrote_bytes(),
            Poll::Pending => self.clock.write_waits(),
            _ => {}
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        match polled {
            Poll::Ready(Ok(n)) if n > 0 => self.clock.wrote_bytes(),
            Poll::Pending => self.clock.write_waits(),
            _ => {}
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A request body that fails once its deadline has passed (the time from
/// the head to the body's end, not between reads: a client trickling one
/// byte at a time does not extend it).
struct DeadlineBody {
    body: Incoming,
    deadline: Instant,
    limit: Duration,
    /// Armed on the first wait only: most bodies come with their head.
    timer: Option<Pin<Box<Sleep>>>,
}

impl hyper::body::Body for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = self.deadline;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the request body did not arrive within {} s",
                    self.limit.as_secs_f64()
                ),
            )
            .into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// An answer's body that marks its request finished when hyper is done
/// with it (sent, or dropped with the connection).
struct Answer {
    body: Body,
    clock: Arc<ConnectionClock>,
}

impl hyper::body::Body for Answer {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.clock.request_finished();
    }
}

/// Serves one connection until it closes, a timeout closes it, or `stop`
/// turns true (then in-flight requests finish first).
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    timeouts: ConnectionTimeouts,
    tls: Option<TlsAcceptor>,
    stop: watch::Receiver<bool>,
) {
    let clock = Arc::new(ConnectionClock::new());
    let watched = Watched {
        stream,
        clock: clock.clone(),
    };
    let Some(tls) = tls else {
        return serve_http(watched, clock, peer, app, timeouts, stop).await;
    };
    // The handshake is held to the head timeout: the clock counts it as
    // the first request head owed.
    match tokio::time::timeout(timeouts.header_read, tls.accept(watched)).await {
        Ok(Ok(stream)) => serve_http(stream, clock, peer, app, timeouts, stop).await,
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake not finished in time"),
    }
}

/// Serves HTTP/1.1 over `io` (a watched TCP stream, or TLS over one).
async fn serve_http<I>(
    io: I,
    clock: Arc<ConnectionClock>,
    peer: SocketAddr,
    app: Router,
    timeouts: ConnectionTimeouts,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let service = {
        let clock = clock.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            clock.request_started();
            let app = app.clone();
            let clock = clock.clone();
            let mut request = request.map(|body| {
                if hyper::body::Body::is_end_stream(&body) {
                    Body::new(body)
                } else {
                    Body::new(DeadlineBody {
                        body,
                        deadline: Instant::now() + timeouts.body_read,
                        limit: timeouts.body_read,
                        timer: None,
                    })
                }
            });
            request.extensions_mut().insert(ConnectInfo(peer));
            async move {
                let response = tower::ServiceExt::oneshot(app, request).await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| Answer { body, clock }))
            }
        })
    };
    let connection = hyper::server::conn::http1::Builder::new()
        // Our own timers do this (see the module docs).
        .header_read_timeout(None)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(connection);
    let mut stopping = false;
    let mut next_check = Instant::now() + timeouts.header_read.min(timeouts.idle);
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(next_check) => match clock.check(&timeouts) {
                Ok(next) => next_check = next,
                Err(why) => {
                    // Dropping the connection closes the socket.
                    tracing::debug!(%peer, why, "closing a slow or idle connection");
                    return;
                }
            },
            changed = stop.wait_for(|stop| *stop), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Serves the connections that arrive on `connections` (on the runtime it
/// runs on) until `stop` turns true and every one of them has finished.
async fn serve_lane(
    mut connections: mpsc::Receiver<(std::net::TcpStream, SocketAddr)>,
    app: Router,
    timeouts: ConnectionTimeouts,
    tls: Option<TlsAcceptor>,
    stop: watch::Receiver<bool>,
) {
    // Each connection task holds a clone; when all are gone, all are done.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    let mut stopping = stop.clone();
    loop {
        tokio::select! {
            accepted = connections.recv() => {
                let Some((stream, peer)) = accepted else { break };
                // On this runtime, so its reactor drives it.
                let stream = match TcpStream::from_std(stream) {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, %peer, "cannot take over an accepted connection");
                        continue;
                    }
                };
                let (app, stop, open) = (app.clone(), stop.clone(), open.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    serve_connection(stream, peer, app, timeouts, tls, stop).await;
                    drop(open);
                });
            }
            _ = stopping.wait_for(|stop| *stop) => break,
        }
    }
    drop(open);
    let _ = all_closed.recv().await;
}

/// Serves `app` with the connections of `listener` spread over
/// `arbiters` (on this runtime when there are none), over TLS when `tls`
/// is given, until `shutdown` resolves, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    timeouts: ConnectionTimeouts,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    arbiters: &[ArbiterHandle],
) -> io::Result<()> {
    let (stop, stopping) = watch::channel(false);
    let mut lanes = Vec::with_capacity(arbiters.len().max(1));
    let mut finished = Vec::with_capacity(arbiters.len().max(1));
    let mut start_lane = |spawn: &dyn Fn(Pin<Box<dyn Future<Output = ()> + Send>>) -> bool| {
        let (lane, connections) = mpsc::channel(1024);
        let (done, finished_rx) = oneshot::channel();
        let server = serve_lane(
            connections,
            app.clone(),
            timeouts,
            tls.clone(),
            stopping.clone(),
        );
        let spawned = spawn(Box::pin(async move {
            server.await;
            let _ = done.send(());
        }));
        lanes.push(lane);
        finished.push(finished_rx);
        spawned
    };
    if arbiters.is_empty() {
        start_lane(&|server| {
            tokio::spawn(server);
            true
        });
    }
    for arbiter in arbiters {
        if !start_lane(&|server| arbiter.spawn(server)) {
            return Err(io::Error::other("an arbiter stopped before serving"));
        }
    }
    tokio::pin!(shutdown);
    let mut next = 0usize;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let stream = match stream.into_std() {
                        Ok(stream) => stream,
                        Err(e) => {
                            tracing::warn!(error = %e, %peer, "cannot hand over an accepted connection");
                            continue;
                        }
                    };
                    let lane = &lanes[next % lanes.len()];
                    next = next.wrapping_add(1);
                    if lane.send((stream, peer)).await.is_err() {
                        return Err(io::Error::other("an arbiter stopped serving"));
                    }
                }
                Err(e) => {
                    // Out of file descriptors or memory: wait a little
                    // rather than spin (as axum's own accept loop does).
                    tracing::error!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = stop.send(true);
    drop(lanes);
    let mut result = Ok(());
    for server in finished {
        if server.await.is_err() {
            result = Err(io::Error::other("an arbiter stopped while serving"));
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_figures() {
        assert_eq!(
            ConnectionTimeouts::CONTRACT.header_read,
            Duration::from_secs(10)
        );
        assert_eq!(
            ConnectionTimeouts::CONTRACT.body_read,
            Duration::from_secs(30)
        );
        assert_eq!(ConnectionTimeouts::CONTRACT.idle, Duration::from_secs(60));
    }

    #[test]
    fn deadlines_follow_the_connection_state() {
        let t = ConnectionTimeouts::CONTRACT;
        let clock = ConnectionClock::new();
        assert_eq!(
            clock.check_at(0, &t),
            Ok(10_000),
            "a new connection owes its first head"
        );
        clock.read_bytes_at(3_000);
        assert_eq!(clock.check_at(3_000, &t), Ok(10_000), "from the accept");
        clock.request_started();
        clock.request_finished_at(4_000);
        assert_eq!(clock.check_at(4_000, &t), Ok(64_000), "then idle");
        clock.read_bytes_at(5_000);
        clock.read_bytes_at(8_000);
        assert_eq!(
            clock.check_at(8_000, &t),
            Ok(15_000),
            "the head's clock runs from its first byte; trickling does not move it"
        );
        assert_eq!(
            clock.check_at(15_000, &t),
            Err("request head not received in time")
        );
        clock.request_started();
        assert!(
            clock.check_at(115_000, &t).is_ok(),
            "a request in flight is not idle"
        );
        // A write the client does not take closes it after the idle time.
        clock.write_waits_at(116_000);
        assert!(clock.check_at(175_999, &t).is_ok());
        assert_eq!(clock.check_at(176_000, &t), Err("answer not read in time"));
        clock.write_blocked.store(0, Ordering::Relaxed);
        clock.request_finished_at(115_000);
        assert_eq!(clock.check_at(115_000, &t), Ok(175_000));
        assert!(clock.check_at(174_999, &t).is_ok());
        assert_eq!(
            clock.check_at(175_000, &t),
            Err("keep-alive connection idle")
        );
    }
}
