//! Backups: every stored session and its executions as one stream, and
//! loading such a stream into an empty data dir.
//!
//! # Format (version 1)
//!
//! The 8 bytes `ESBACKUP`, a format byte (1), then frames
//! `len (u32 BE) | crc32 of the rest (u32 BE) | kind (u8) | payload`, where
//! `len` counts the kind byte and the payload:
//!
//! - `S`: a session record as the store keeps it (its own format byte,
//!   then postcard), with every acknowledged execution counted;
//! - `E`: one execution: the session's row id (16 bytes), its number
//!   (u64 BE), the execution's record;
//! - `Z`, last: the trailer: sessions, executions (u64 BE each) and when
//!   the snapshot was taken (ms, i64 BE).
//!
//! Records keep the store's versioned record format, so a backup taken by
//! this release is read by later ones the way their data dirs are. A stream
//! without its trailer (a backup cut short) or with a frame failing its
//! checksum is refused whole, and a refused restore leaves nothing behind.
//!
//! # Consistency
//!
//! The caller takes a flush barrier first (everything acknowledged before
//! it is readable from the store); the snapshot then reads the store while
//! the server keeps serving. Each session is written with exactly the
//! executions its record counts, so a session and its executions always
//! agree; a change acknowledged after the barrier may or may not be in it.

use std::io::{self, Read, Write};
use std::path::Path;

use uuid::Uuid;

use super::executions::Unique;
use super::keys;
use super::record;
use super::sled::{Store, StoreError};
use crate::model::{Millis, Session, ToolExecution};

/// The first bytes of every backup.
pub const MAGIC: &[u8; 8] = b"ESBACKUP";
/// The format this release writes.
pub const FORMAT: u8 = 1;

const KIND_SESSION: u8 = b'S';
const KIND_EXECUTION: u8 = b'E';
const KIND_TRAILER: u8 = b'Z';
/// Larger frames are damage, not data (a session record is a few KiB).
const MAX_FRAME: usize = 16 << 20;

/// What a backup holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sessions.
    pub sessions: u64,
    /// Tool executions.
    pub executions: u64,
}

/// Why a backup could not be taken or loaded.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading or writing the stream failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The stream is not a backup this release reads, or is damaged or
    /// cut short.
    #[error("not a usable backup: {0}")]
    Invalid(String),
}

fn invalid(why: impl Into<String>) -> BackupError {
    BackupError::Invalid(why.into())
}

/// Writes every stored session (with the executions its record counts) to
/// `out`, then the trailer, telling `progress` the running counts after
/// each session. Blocking: run it off the async workers.
pub fn snapshot(
    store: &Store,
    out: &mut impl Write,
    taken_at: Millis,
    mut progress: impl FnMut(Counts),
) -> Result<Counts, BackupError> {
    let mut counts = Counts::default();
    out.write_all(MAGIC)?;
    out.write_all(&[FORMAT])?;
    for session in store.all_sessions() {
        let session = session?;
        write_frame(out, KIND_SESSION, &[&record::encode(&session)])?;
        counts.sessions += 1;
        let prefix = keys::executions_prefix(session.id);
        for item in Unique::new(store.scan_prefix(&prefix, false), false) {
            let (_, seq, value) = item?;
            // Only what the record counts: the session and its executions
            // stay in step even while the server appends more.
            if seq > session.tool_execution_count {
                break;
            }
            write_frame(
                out,
                KIND_EXECUTION,
                &[session.id.as_bytes(), &seq.to_be_bytes(), &value],
            )?;
            counts.executions += 1;
        }
        progress(counts);
    }
    write_frame(
        out,
        KIND_TRAILER,
        &[
            &counts.sessions.to_be_bytes(),
            &counts.executions.to_be_bytes(),
            &taken_at.to_be_bytes(),
        ],
    )?;
    out.flush()?;
    Ok(counts)
}

fn write_frame(out: &mut impl Write, kind: u8, parts: &[&[u8]]) -> io::Result<()> {
    let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind]);
    for part in parts {
        crc.update(part);
    }
    out.write_all(&(len as u32).to_be_bytes())?;
    out.write_all(&crc.finalize().to_be_bytes())?;
    out.write_all(&[kind])?;
    for part in parts {
        out.write_all(part)?;
    }
    Ok(())
}

/// One frame read back.
enum Frame {
    Session(Box<Session>),
    Execution(Uuid, u64, ToolExecution),
    Trailer(Counts),
}

/// Reads frames from a backup stream, checking each.
struct Frames<R> {
    input: R,
    buf: Vec<u8>,
}

impl<R: Read> Frames<R> {
    fn open(mut input: R) -> Result<Self, BackupError> {
        let mut head = [0u8; 9];
        input
            .read_exact(&mut head)
            .map_err(|_| invalid("too short to be a backup"))?;
        if &head[..8] != MAGIC {
            return Err(invalid("it does not start like a backup (ESBACKUP)"));
        }
        if head[8] != FORMAT {
            return Err(invalid(format!(
                "backup format {} (this release reads {FORMAT})",
                head[8]
            )));
        }
        Ok(Frames {
            input,
            buf: Vec::new(),
        })
    }

    /// The next frame; `None` at a clean end of stream (before a frame).
    fn next(&mut self) -> Result<Option<Frame>, BackupError> {
        let mut head = [0u8; 8];
        match read_full(&mut self.input, &mut head)? {
            0 => return Ok(None),
            8 => {}
            _ => return Err(invalid("cut short inside a frame header")),
        }
        let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_be_bytes(head[4..].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_FRAME {
            return Err(invalid(format!("a frame of {len} bytes")));
        }
        self.buf.resize(len, 0);
        if read_full(&mut self.input, &mut self.buf)? != len {
            return Err(invalid("cut short inside a frame"));
        }
        if crc32fast::hash(&self.buf) != crc {
            return Err(invalid("a frame fails its checksum"));
        }
        let (&kind, payload) = self.buf.split_first().expect("len >= 1");
        let damaged = |e: record::RecordError| invalid(format!("a record does not decode: {e}"));
        Ok(Some(match kind {
            KIND_SESSION => {
                Frame::Session(Box::new(record::decode_session(payload).map_err(damaged)?))
            }
            KIND_EXECUTION if payload.len() > 24 => {
                let row = Uuid::from_slice(&payload[..16]).expect("16 bytes");
                let seq = u64::from_be_bytes(payload[16..24].try_into().expect("8 bytes"));
                Frame::Execution(row, seq, record::decode(&payload[24..]).map_err(damaged)?)
            }
            KIND_TRAILER if payload.len() == 24 => Frame::Trailer(Counts {
                sessions: u64::from_be_bytes(payload[..8].try_into().expect("8 bytes")),
                executions: u64::from_be_bytes(payload[8..16].try_into().expect("8 bytes")),
            }),
            other => return Err(invalid(format!("a frame of unknown kind {other}"))),
        }))
    }
}

/// Fills `buf` as far as the stream goes; answers how much was read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Checks a whole backup without loading it: every frame, the trailer, and
/// that the trailer's counts are what the stream holds; `progress` hears
/// the running counts.
pub fn verify(input: impl Read, progress: impl FnMut(Counts)) -> Result<Counts, BackupError> {
    load(input, |_, _| Ok(()), progress)
}

/// A session read, with the executions read after it so far.
type Pending = (Box<Session>, Vec<(u64, ToolExecution)>);

/// Reads a backup, handing each session with its executions to `put`, and
/// `progress` the running counts; the trailer must match what was read.
fn load(
    input: impl Read,
    mut put: impl FnMut(&Session, &[(u64, ToolExecution)]) -> Result<(), BackupError>,
    mut progress: impl FnMut(Counts),
) -> Result<Counts, BackupError> {
    let mut frames = Frames::open(input)?;
    let mut counts = Counts::default();
    let mut pending: Option<Pending> = None;
    let mut flush =
        |pending: &mut Option<Pending>, counts: &mut Counts| -> Result<(), BackupError> {
            if let Some((session, executions)) = pending.take() {
                put(&session, &executions)?;
                counts.sessions += 1;
                counts.executions += executions.len() as u64;
                progress(*counts);
            }
            Ok(())
        };
    loop {
        match frames.next()? {
            None => return Err(invalid("cut short: no trailer")),
            Some(Frame::Session(session)) => {
                flush(&mut pending, &mut counts)?;
                pending = Some((session, Vec::new()));
            }
            Some(Frame::Execution(row, seq, execution)) => match &mut pending {
                Some((session, executions)) if session.id == row => {
                    executions.push((seq, execution));
                }
                _ => return Err(invalid("an execution outside its session")),
            },
            Some(Frame::Trailer(expected)) => {
                flush(&mut pending, &mut counts)?;
                if expected != counts {
                    return Err(invalid(format!(
                        "the trailer counts {} sessions and {} executions, the stream holds {} and {}",
                        expected.sessions, expected.executions, counts.sessions, counts.executions
                    )));
                }
                if frames.next()?.is_some() {
                    return Err(invalid("frames after the trailer"));
                }
                return Ok(counts);
            }
        }
    }
}

/// Whether `dir` may be restored into: it does not exist, or is an empty
/// directory.
pub fn is_empty_dir(dir: &Path) -> io::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e),
    }
}

/// Loads the backup `input` into `store` (opened on an empty data dir):
/// checks the whole stream first (`verified` says it was, e.g. by
/// [`verify`] on the same file), then writes every session, its index
/// entries and executions straight to sled and syncs once.
pub fn restore(
    store: &Store,
    input: impl Read,
    progress: impl FnMut(Counts),
) -> Result<Counts, BackupError> {
    let counts = load(
        input,
        |session, executions| Ok(store.put_restored(session, executions)?),
        progress,
    )?;
    store.sync()?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::session::tests::{execution_at as execution, session_at};
    use crate::model::Status;

    fn backup_of(sessions: &[(Session, u64)]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20, false).unwrap().store;
        for (session, executions) in sessions {
            let executions: Vec<_> = (1..=*executions)
                .map(|seq| (seq, execution(seq as i64)))
                .collect();
            store.put_restored(session, &executions).unwrap();
        }
        let mut out = Vec::new();
        snapshot(&store, &mut out, 42, |_| {}).unwrap();
        out
    }

    #[test]
    fn executions_folded_into_chunks_are_backed_up_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20, false).unwrap().store;
        let mut live = session_at(1_000, 60, 600);
        live.tool_execution_count = 5;
        let mut ops = vec![crate::persist::WriteOp::put_session(&live)];
        for seq in 1..=6u64 {
            let mut execution = crate::model::session::tests::execution_at(2_000);
            execution.duration_ms = seq;
            ops.push(crate::persist::WriteOp::put_execution(
                live.id, seq, &execution,
            ));
        }
        store.apply_through_overlay(1, &ops);
        store.checkpoint(1).unwrap();
        let mut bytes = Vec::new();
        snapshot(&store, &mut bytes, 42, |_| {}).unwrap();
        // The record counts five; the sixth, stored after it, is replayed
        // onto it and goes along.
        assert_eq!(
            verify(&bytes[..], |_| {}).unwrap(),
            Counts {
                sessions: 1,
                executions: 6
            }
        );
        let dir = tempfile::tempdir().unwrap();
        let restored = Store::open(dir.path(), 1 << 20, false).unwrap().store;
        restore(&restored, &bytes[..], |_| {}).unwrap();
        assert_eq!(restored.execution_durations(live.id), [6, 5, 4, 3, 2, 1]);
        let back = restored
            .session(live.tenant_id, &live.session_id)
            .unwrap()
            .unwrap();
        assert_eq!(back.tool_execution_count, 6);
    }

    #[test]
    fn a_backup_round_trips_and_a_damaged_or_cut_one_is_refused() {
        let mut live = session_at(1_000, 60, 600);
        live.tool_execution_count = 3;
        let mut ended = session_at(2_000, 60, 600);
        ended.session_id = "ended".into();
        ended.id = Uuid::now_v7();
        ended.finish(Status::Terminated, "done", 3_000);
        let bytes = backup_of(&[(live.clone(), 3), (ended.clone(), 0)]);
        assert_eq!(
            verify(&bytes[..], |_| {}).unwrap(),
            Counts {
                sessions: 2,
                executions: 3
            }
        );
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20, false).unwrap().store;
        restore(&store, &bytes[..], |_| {}).unwrap();
        assert_eq!(
            store.session(live.tenant_id, &live.session_id).unwrap(),
            Some(live.clone())
        );
        assert_eq!(
            store.session(ended.tenant_id, "ended").unwrap(),
            Some(ended)
        );
        assert_eq!(store.executions(live.id, 10).unwrap().len(), 3);

        // Cut anywhere, or one byte flipped anywhere: refused.
        for cut in [0, 5, 9, 20, bytes.len() / 2, bytes.len() - 1] {
            assert!(verify(&bytes[..cut], |_| {}).is_err(), "cut at {cut}");
        }
        for at in [3, 12, bytes.len() / 2, bytes.len() - 3] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            assert!(verify(&bad[..], |_| {}).is_err(), "flipped at {at}");
        }
        let mut extra = bytes.clone();
        extra.extend_from_slice(&bytes[9..]);
        assert!(
            verify(&extra[..], |_| {}).is_err(),
            "frames after the trailer"
        );
    }

    #[test]
    fn a_session_is_written_with_the_executions_its_record_counts() {
        let mut behind = session_at(1_000, 60, 600);
        behind.tool_execution_count = 2;
        // Four stored: the record's count (after replay) decides.
        let bytes = backup_of(&[(behind, 4)]);
        let counts = verify(&bytes[..], |_| {}).unwrap();
        assert_eq!(counts.sessions, 1);
        assert_eq!(counts.executions, 4, "the replayed record counts all four");
    }
}
