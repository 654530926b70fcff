//! Progress of a long operation: a bar when stderr is a terminal
//! (indicatif), else one line every few seconds, so a log collector sees
//! how far it is without a flood.

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a line is printed when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(2);

/// Reports how far an operation over `total` bytes (when known) is.
pub struct Progress {
    what: &'static str,
    total: Option<u64>,
    bar: Option<ProgressBar>,
    last_line: Instant,
    started: Instant,
}

impl Progress {
    /// Starts reporting `what` (e.g. "restore"), over `total` bytes if known.
    pub fn start(what: &'static str, total: Option<u64>) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match total {
                Some(total) => ProgressBar::new(total).with_style(
                    ProgressStyle::with_template(
                        "{prefix} [{bar:32}] {bytes}/{total_bytes} {msg} ({eta})",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                ),
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{prefix} {spinner} {bytes} {msg}")
                        .expect("a valid template"),
                ),
            };
            bar.set_prefix(what);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            what,
            total,
            bar,
            last_line: Instant::now(),
            started: Instant::now(),
        }
    }

    /// `done` bytes so far; `note` says what they hold (e.g. "1,234 sessions").
    pub fn update(&mut self, done: u64, note: impl FnOnce() -> String) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(note());
            }
            None if self.last_line.elapsed() >= LINE_EVERY => {
                self.last_line = Instant::now();
                let share = self
                    .total
                    .filter(|t| *t > 0)
                    .map(|t| format!(" ({}%)", done * 100 / t))
                    .unwrap_or_default();
                eprintln!(
                    "edge-sessions: {}: {}, {} bytes{share}",
                    self.what,
                    note(),
                    done
                );
            }
            None => {}
        }
    }

    /// Ends the report with `summary`.
    pub fn finish(self, summary: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!(
            "edge-sessions: {}: {summary} in {:.1} s",
            self.what,
            self.started.elapsed().as_secs_f64()
        );
    }

    /// Ends the report without a summary (the operation failed).
    pub fn abandon(self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}

/// Counts the bytes read through it, where a progress report can see them.
pub struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R> Counting<R> {
    /// Wraps `inner`; answers the reader and its running count.
    pub fn new(inner: R) -> (Self, Arc<AtomicU64>) {
        let read = Arc::new(AtomicU64::new(0));
        (
            Counting {
                inner,
                read: read.clone(),
            },
            read,
        )
    }
}

impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}
