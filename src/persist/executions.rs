//! How a session's tool executions are stored in sled.
//!
//! The log holds each execution under its own key ([`keys::execution`]:
//! the session's row id, then its number), and so does the overlay until a
//! checkpoint. The checkpointer folds a session's consecutive executions
//! into **chunks**: one value, under the key of its first execution, that
//! holds up to [`CHUNK_MAX`] of them. One sled insert then stores what was
//! one insert per execution (sled's inserts were most of the checkpoint's
//! CPU, and the checkpoint a tenth of the machine under a load of tool
//! calls); a checkpoint extends a session's last chunk while it has room.
//!
//! A stored value is either one execution's record (a format-version byte,
//! then postcard; what the log writes and what data dirs of earlier
//! releases hold) or a chunk: the byte [`CHUNK`], then each record with
//! its length before it (u32, little-endian). [`record::decode`] refuses a
//! chunk (format 3 is not a record), so a reader that does not expect one
//! fails instead of misreading it.
//!
//! While a checkpoint runs, an execution can be both in a chunk in sled
//! and alone in the overlay's frozen layer; [`Unique`] yields each number
//! once.

use sled::IVec;
use uuid::Uuid;

use super::keys;
use super::record::{RecordError, FORMAT_V1, FORMAT_V2};
use super::sled::StoreError;

/// First byte of a chunk.
pub const CHUNK: u8 = 3;
/// Most executions in one chunk: a chunk is rewritten whole when a
/// checkpoint extends it, so this bounds that copy.
pub const CHUNK_MAX: usize = 64;

/// The records in a stored value whose key names execution `first`, with
/// their numbers.
pub fn records(first: u64, value: &[u8]) -> Result<Vec<(u64, &[u8])>, RecordError> {
    match value.split_first() {
        None => Err(RecordError::Empty),
        Some((&CHUNK, mut rest)) => {
            let mut out = Vec::new();
            while !rest.is_empty() {
                let (len, tail) = rest.split_first_chunk::<4>().ok_or(RecordError::Chunk)?;
                let len = u32::from_le_bytes(*len) as usize;
                let record = tail.get(..len).ok_or(RecordError::Chunk)?;
                out.push((first + out.len() as u64, record));
                rest = &tail[len..];
            }
            if out.is_empty() {
                return Err(RecordError::Chunk);
            }
            Ok(out)
        }
        Some((&(FORMAT_V1 | FORMAT_V2), _)) => Ok(vec![(first, value)]),
        Some((&other, _)) => Err(RecordError::UnknownFormat(other)),
    }
}

/// How many executions a stored value holds.
pub fn count(value: &[u8]) -> Result<usize, RecordError> {
    match value.first() {
        Some(&CHUNK) => records(0, value).map(|r| r.len()),
        Some(_) => Ok(1),
        None => Err(RecordError::Empty),
    }
}

/// Builds the values a checkpoint writes for one session's run of
/// consecutive executions.
pub struct Chunk {
    first: u64,
    count: usize,
    bytes: Vec<u8>,
}

impl Chunk {
    /// A new chunk whose first execution is number `first`.
    pub fn new(first: u64) -> Self {
        Chunk {
            first,
            count: 0,
            bytes: vec![CHUNK],
        }
    }

    /// The stored value under `first`'s key, to extend, when it ends right
    /// before `next` and has room; `None` when a new chunk must start.
    pub fn extending(first: u64, value: &[u8], next: u64) -> Result<Option<Self>, RecordError> {
        let held = records(first, value)?;
        if first + held.len() as u64 != next || held.len() >= CHUNK_MAX {
            return Ok(None);
        }
        let mut chunk = Chunk::new(first);
        for (_, record) in held {
            chunk.push(record);
        }
        Ok(Some(chunk))
    }

    /// Adds the next execution's record.
    pub fn push(&mut self, record: &[u8]) {
        let len = u32::try_from(record.len()).expect("an execution record is under 4 GiB");
        self.bytes.extend_from_slice(&len.to_le_bytes());
        self.bytes.extend_from_slice(record);
        self.count += 1;
    }

    pub fn is_full(&self) -> bool {
        self.count >= CHUNK_MAX
    }

    /// The number the next execution must have.
    pub fn next(&self) -> u64 {
        self.first + self.count as u64
    }

    /// The key and value to store.
    pub fn finish(self, session_row: Uuid) -> ([u8; 25], Vec<u8>) {
        (keys::execution(session_row, self.first), self.bytes)
    }
}

/// Every execution in a scan of execution keys (one session's or all of
/// them, forwards or backwards, as `reverse` says), as (session row,
/// number, record), each number once.
pub struct Unique<I> {
    items: I,
    reverse: bool,
    /// The session and number yielded last.
    last: Option<(Uuid, u64)>,
    pending: std::vec::IntoIter<(Uuid, u64, Vec<u8>)>,
}

impl<I> Unique<I>
where
    I: Iterator<Item = Result<(IVec, IVec), StoreError>>,
{
    pub fn new(items: I, reverse: bool) -> Self {
        Unique {
            items,
            reverse,
            last: None,
            pending: Vec::new().into_iter(),
        }
    }

    /// Whether `seq` of `row` comes after what was yielded (not yielded
    /// yet, in the scan's direction).
    fn is_new(&self, row: Uuid, seq: u64) -> bool {
        match self.last {
            Some((last_row, last)) if last_row == row => {
                if self.reverse {
                    seq < last
                } else {
                    seq > last
                }
            }
            _ => true,
        }
    }
}

impl<I> Iterator for Unique<I>
where
    I: Iterator<Item = Result<(IVec, IVec), StoreError>>,
{
    type Item = Result<(Uuid, u64, Vec<u8>), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            while let Some((row, seq, record)) = self.pending.next() {
                if self.is_new(row, seq) {
                    self.last = Some((row, seq));
                    return Some(Ok((row, seq, record)));
                }
            }
            let (key, value) = match self.items.next()? {
                Ok(item) => item,
                Err(e) => return Some(Err(e)),
            };
            let Some((row, first)) = keys::parse_execution(&key) else {
                continue;
            };
            let mut split: Vec<(Uuid, u64, Vec<u8>)> = match records(first, &value) {
                Ok(records) => records
                    .into_iter()
                    .map(|(seq, record)| (row, seq, record.to_vec()))
                    .collect(),
                Err(e) => return Some(Err(super::sled::corrupt(&key, e))),
            };
            if self.reverse {
                split.reverse();
            }
            self.pending = split.into_iter();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::record;

    fn single(n: u64) -> Vec<u8> {
        record::encode(&n)
    }

    fn chunk(first: u64, count: u64) -> Vec<u8> {
        let mut chunk = Chunk::new(first);
        for n in first..first + count {
            chunk.push(&single(n));
        }
        chunk.finish(Uuid::nil()).1
    }

    fn item(row: Uuid, first: u64, value: Vec<u8>) -> Result<(IVec, IVec), StoreError> {
        Ok((keys::execution(row, first).to_vec().into(), value.into()))
    }

    #[test]
    fn a_chunk_holds_its_records_in_order() {
        let value = chunk(7, 3);
        let split = records(7, &value).unwrap();
        let numbers: Vec<u64> = split.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, [7, 8, 9]);
        for (n, record) in split {
            assert_eq!(record::decode::<u64>(record).unwrap(), n);
        }
        // A single record is a chunk of one; a chunk is not a record.
        assert_eq!(records(4, &single(4)).unwrap(), [(4, &single(4)[..])]);
        assert!(record::decode::<u64>(&value).is_err());
        // Damage is an error, not a shorter list.
        assert!(records(7, &value[..value.len() - 1]).is_err());
        assert!(records(7, &[CHUNK]).is_err());
    }

    #[test]
    fn extending_takes_a_chunk_that_ends_right_before() {
        let value = chunk(1, 3);
        let mut extended = Chunk::extending(1, &value, 4).unwrap().unwrap();
        extended.push(&single(4));
        let (_, bytes) = extended.finish(Uuid::nil());
        assert_eq!(bytes, chunk(1, 4));
        assert!(Chunk::extending(1, &value, 5).unwrap().is_none(), "a gap");
        let full = chunk(1, CHUNK_MAX as u64);
        assert!(Chunk::extending(1, &full, 1 + CHUNK_MAX as u64)
            .unwrap()
            .is_none());
        assert!(Chunk::extending(9, &single(9), 10).unwrap().is_some());
    }

    #[test]
    fn each_execution_comes_once_in_either_direction() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        // Session a: a chunk 1..=5 in sled, and 4 and 5 still alone in the
        // overlay (a checkpoint extended the chunk), then 6 alone; session
        // b: a single, then a chunk.
        let items = vec![
            item(a, 1, chunk(1, 5)),
            item(a, 4, single(4)),
            item(a, 5, single(5)),
            item(a, 6, single(6)),
            item(b, 1, single(1)),
            item(b, 2, chunk(2, 2)),
        ];
        let forward: Vec<(Uuid, u64)> = Unique::new(items.clone().into_iter(), false)
            .map(|r| r.map(|(row, n, _)| (row, n)))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            forward,
            [
                (a, 1),
                (a, 2),
                (a, 3),
                (a, 4),
                (a, 5),
                (a, 6),
                (b, 1),
                (b, 2),
                (b, 3)
            ]
        );
        let backward: Vec<(Uuid, u64)> = Unique::new(items.into_iter().rev(), true)
            .map(|r| r.map(|(row, n, _)| (row, n)))
            .collect::<Result<_, _>>()
            .unwrap();
        let mut expected = forward;
        expected.reverse();
        assert_eq!(backward, expected);
    }
}
