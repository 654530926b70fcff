//! `edge-sessions restore FILE`: loads a backup taken with `GET
//! /admin/backup` into an empty data dir, with no server running on it.
//!
//! The whole file is checked first (every frame's checksum, the trailer's
//! counts), so a damaged or cut backup is refused before anything is
//! written; then it is loaded straight into sled and synced once. A data
//! dir that is not empty is refused (exit 2, naming it), and a load that
//! fails part way removes what it wrote. The next `serve` recovers the
//! sessions as after any restart: those that ran out meanwhile come back
//! `expired`, and with the PostgreSQL tier on, the restored records are
//! shipped (the outbox is seeded at start).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::progress::{Counting, Progress};
use crate::persist::backup::{self, BackupError, Counts};
use crate::persist::Store;
use crate::settings::Settings;

/// Why a restore did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The data dir holds something already.
    #[error("the data dir {0} is not empty; restore only into an empty (or missing) data dir")]
    NotEmpty(PathBuf),
    /// The file is not a backup this release reads, or is damaged or cut.
    #[error("{path}: {source}")]
    Backup {
        /// The backup file.
        path: PathBuf,
        /// What is wrong with it.
        source: BackupError,
    },
    /// Reading the file or writing the data dir failed.
    #[error("{0}")]
    Io(String),
}

impl RestoreError {
    /// Bad input (exit 2) rather than a failure.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            RestoreError::NotEmpty(_)
                | RestoreError::Backup {
                    source: BackupError::Invalid(_),
                    ..
                }
        )
    }
}

/// Restores `file` into the data dir of `settings`.
pub fn run(settings: &Settings, file: &Path) -> Result<Counts, RestoreError> {
    let data_dir = &settings.storage.data_dir;
    let existed = data_dir.exists();
    if !backup::is_empty_dir(data_dir).map_err(|e| io(data_dir, e))? {
        return Err(RestoreError::NotEmpty(data_dir.clone()));
    }
    let size = std::fs::metadata(file).map_err(|e| io(file, e))?.len();
    let as_backup = |source| RestoreError::Backup {
        path: file.to_owned(),
        source,
    };
    // Pass one: check everything before writing anything.
    let expected = read_with_progress("restore: checking", file, size, |input, tick| {
        backup::verify(input, tick).map_err(as_backup)
    })?;
    // Pass two: load, into the store opened (and locked) here; a store
    // another process opened meanwhile is refused by its lock and left as
    // it is.
    create_private_dir(data_dir).map_err(|e| io(data_dir, e))?;
    let opened = match Store::open(data_dir, settings.storage.cache_capacity_mb << 20, false) {
        Ok(opened) => opened,
        Err(e) => {
            if !existed {
                // Only the empty dir made just now.
                let _ = std::fs::remove_dir(data_dir);
            }
            return Err(RestoreError::Io(format!(
                "opening the store in {}: {e}",
                data_dir.display()
            )));
        }
    };
    if !opened.store.is_empty() {
        // A server used the dir between the check above and the lock.
        return Err(RestoreError::NotEmpty(data_dir.clone()));
    }
    let loaded = load(&opened.store, data_dir, file, size).and_then(|loaded| {
        if loaded == expected {
            Ok(loaded)
        } else {
            Err(RestoreError::Io(format!(
                "{} changed while it was restored",
                file.display()
            )))
        }
    });
    drop(opened);
    if loaded.is_err() {
        // Nothing half-restored stays behind (this run made everything in
        // the dir: it was empty and stayed locked).
        let cleaned = if existed {
            std::fs::read_dir(data_dir).and_then(|entries| {
                entries.flatten().try_for_each(|entry| {
                    let path = entry.path();
                    if path.is_dir() {
                        std::fs::remove_dir_all(path)
                    } else {
                        std::fs::remove_file(path)
                    }
                })
            })
        } else {
            std::fs::remove_dir_all(data_dir)
        };
        if let Err(clean) = cleaned {
            eprintln!(
                "edge-sessions: restore: could not remove what was written to {}: {clean}",
                data_dir.display()
            );
        }
    }
    loaded
}

fn load(store: &Store, data_dir: &Path, file: &Path, size: u64) -> Result<Counts, RestoreError> {
    read_with_progress("restore", file, size, |input, tick| {
        backup::restore(store, input, tick).map_err(|source| match source {
            BackupError::Invalid(_) => RestoreError::Backup {
                path: file.to_owned(),
                source,
            },
            other => RestoreError::Io(format!("writing {}: {other}", data_dir.display())),
        })
    })
}

/// Runs `work` over `file`, reporting the bytes read and the sessions
/// counted so far.
fn read_with_progress(
    what: &'static str,
    file: &Path,
    size: u64,
    work: impl FnOnce(&mut dyn std::io::Read, &mut dyn FnMut(Counts)) -> Result<Counts, RestoreError>,
) -> Result<Counts, RestoreError> {
    let opened = File::open(file).map_err(|e| io(file, e))?;
    let (mut input, read) = Counting::new(BufReader::with_capacity(1 << 20, opened));
    let mut progress = Progress::start(what, Some(size));
    let mut tick = |counts: Counts| {
        progress.update(read.load(Ordering::Relaxed), || {
            format!(
                "{} sessions, {} executions",
                counts.sessions, counts.executions
            )
        });
    };
    let result = work(&mut input, &mut tick);
    match &result {
        Ok(counts) => progress.finish(&format!(
            "{} sessions and {} executions",
            counts.sessions, counts.executions
        )),
        Err(_) => progress.abandon(),
    }
    result
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn io(path: &Path, e: std::io::Error) -> RestoreError {
    RestoreError::Io(format!("{}: {e}", path.display()))
}
