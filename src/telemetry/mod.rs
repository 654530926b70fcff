//! Logging: `tracing` with text or JSON lines, filtered by `RUST_LOG` or
//! `[log] level`; and Prometheus [`metrics`].

pub mod metrics;

use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, LogSettings};

/// Installs the global subscriber; a second call (tests) is a no-op.
///
/// Lines go to stderr through a buffered writer on its own thread
/// (`tracing-appender`), so a request's access log line costs a channel
/// send, not a `write` syscall on the request's thread. It is not lossy:
/// when the writer falls behind, loggers wait rather than drop lines. Keep
/// the returned guard alive while the process runs; dropping it flushes.
pub fn init(settings: &LogSettings) -> tracing_appender::non_blocking::WorkerGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    guard
}
