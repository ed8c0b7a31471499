//! Fuzz entry points, kept inside the library (as rustls does) so that the
//! cargo-fuzz targets in `fuzz/` stay one-liners and the unit tests below
//! run the same code on the committed seed corpus and on pseudo-random
//! input in every plain `cargo test`, without cargo-fuzz or nightly.
//!
//! Each entry accepts any bytes, must never panic on its own, and panics
//! (via `assert!`) only when one of the codec's promises is broken.

use std::time::Duration;

use crate::codec::{
    split_frame, FrameHeader, FrameKind, HEADER_LEN, MAX_CONTROL_LEN, MAX_DATA_LEN,
};
use crate::io::{ChannelError, FrameReader, Incoming};

fn max_len(kind: FrameKind) -> u32 {
    match kind {
        FrameKind::Control => MAX_CONTROL_LEN,
        FrameKind::Data => MAX_DATA_LEN,
        FrameKind::DataEnd => 0,
    }
}

/// Split `data` into frames with the sans-IO codec as a reader would,
/// checking that every accepted frame is canonical and within its maximum,
/// and decode control payloads as JSON (what every caller does next).
/// Returns the payload lengths of the whole frames found.
pub fn frames(data: &[u8]) -> Vec<usize> {
    let mut rest = data;
    let mut found = Vec::new();
    loop {
        match split_frame(rest) {
            Ok(Some((h, payload, used))) => {
                assert!(h.len <= max_len(h.kind), "{h:?} exceeds its maximum");
                assert_eq!(payload.len(), h.len as usize);
                assert_eq!(used, HEADER_LEN + payload.len());
                // Canonical: the accepted header re-encodes to the same bytes.
                assert_eq!(h.encode()[..], rest[..HEADER_LEN]);
                assert_eq!(FrameHeader::new(h.kind, h.len), Ok(h));
                if h.kind == FrameKind::Control {
                    let _ = serde_json::from_slice::<serde_json::Value>(payload);
                }
                found.push(payload.len());
                rest = &rest[used..];
            }
            Ok(None) => {
                // More bytes needed: either no whole header, or a valid
                // header whose (bounded) payload has not all arrived.
                if let Some(head) = rest.first_chunk::<HEADER_LEN>() {
                    let h =
                        FrameHeader::decode(head).expect("split_frame waited on an invalid header");
                    assert!(rest.len() < HEADER_LEN + h.len as usize);
                }
                return found;
            }
            Err(e) => {
                let head = rest.first_chunk::<HEADER_LEN>().expect("an error needs a whole header");
                assert_eq!(FrameHeader::decode(head), Err(e));
                return found;
            }
        }
    }
}

/// Drive the tokio [`FrameReader`] over `data` and check that it agrees
/// with the sans-IO splitter frame by frame, and that its buffer never
/// grows past the largest frame.
pub fn reader(data: &[u8]) {
    let expected = frames(data);
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async {
        let mut r = FrameReader::new(data, Duration::from_secs(5));
        let mut got = Vec::new();
        let end = loop {
            match r.read_frame().await {
                Ok(Incoming::Control(p)) | Ok(Incoming::Data(p)) => got.push(p.len()),
                Ok(Incoming::DataEnd) => got.push(0),
                Err(e) => break e,
            }
        };
        assert_eq!(got, expected, "the reader and the splitter disagree");
        assert!(
            matches!(end, ChannelError::Closed | ChannelError::Frame(_)),
            "unexpected end: {end}"
        );
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn corpus() -> Vec<(String, Vec<u8>)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/frame");
        let mut out: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
            .map(|e| {
                let p = e.unwrap().path();
                (p.display().to_string(), std::fs::read(&p).unwrap())
            })
            .collect();
        out.sort();
        assert!(out.len() >= 5, "seed corpus {} is nearly empty", dir.display());
        out
    }

    /// xorshift32, biased towards bytes that make valid headers likely.
    fn pseudo_random_inputs(n: usize) -> impl Iterator<Item = Vec<u8>> {
        let mut x: u32 = 0x9e37_79b9;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        (0..n).map(move |i| {
            let len = (next() as usize) % (64 + i % 512);
            let mut v = Vec::with_capacity(len);
            while v.len() < len {
                let r = next();
                match r % 8 {
                    // A plausible header: valid kind, zero reserved, small length.
                    0 => {
                        let kind = (r >> 8) as u8 % 4;
                        let l = (r >> 16) % 48;
                        v.extend_from_slice(&[kind, 0, 0, 0]);
                        v.extend_from_slice(&l.to_be_bytes());
                    }
                    1 => v.extend_from_slice(b"{\"type\":\"abort\"}"),
                    _ => v.push((r >> 24) as u8),
                }
            }
            v
        })
    }

    #[test]
    fn seed_corpus_passes_the_frame_entries() {
        let mut whole = 0;
        for (name, bytes) in corpus() {
            let n = frames(&bytes).len();
            reader(&bytes);
            eprintln!("{name}: {n} whole frames");
            whole += n;
        }
        assert!(whole > 0, "no seed holds a valid frame");
    }

    #[test]
    fn pseudo_random_input_passes_the_frame_entries() {
        let mut frames_seen = 0;
        for (i, input) in pseudo_random_inputs(20_000).enumerate() {
            frames_seen += frames(&input).len();
            if i % 20 == 0 {
                reader(&input);
            }
        }
        assert!(frames_seen > 1000, "the generator rarely makes valid frames ({frames_seen})");
    }

    /// Mutations of every seed: each single-byte change is still handled.
    #[test]
    fn every_single_byte_mutation_of_the_seeds_is_handled() {
        for (_, seed) in corpus() {
            for i in 0..seed.len().min(64) {
                for v in [0u8, 1, 2, 3, 0x7f, 0xff] {
                    let mut m = seed.clone();
                    m[i] = v;
                    frames(&m);
                }
            }
        }
    }
}
