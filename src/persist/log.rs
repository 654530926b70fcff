//! The write-ahead log: every group commit is one appended, checksummed
//! record and one `fdatasync`.
//!
//! A change is acknowledged once its batch record is in the log; the sled
//! trees are brought up to date later by the [checkpointer](super::checkpoint),
//! off the acknowledgement path. The log is also the PostgreSQL outbox: the
//! [shipper](super::shipper) reads the same records, so a change is written
//! once, not once for sled and once more for PostgreSQL.
//!
//! # Files
//!
//! `data_dir/wal/<first seq, 20 digits>.log`, one segment per file. A new
//! segment starts once the current one passes [`SEGMENT_BYTES`]; a segment
//! is deleted once every record in it is both checkpointed into sled and
//! (with the PostgreSQL tier) shipped.
//!
//! The writer keeps up to [`PREALLOCATE`] bytes of zeros written ahead of
//! its last record. An append that grows a file makes `fdatasync` write the
//! inode (the new size) as well as the data; into space already written it
//! writes the data alone. Once per MiB the group commit that extends the
//! zeros pays for writing them (each log byte is written twice). Measured
//! on the development machine's ext4 (2,000 appends of 4 KB, three runs):
//! 179–256 µs and 45–63 µs of CPU per `fdatasync` against 288–395 µs and
//! 74–87 µs. Zeros are no record (they fail the magic), so readers stop
//! there as at the end of a file; a start leaves them to the writer (a torn
//! record before them is cut off, zeros and all).
//!
//! # Record
//!
//! ```text
//! magic "ESW1" (4) | body length (4, LE) | crc32 of body (4, LE) | body
//! body: seq (8) | appended_at ms (8) | ops…
//! op:   'P' key_len (4) key value_len (4) value     put
//!       'R' key_len (4) key                         remove
//!       'A' value_len (4) value                     outbox-only entry (audit rows)
//! ```
//!
//! Records are numbered without gaps. Sled remembers the last record it
//! holds (`wal_through`), so recovery knows exactly which records to replay
//! and can tell damage from a crash: a record that fails its checksum at the
//! very end of the log is a torn write (nothing acknowledged it), but a bad
//! record followed by good ones, a missing segment, or a log that starts
//! after what sled holds means acknowledged changes are gone.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::model::Millis;

/// A segment is closed once it is larger than this.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Zeros written ahead of the last record (see the module docs).
pub const PREALLOCATE: u64 = 1 << 20;
/// Zeros for [`LogWriter::preallocate`].
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
/// Longest record accepted when reading (a damaged length must not make
/// recovery allocate gigabytes).
const MAX_RECORD: u32 = 1 << 30;
const MAGIC: &[u8; 4] = b"ESW1";
const HEADER: usize = 12;
const BODY_FIXED: usize = 16;

const OP_PUT: u8 = b'P';
const OP_REMOVE: u8 = b'R';
const OP_ENTRY: u8 = b'A';

/// One change inside a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOp<'a> {
    /// Insert or overwrite `key`.
    Put(&'a [u8], &'a [u8]),
    /// Delete `key`.
    Remove(&'a [u8]),
    /// An outbox entry that changes nothing locally (an audit row).
    Entry(&'a [u8]),
}

/// Builds one record's body in place, header space reserved up front so
/// the finished record is written with one call and no copy.
#[derive(Debug)]
pub struct RecordBuilder {
    buf: Vec<u8>,
    ops: usize,
}

impl Default for RecordBuilder {
    fn default() -> Self {
        let mut buf = Vec::with_capacity(4096);
        buf.resize(HEADER + BODY_FIXED, 0);
        RecordBuilder { buf, ops: 0 }
    }
}

impl RecordBuilder {
    /// Adds a put.
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        self.buf.push(OP_PUT);
        self.bytes(key);
        self.bytes(value);
        self.ops += 1;
    }

    /// Adds a removal.
    pub fn remove(&mut self, key: &[u8]) {
        self.buf.push(OP_REMOVE);
        self.bytes(key);
        self.ops += 1;
    }

    /// Adds an outbox-only entry.
    pub fn entry(&mut self, value: &[u8]) {
        self.buf.push(OP_ENTRY);
        self.bytes(value);
        self.ops += 1;
    }

    /// Whether no op was added.
    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }

    fn bytes(&mut self, bytes: &[u8]) {
        // Keys and records are bounded far below 4 GiB (64 KiB bodies).
        self.buf
            .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(bytes);
    }

    /// Fills in the header; the record is `self.bytes()` from then on.
    fn seal(&mut self, seq: u64, at: Millis) {
        let body_len = (self.buf.len() - HEADER) as u32;
        self.buf[HEADER..HEADER + 8].copy_from_slice(&seq.to_le_bytes());
        self.buf[HEADER + 8..HEADER + 16].copy_from_slice(&at.to_le_bytes());
        let crc = crc32fast::hash(&self.buf[HEADER..]);
        self.buf[..4].copy_from_slice(MAGIC);
        self.buf[4..8].copy_from_slice(&body_len.to_le_bytes());
        self.buf[8..12].copy_from_slice(&crc.to_le_bytes());
    }
}

/// A record read back from the log.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its number.
    pub seq: u64,
    /// When it was appended (Unix ms).
    pub at: Millis,
    body: Vec<u8>,
}

impl Record {
    /// Its ops, in the order they were added.
    pub fn ops(&self) -> impl Iterator<Item = LogOp<'_>> {
        let mut rest = &self.body[BODY_FIXED..];
        std::iter::from_fn(move || {
            let (&tag, tail) = rest.split_first()?;
            let (a, tail) = take(tail)?;
            let (op, tail) = match tag {
                OP_PUT => {
                    let (b, tail) = take(tail)?;
                    (LogOp::Put(a, b), tail)
                }
                OP_REMOVE => (LogOp::Remove(a), tail),
                OP_ENTRY => (LogOp::Entry(a), tail),
                _ => return None,
            };
            rest = tail;
            Some(op)
        })
    }

    /// Size on disk.
    pub fn len(&self) -> u64 {
        (HEADER + self.body.len()) as u64
    }

    /// Whether the record holds no op.
    pub fn is_empty(&self) -> bool {
        self.body.len() == BODY_FIXED
    }
}

fn take(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let rest = &bytes[4..];
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// What reading at an offset found.
enum ReadAt {
    Record(Record),
    /// Nothing valid starts here (end of file, zeros, a torn or damaged record).
    Invalid,
}

fn read_at(file: &File, offset: u64, file_len: u64) -> io::Result<ReadAt> {
    if offset + HEADER as u64 > file_len {
        return Ok(ReadAt::Invalid);
    }
    let mut header = [0u8; HEADER];
    file.read_exact_at(&mut header, offset)?;
    if &header[..4] != MAGIC {
        return Ok(ReadAt::Invalid);
    }
    let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if (len as usize) < BODY_FIXED
        || len > MAX_RECORD
        || offset + HEADER as u64 + len as u64 > file_len
    {
        return Ok(ReadAt::Invalid);
    }
    let mut body = vec![0u8; len as usize];
    file.read_exact_at(&mut body, offset + HEADER as u64)?;
    if crc32fast::hash(&body) != crc {
        return Ok(ReadAt::Invalid);
    }
    let word = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
    Ok(ReadAt::Record(Record {
        seq: word(0),
        at: word(8) as Millis,
        body,
    }))
}

/// Damage found in the log: acknowledged changes cannot all be read back.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogDamage {
    /// A record that fails its checks with valid records after it.
    #[error(
        "log segment {segment} has a damaged record at byte {offset} followed by valid records"
    )]
    BadRecord {
        /// The segment file.
        segment: String,
        /// Where the damage starts.
        offset: u64,
    },
    /// sled lost changes it had checkpointed.
    #[error("{0}")]
    Sled(String),
    /// Records are missing between two points.
    #[error("log records {from} to {to} are missing{where_}")]
    Gap {
        /// First missing record.
        from: u64,
        /// Last missing record.
        to: u64,
        /// Where it was noticed.
        where_: String,
    },
}

/// Everything recovery needs from the log.
#[derive(Debug, Default)]
pub struct Replay {
    /// Records after `after`, in order.
    pub records: Vec<Record>,
    /// The number the next record gets.
    pub next_seq: u64,
    /// Damage found (only returned with `salvage`; otherwise an error).
    pub damage: Vec<LogDamage>,
    /// Ops in records that could not be read (salvage only).
    pub lost_ops: usize,
    /// The first record number the log has a segment for.
    pub first_seq: Option<u64>,
}

/// Segments and the durable position, shared by the writer, the reader
/// (shipper) and the checkpointer.
#[derive(Debug)]
pub struct LogShared {
    dir: PathBuf,
    /// First record number of each segment, oldest first; the last one is
    /// being written.
    segments: Mutex<Vec<u64>>,
    /// Every record numbered up to this is on disk.
    durable: AtomicU64,
}

impl LogShared {
    /// Every record numbered up to this is on disk.
    pub fn durable_through(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    fn segments(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        // Plain pushes and removals: a panic cannot leave it half-changed.
        self.segments
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn path(&self, first: u64) -> PathBuf {
        segment_path(&self.dir, first)
    }

    /// Deletes the segments whose every record is numbered at most
    /// `through` (never the one being written). Answers how many went.
    pub fn delete_through(&self, through: u64) -> io::Result<usize> {
        let doomed: Vec<u64> = {
            let segments = self.segments();
            segments
                .windows(2)
                .take_while(|pair| pair[1] - 1 <= through)
                .map(|pair| pair[0])
                .collect()
        };
        for first in &doomed {
            match fs::remove_file(self.path(*first)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if !doomed.is_empty() {
            self.segments().retain(|first| !doomed.contains(first));
            sync_dir(&self.dir)?;
        }
        Ok(doomed.len())
    }
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.log"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn open_segment(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

/// Appends records; owned by the flusher thread.
#[derive(Debug)]
pub struct LogWriter {
    shared: std::sync::Arc<LogShared>,
    file: File,
    offset: u64,
    /// The file is written (records or zeros) up to here.
    allocated: u64,
    next_seq: u64,
}

impl LogWriter {
    /// Appends `record` as the next record and fsyncs it. On failure
    /// nothing of it counts: the file is cut back (best effort) and the next
    /// record is written at the same place with the same number.
    pub fn append(&mut self, record: &mut RecordBuilder, at: Millis) -> io::Result<u64> {
        if self.offset >= SEGMENT_BYTES {
            self.rotate()?;
        }
        let seq = self.next_seq;
        record.seal(seq, at);
        let end = self.offset + record.buf.len() as u64;
        if end > self.allocated {
            self.preallocate(end + PREALLOCATE);
        }
        let written = self
            .file
            .write_all_at(&record.buf, self.offset)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Best effort, and synced: a refused record must not turn up
            // after a crash.
            let _ = self
                .file
                .set_len(self.offset)
                .and_then(|()| self.file.sync_all());
            self.allocated = self.offset;
            return Err(e);
        }
        self.offset = end;
        self.allocated = self.allocated.max(end);
        self.next_seq += 1;
        self.shared.durable.store(seq, Ordering::Release);
        Ok(seq)
    }

    /// Writes zeros from the allocated end up to `to`; the `fdatasync` of
    /// the record that follows makes them durable along with it. On a full
    /// disk it writes what fits and leaves the rest to plain appends (the
    /// record may still fit; if not, its own write fails).
    fn preallocate(&mut self, to: u64) {
        while self.allocated < to {
            let n = ZEROS.len().min((to - self.allocated) as usize);
            if self.file.write_all_at(&ZEROS[..n], self.allocated).is_err() {
                return;
            }
            self.allocated += n as u64;
        }
    }

    fn rotate(&mut self) -> io::Result<()> {
        let path = self.shared.path(self.next_seq);
        let file = open_segment(&path)?;
        file.set_len(0)?;
        sync_dir(&self.shared.dir)?;
        self.file = file;
        self.offset = 0;
        self.allocated = 0;
        self.shared.segments().push(self.next_seq);
        Ok(())
    }

    /// The number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The shared half (segments, durable position).
    pub fn shared(&self) -> &std::sync::Arc<LogShared> {
        &self.shared
    }
}

/// Opens the log in `dir`, checks it against `after` (the last record
/// checkpointed, when known) and reads every record after it. Damage is an
/// error unless `salvage`, in which case what can be read is returned with
/// the damage listed. Nothing is written before the whole log has been
/// checked; then a torn last record is cut off.
pub fn open(dir: &Path, after: Option<u64>, salvage: bool) -> io::Result<(LogWriter, Replay)> {
    fs::create_dir_all(dir)?;
    let mut firsts: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name();
            let name = name.to_str()?;
            name.strip_suffix(".log")?.parse().ok()
        })
        .collect();
    firsts.sort_unstable();
    let mut replay = Replay::default();
    let fail = |damage: LogDamage, replay: &mut Replay| -> io::Result<()> {
        if salvage {
            replay.damage.push(damage);
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::InvalidData, damage))
        }
    };
    let known = after.is_some();
    let after = after.unwrap_or(0);
    replay.first_seq = firsts.first().copied();
    let mut expected = after + 1;
    // The highest record number seen anywhere, damaged parts included.
    let mut highest = after;
    // Where the last segment's valid records end (the writer goes on there)
    // and how far it is written.
    let mut tail = 0;
    let mut allocated = 0;
    for (i, &first) in firsts.iter().enumerate() {
        let path = segment_path(dir, first);
        if first > expected && i == 0 && !known {
            // Where the checkpoint is is not known yet: the caller checks.
            expected = first;
        } else if first > expected {
            let where_ = if i == 0 {
                " between the last checkpoint and the log".to_owned()
            } else {
                format!(" before segment {}", path.display())
            };
            fail(
                LogDamage::Gap {
                    from: expected,
                    to: first - 1,
                    where_,
                },
                &mut replay,
            )?;
            expected = first;
        }
        let file = File::open(&path)?;
        let len = file.metadata()?.len();
        let mut offset = 0;
        let mut seq = first;
        while let ReadAt::Record(record) = read_at(&file, offset, len)? {
            if record.seq != seq {
                break;
            }
            offset += record.len();
            seq += 1;
            highest = highest.max(record.seq);
            if record.seq >= expected {
                expected = record.seq + 1;
                replay.records.push(record);
            }
        }
        // Anything after the last valid record must be zeros written ahead
        // or a torn write: no valid record may follow it.
        let mut only_zeros = true;
        if offset < len {
            let after_bad = valid_records_after(&file, offset, len, seq)?;
            only_zeros = after_bad.only_zeros;
            if after_bad.records > 0 {
                replay.lost_ops += after_bad.ops;
                highest = highest.max(after_bad.highest);
                fail(
                    LogDamage::BadRecord {
                        segment: path.display().to_string(),
                        offset,
                    },
                    &mut replay,
                )?;
            }
        }
        if i + 1 == firsts.len() {
            tail = offset;
            allocated = len;
            // Zeros written ahead stay for the writer; a torn record is cut
            // off (rewriting it would not do: it may be longer than the
            // next record and leave garbage behind it).
            if !only_zeros {
                let file = open_segment(&path)?;
                file.set_len(offset)?;
                file.sync_all()?;
                allocated = offset;
            }
        }
    }
    replay.next_seq = expected.max(after + 1);
    let file = match firsts.last() {
        // The last segment goes on, unless damage was salvaged: then a new
        // segment starts past every number seen, so nothing old is ever
        // read as new (the caller checkpoints what was read and the old
        // segments go).
        Some(&last) if replay.damage.is_empty() => open_segment(&segment_path(dir, last))?,
        _ => {
            replay.next_seq = replay.next_seq.max(highest + 1);
            tail = 0;
            allocated = 0;
            let file = open_segment(&segment_path(dir, replay.next_seq))?;
            file.set_len(0)?;
            sync_dir(dir)?;
            firsts.push(replay.next_seq);
            firsts.dedup();
            file
        }
    };
    let shared = std::sync::Arc::new(LogShared {
        dir: dir.to_owned(),
        segments: Mutex::new(firsts),
        durable: AtomicU64::new(replay.next_seq - 1),
    });
    let writer = LogWriter {
        shared,
        file,
        offset: tail,
        allocated,
        next_seq: replay.next_seq,
    };
    Ok((writer, replay))
}

/// What follows a segment's last valid record.
#[derive(Default)]
struct Found {
    /// Nothing but zeros (written ahead) follows.
    only_zeros: bool,
    records: usize,
    ops: usize,
    highest: u64,
}

/// How far past the bad record's number a later record may be numbered and
/// still count as one the log wrote (damage may span several records).
const LATER_RECORDS: u64 = 1 << 16;

/// Counts the valid records anywhere after `offset` (scanning for the
/// magic) that continue the log's numbering from `seq`, the number the bad
/// record would have had. Only those: a tool argument that happens to hold
/// a well-formed record inside a torn write must not pass for one.
fn valid_records_after(file: &File, offset: u64, len: u64, seq: u64) -> io::Result<Found> {
    let mut bytes = vec![0u8; (len - offset) as usize];
    file.read_exact_at(&mut bytes, offset)?;
    let mut found = Found::default();
    if bytes.iter().all(|b| *b == 0) {
        found.only_zeros = true;
        return Ok(found);
    }
    let mut at = 1;
    while at + HEADER <= bytes.len() {
        if &bytes[at..at + 4] == MAGIC {
            if let ReadAt::Record(record) = read_at(file, offset + at as u64, len)? {
                if !(seq..seq + LATER_RECORDS).contains(&record.seq) {
                    at += 1;
                    continue;
                }
                found.records += 1;
                found.ops += record.ops().count();
                found.highest = found.highest.max(record.seq);
                at += record.len() as usize;
                continue;
            }
        }
        at += 1;
    }
    Ok(found)
}

/// Reads records in order from a position, for the shipper.
#[derive(Debug)]
pub struct LogReader {
    shared: std::sync::Arc<LogShared>,
    /// The segment being read (its first record number) and its file.
    segment: Option<(u64, File)>,
    offset: u64,
    /// The number of the next record to read.
    next: u64,
}

impl LogReader {
    /// A reader that starts at record `next` (or the oldest one on disk,
    /// if that is later).
    pub fn at(shared: std::sync::Arc<LogShared>, next: u64) -> Self {
        LogReader {
            shared,
            segment: None,
            offset: 0,
            next,
        }
    }

    /// The number of the next record it reads.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Goes back (or forward) to record `next`.
    pub fn seek(&mut self, next: u64) {
        self.segment = None;
        self.offset = 0;
        self.next = next;
    }

    /// The next durable record, if any.
    pub fn next_record(&mut self) -> io::Result<Option<Record>> {
        let durable = self.shared.durable_through();
        loop {
            if self.segment.is_none() {
                let segments = self.shared.segments().clone();
                // The segment holding `next`, or the oldest one.
                let Some(first) = segments
                    .iter()
                    .rev()
                    .find(|first| **first <= self.next.max(1))
                    .or(segments.first())
                    .copied()
                else {
                    return Ok(None);
                };
                // Opened and positioned before it is kept: an error on the
                // way leaves no half-positioned segment behind.
                let file = File::open(self.shared.path(first))?;
                let next = self.next.max(first);
                let len = file.metadata()?.len();
                // Skip to `next` within the segment.
                let (mut seq, mut offset) = (first, 0);
                while seq < next {
                    match read_at(&file, offset, len)? {
                        ReadAt::Record(record) => {
                            offset += record.len();
                            seq = record.seq + 1;
                        }
                        ReadAt::Invalid => break,
                    }
                }
                self.segment = Some((first, file));
                self.offset = offset;
                self.next = next;
            }
            let (first, file) = self.segment.as_ref().expect("opened above");
            let len = file.metadata()?.len();
            match read_at(file, self.offset, len)? {
                ReadAt::Record(record) if record.seq == self.next && record.seq <= durable => {
                    self.offset += record.len();
                    self.next += 1;
                    return Ok(Some(record));
                }
                _ => {
                    // The end of this segment: move on if a later one exists.
                    let later = self
                        .shared
                        .segments()
                        .iter()
                        .any(|f| *f > *first && *f <= self.next);
                    if later {
                        self.segment = None;
                        continue;
                    }
                    return Ok(None);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ops: &[(&[u8], &[u8])]) -> RecordBuilder {
        let mut builder = RecordBuilder::default();
        for (k, v) in ops {
            builder.put(k, v);
        }
        builder
    }

    #[test]
    fn records_come_back_in_order_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, replay) = open(dir.path(), Some(0), false).unwrap();
        assert!(replay.records.is_empty());
        for i in 0..5u8 {
            let mut r = record(&[(&[i], b"v")]);
            r.remove(b"gone");
            r.entry(b"audit");
            assert_eq!(writer.append(&mut r, 7).unwrap(), i as u64 + 1);
        }
        drop(writer);
        let (writer, replay) = open(dir.path(), Some(2), false).unwrap();
        assert_eq!(writer.next_seq(), 6);
        let seqs: Vec<u64> = replay.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        let ops: Vec<LogOp> = replay.records[0].ops().collect();
        assert_eq!(
            ops,
            [
                LogOp::Put(&[2], b"v"),
                LogOp::Remove(b"gone"),
                LogOp::Entry(b"audit")
            ]
        );
    }

    #[test]
    fn a_torn_tail_is_cut_but_damage_in_the_middle_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, _) = open(dir.path(), Some(0), false).unwrap();
        for i in 0..4u8 {
            writer.append(&mut record(&[(&[i], &[9; 100])]), 0).unwrap();
        }
        let len = writer.offset;
        drop(writer);
        let path = segment_path(dir.path(), 1);
        // A torn last write: its last bytes never made it.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 10).unwrap();
        let (writer, replay) = open(dir.path(), Some(0), false).unwrap();
        assert_eq!(replay.records.len(), 3);
        assert_eq!(writer.next_seq(), 4);
        drop(writer);
        // A flipped byte in the first record, with good ones after it.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff], 40).unwrap();
        let error = open(dir.path(), Some(0), false).unwrap_err();
        assert!(error.to_string().contains("damaged record"), "{error}");
        let (_, replay) = open(dir.path(), Some(0), true).unwrap();
        assert!(replay.records.is_empty());
        assert_eq!(replay.damage.len(), 1);
        assert_eq!(replay.lost_ops, 2);
    }

    #[test]
    fn zeros_are_written_ahead_and_read_as_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 1);
        let (mut writer, _) = open(dir.path(), Some(0), false).unwrap();
        let mut reader = LogReader::at(writer.shared().clone(), 0);
        writer.append(&mut record(&[(b"a", b"1")]), 0).unwrap();
        let written = writer.offset;
        assert_eq!(fs::metadata(&path).unwrap().len(), written + PREALLOCATE);
        // The next records go into the zeros, which readers take for the end.
        writer.append(&mut record(&[(b"b", b"2")]), 0).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), written + PREALLOCATE);
        assert_eq!(reader.next_record().unwrap().unwrap().seq, 1);
        assert_eq!(reader.next_record().unwrap().unwrap().seq, 2);
        assert!(reader.next_record().unwrap().is_none());
        let end = writer.offset;
        drop(writer);
        // A start reads both, changes nothing and goes on into the zeros.
        let before = fs::read(&path).unwrap();
        let (mut writer, replay) = open(dir.path(), Some(0), false).unwrap();
        assert_eq!(replay.records.len(), 2);
        assert_eq!(fs::read(&path).unwrap(), before);
        assert_eq!(
            (writer.offset, writer.allocated),
            (end, written + PREALLOCATE)
        );
        writer.append(&mut record(&[(b"c", b"3")]), 0).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), written + PREALLOCATE);
        drop(writer);
        let (_, replay) = open(dir.path(), Some(0), false).unwrap();
        let seqs: Vec<u64> = replay.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[test]
    fn a_torn_record_before_the_zeros_is_cut_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 1);
        let (mut writer, _) = open(dir.path(), Some(0), false).unwrap();
        for i in 0..3u8 {
            writer.append(&mut record(&[(&[i], &[9; 100])]), 0).unwrap();
        }
        let (start, end) = (writer.offset, {
            writer.append(&mut record(&[(b"x", &[7; 100])]), 0).unwrap();
            writer.offset
        });
        drop(writer);
        // What a crash leaves: the last record's head reached the disk, its
        // tail did not (zeros, as written ahead), and the zeros follow.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0; 40], end - 40).unwrap();
        let (mut writer, replay) = open(dir.path(), Some(0), false).unwrap();
        assert_eq!(replay.records.len(), 3, "the torn one is not replayed");
        assert!(replay.damage.is_empty(), "a torn tail is not damage");
        assert_eq!(fs::metadata(&path).unwrap().len(), start, "cut off");
        assert_eq!(writer.append(&mut record(&[(b"y", b"1")]), 0).unwrap(), 4);
        drop(writer);
        let (_, replay) = open(dir.path(), Some(0), false).unwrap();
        let seqs: Vec<u64> = replay.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
    }

    #[test]
    fn a_log_that_starts_after_the_checkpoint_is_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        drop(open_segment(&segment_path(dir.path(), 50)).unwrap());
        let error = open(dir.path(), Some(10), false).unwrap_err();
        assert!(error.to_string().contains("11 to 49"), "{error}");
    }

    #[test]
    fn the_reader_follows_durable_records_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut writer, _) = open(dir.path(), Some(0), false).unwrap();
        let mut reader = LogReader::at(writer.shared().clone(), 0);
        assert!(reader.next_record().unwrap().is_none());
        writer.append(&mut record(&[(b"a", b"1")]), 0).unwrap();
        writer.offset = SEGMENT_BYTES; // force a new segment
        writer.append(&mut record(&[(b"b", b"2")]), 0).unwrap();
        assert_eq!(reader.next_record().unwrap().unwrap().seq, 1);
        assert_eq!(reader.next_record().unwrap().unwrap().seq, 2);
        assert!(reader.next_record().unwrap().is_none());
        writer.append(&mut record(&[(b"c", b"3")]), 0).unwrap();
        assert_eq!(reader.next_record().unwrap().unwrap().seq, 3);
        assert_eq!(writer.shared().delete_through(1).unwrap(), 1);
        assert_eq!(writer.shared().segments().clone(), [2]);
    }
}
