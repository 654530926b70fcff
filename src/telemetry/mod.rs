//! Logging: `tracing` with text or JSON lines, filtered by `RUST_LOG` or
//! `[log] level`; and Prometheus [`metrics`].
//!
//! Two rules keep secrets and junk out of the lines:
//!
//! - The libraries that log whole frames or connection bytes at `trace`
//!   ([`QUIET_TARGETS`]: tungstenite writes every WebSocket frame, refresh
//!   tokens included) stay at `debug` at most, unless the filter names them
//!   itself (`RUST_LOG=trace,tungstenite=trace` is an operator's explicit
//!   choice).
//! - Text lines carry ANSI colours only when stderr is a terminal, so files
//!   and journald get plain text.

pub mod live;
pub mod metrics;

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// Targets capped at `debug` unless the filter names them: their `trace`
/// lines hold whole WebSocket frames or request bytes.
pub const QUIET_TARGETS: [&str; 5] = [
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "hyper_util",
    "h2",
];

/// Whether a filter string (`RUST_LOG` syntax) has a directive for
/// `target` or one of its modules.
fn names_target(filter: &str, target: &str) -> bool {
    filter.split(',').any(|directive| {
        let name = directive.split(['=', '[']).next().unwrap_or("").trim();
        name == target
            || name
                .strip_prefix(target)
                .is_some_and(|rest| rest.starts_with("::"))
    })
}

/// `filter` with `target=debug` appended for every [`QUIET_TARGETS`] entry
/// it does not name.
pub fn quieted(filter: &str) -> String {
    let mut directives = filter.trim().to_owned();
    for target in QUIET_TARGETS {
        if !names_target(filter, target) {
            if !directives.is_empty() {
                directives.push(',');
            }
            directives.push_str(target);
            directives.push_str("=debug");
        }
    }
    directives
}

use crate::settings::{LogFormat, LogSettings};

/// Installs the global subscriber; a second call (tests) is a no-op.
///
/// Lines go to stderr through a buffered writer on its own thread
/// (`tracing-appender`), so a request's access log line costs a channel
/// send, not a `write` syscall on the request's thread. It is not lossy:
/// when the writer falls behind, loggers wait rather than drop lines. Keep
/// the returned guard alive while the process runs; dropping it flushes.
pub fn init(settings: &LogSettings) -> tracing_appender::non_blocking::WorkerGuard {
    let from_env = std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .filter(|f| EnvFilter::try_new(f).is_ok());
    let filter = EnvFilter::new(quieted(from_env.as_deref().unwrap_or(&settings.level)));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let _ = match settings.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    guard
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_loggers_are_capped_unless_named() {
        let trace = quieted("trace");
        assert!(trace.starts_with("trace,"));
        for target in QUIET_TARGETS {
            assert!(trace.contains(&format!(",{target}=debug")), "{trace}");
        }
        let named = quieted("trace,tungstenite=trace");
        assert!(!named.contains(",tungstenite=debug"), "{named}");
        assert!(named.contains("tokio_tungstenite=debug"), "{named}");
        assert!(quieted("info,tungstenite::protocol=trace").contains("hyper=debug"));
        assert!(!quieted("tungstenite::protocol=trace").contains(",tungstenite=debug"));
        assert!(EnvFilter::try_new(quieted("")).is_ok());
    }
}
