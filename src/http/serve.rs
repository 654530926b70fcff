//! Serving the app on the engine's arbiters.
//!
//! One accept loop (on the tokio runtime) takes each new connection and
//! hands it, round robin, to one of the actix arbiters, which serves it
//! with axum for as long as it stays open: every request of a keep-alive
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

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use actix_rt::ArbiterHandle;
use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

/// Connections handed to one arbiter.
struct Handoff {
    connections: mpsc::Receiver<(std::net::TcpStream, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for Handoff {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let Some((stream, peer)) = self.connections.recv().await else {
                // The accept loop is gone (shutting down): nothing more
                // comes; the graceful shutdown ends this server.
                return std::future::pending().await;
            };
            // On the arbiter's own runtime, so its reactor drives it.
            match TcpStream::from_std(stream) {
                Ok(stream) => return (stream, peer),
                Err(e) => {
                    tracing::warn!(error = %e, %peer, "cannot take over an accepted connection")
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Serves `app` with the connections of `listener` spread over
/// `arbiters` (on this runtime when there are none) until `shutdown`
/// resolves, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    arbiters: &[ArbiterHandle],
) -> io::Result<()> {
    if arbiters.is_empty() {
        return axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
    }
    let local = listener.local_addr()?;
    let (stop, stopping) = watch::channel(false);
    let mut lanes = Vec::with_capacity(arbiters.len());
    let mut finished = Vec::with_capacity(arbiters.len());
    for arbiter in arbiters {
        let (lane, connections) = mpsc::channel(1024);
        let (done, finished_rx) = oneshot::channel();
        let app = app.clone();
        let mut stopping = stopping.clone();
        let server = async move {
            let listener = Handoff { connections, local };
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopping.wait_for(|stop| *stop).await;
                })
                .await;
            let _ = done.send(served);
        };
        if !arbiter.spawn(server) {
            return Err(io::Error::other("an arbiter stopped before serving"));
        }
        lanes.push(lane);
        finished.push(finished_rx);
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
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = stop.send(true);
    drop(lanes);
    let mut result = Ok(());
    for server in finished {
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err(io::Error::other("an arbiter stopped while serving")),
        }
    }
    result
}
