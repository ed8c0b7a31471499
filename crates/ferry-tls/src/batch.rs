//! A buffer laid out as TLS record slots, so that data read into it (one
//! vectored read) can be sealed where it lies and sent with one vectored
//! write: no copy between the source and the socket.
//!
//! ```text
//! | hdr | prefix + data  | type+tag | hdr | data (16 KiB)  | type+tag | ...
//! ```
//!
//! A batch is planned before each read: the caller's prefix (a frame
//! header) goes first, and the first slot (or two) takes only as much data
//! as reaches the next 16 KiB boundary of the caller's data stream, so
//! that every later record holds exactly one aligned 16 KiB block of it.
//! Per-record hashing with BLAKE3 then always gets whole aligned subtrees
//! (its fast path); unaligned 16 KiB updates cost it about twice as much.

use std::io::{IoSlice, IoSliceMut};
use std::ops::Range;

use crate::keys::{HEADER_LEN, MAX_PLAINTEXT, MAX_RECORD, TRAILER_LEN};
use crate::RecordError;

pub struct RecordBatch {
    buf: Vec<u8>,
    /// Data room of each slot in the current plan (the prefix excluded).
    room: Vec<usize>,
    prefix: usize,
}

impl RecordBatch {
    /// Room for `records` record slots. Allocated once; pages are touched
    /// only as data lands in them.
    pub fn new(records: usize) -> Self {
        let records = records.max(2);
        let mut b = Self { buf: vec![0; records * MAX_RECORD], room: vec![0; records], prefix: 0 };
        b.plan(0, 0);
        b
    }

    fn slots(&self) -> usize {
        self.room.len()
    }

    /// Lay out the next batch: `prefix` bytes first (at most 64), then
    /// data. `to_boundary` is how much data is missing to the next 16 KiB
    /// boundary of the caller's stream (0 if it is on one): the first
    /// slots take exactly that much, every later slot a whole 16 KiB.
    pub fn plan(&mut self, prefix: usize, to_boundary: usize) {
        let prefix = prefix.min(64);
        let gap = to_boundary % MAX_PLAINTEXT;
        self.prefix = prefix;
        self.room.fill(MAX_PLAINTEXT);
        if prefix + gap <= MAX_PLAINTEXT {
            self.room[0] = gap;
        } else {
            // The prefix gets a record of its own; the gap the next one.
            self.room[0] = 0;
            self.room[1] = gap;
        }
        if gap == 0 && prefix == 0 {
            self.room[0] = MAX_PLAINTEXT;
        }
    }

    /// Data the current plan holds.
    pub fn capacity(&self) -> usize {
        self.room.iter().sum()
    }

    /// Where slot `i`'s data starts in `buf`.
    fn data_at(&self, i: usize) -> usize {
        i * MAX_RECORD + HEADER_LEN + if i == 0 { self.prefix } else { 0 }
    }

    /// The planned data room, one slice per slot, for a vectored read.
    pub fn read_slices(&mut self) -> Vec<IoSliceMut<'_>> {
        let mut out = Vec::with_capacity(self.slots());
        let mut rest: &mut [u8] = &mut self.buf;
        for (i, &room) in self.room.iter().enumerate() {
            let (slot, tail) = rest.split_at_mut(MAX_RECORD);
            rest = tail;
            let from = HEADER_LEN + if i == 0 { self.prefix } else { 0 };
            if room > 0 {
                out.push(IoSliceMut::new(&mut slot[from..from + room]));
            }
        }
        out
    }

    /// The prefix planned for this batch.
    pub fn prefix_mut(&mut self) -> &mut [u8] {
        &mut self.buf[HEADER_LEN..HEADER_LEN + self.prefix]
    }

    /// Copy `data` in as a read would have put it (for sources that cannot
    /// do vectored reads). Returns how much fitted.
    pub fn copy_in(&mut self, mut data: &[u8]) -> usize {
        let start = data.len();
        for i in 0..self.slots() {
            let n = data.len().min(self.room[i]);
            let at = self.data_at(i);
            self.buf[at..at + n].copy_from_slice(&data[..n]);
            data = &data[n..];
        }
        start - data.len()
    }

    /// Run `seal(record, data_from)` on each record holding the prefix and
    /// the first `len` data bytes (`record` is the whole slot range: header
    /// room, plaintext, trailer room; its data starts at `data_from` of the
    /// plaintext). Returns the byte ranges to send, in order.
    pub(crate) fn seal(
        &mut self,
        len: usize,
        mut seal: impl FnMut(&mut [u8], usize) -> Result<(), RecordError>,
    ) -> Result<Vec<Range<usize>>, RecordError> {
        if len > self.capacity() {
            return Err(RecordError::RecordOverflow(len));
        }
        let mut out: Vec<Range<usize>> = Vec::new();
        let mut left = len;
        for i in 0..self.slots() {
            let data = left.min(self.room[i]);
            let prefix = if i == 0 { self.prefix } else { 0 };
            if data == 0 && prefix == 0 {
                if left == 0 {
                    break;
                }
                continue;
            }
            left -= data;
            let start = i * MAX_RECORD;
            let end = start + HEADER_LEN + prefix + data + TRAILER_LEN;
            seal(&mut self.buf[start..end], prefix)?;
            match out.last_mut() {
                Some(r) if r.end == start => r.end = end,
                _ => out.push(start..end),
            }
        }
        Ok(out)
    }

    pub(crate) fn slices<'a>(&'a self, ranges: &[Range<usize>]) -> Vec<IoSlice<'a>> {
        ranges.iter().map(|r| IoSlice::new(&self.buf[r.clone()])).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// (data bytes each record holds, byte ranges) for `len` data bytes.
    fn layout(b: &mut RecordBatch, len: usize) -> (Vec<usize>, Vec<Range<usize>>) {
        let mut held = Vec::new();
        let ranges = b
            .seal(len, |rec, from| {
                held.push(rec.len() - HEADER_LEN - TRAILER_LEN - from);
                Ok(())
            })
            .unwrap();
        (held, ranges)
    }

    #[test]
    fn the_first_records_fill_up_to_the_stream_boundary_and_the_rest_are_whole_blocks() {
        let mut b = RecordBatch::new(8);
        b.plan(8, 1000);
        assert_eq!(b.capacity(), 1000 + 7 * MAX_PLAINTEXT);
        let (held, ranges) = layout(&mut b, 1000 + 2 * MAX_PLAINTEXT + 5);
        assert_eq!(held, [1000, MAX_PLAINTEXT, MAX_PLAINTEXT, 5]);
        // A short first record breaks contiguity once; the rest is one run.
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[1].start, MAX_RECORD);
    }

    #[test]
    fn a_prefix_that_does_not_fit_with_the_gap_gets_a_record_of_its_own() {
        let mut b = RecordBatch::new(4);
        b.plan(8, MAX_PLAINTEXT - 3);
        let (held, _) = layout(&mut b, MAX_PLAINTEXT);
        assert_eq!(held, [0, MAX_PLAINTEXT - 3, 3]);
        // On a boundary, the prefix is still alone, so blocks stay aligned.
        b.plan(8, 0);
        let (held, _) = layout(&mut b, MAX_PLAINTEXT + 1);
        assert_eq!(held, [0, MAX_PLAINTEXT, 1]);
    }

    #[test]
    fn reads_land_where_the_records_will_be_sealed() {
        let mut b = RecordBatch::new(4);
        b.plan(8, 100);
        let data: Vec<u8> = (0..100 + MAX_PLAINTEXT + 7).map(|i| (i % 251) as u8).collect();
        let slices = b.read_slices();
        assert_eq!(slices.iter().map(|s| s.len()).collect::<Vec<_>>()[..2], [100, MAX_PLAINTEXT]);
        drop(slices);
        assert_eq!(b.copy_in(&data), data.len());
        b.prefix_mut().copy_from_slice(b"PREFIX!!");
        let mut seen = Vec::new();
        b.seal(data.len(), |rec, from| {
            if seen.is_empty() {
                assert_eq!(&rec[HEADER_LEN..HEADER_LEN + from], b"PREFIX!!");
            }
            seen.extend_from_slice(&rec[HEADER_LEN + from..rec.len() - TRAILER_LEN]);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, data);
        assert!(b.seal(b.capacity() + 1, |_, _| Ok(())).is_err());
    }
}
