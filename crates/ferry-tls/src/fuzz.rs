//! Fuzz entry points for the record reader, the parser of everything a man
//! in the middle can put on the wire after the handshake. They live in the
//! library (as ferry-channel's do) so that `fuzz/` targets stay one-liners
//! and `cargo test` runs them on pseudo-random input too.
//!
//! Each accepts any bytes, never panics on its own, and panics (`assert!`)
//! only when one of the reader's promises is broken.

use tokio::io::AsyncBufReadExt;

use crate::keys::{
    Opener, Sealer, Suite, ALERT, APPLICATION_DATA, HANDSHAKE, HEADER_LEN, MAX_PLAINTEXT,
    TRAILER_LEN,
};
use crate::{RecordReader, READ_BUFFER};

const KEY: [u8; 16] = [0x42; 16];
const IV: [u8; 12] = [0x24; 12];

/// Read `wire` to its end (or first error) as a peer's socket would give it;
/// returns the plaintext handed out.
fn drain(wire: &[u8]) -> (Vec<u8>, Option<std::io::Error>) {
    let rt = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(_) => return (Vec::new(), None),
    };
    rt.block_on(async {
        let opener = match Opener::new(Suite::Aes128Gcm, &KEY, IV, 0, u64::MAX) {
            Ok(o) => o,
            Err(_) => return (Vec::new(), None),
        };
        let mut r = RecordReader::new(wire, opener, b"");
        let mut got = Vec::new();
        loop {
            match r.fill_buf().await {
                Ok([]) => return (got, None),
                Ok(piece) => {
                    // One fill never holds more than one read's worth.
                    assert!(piece.len() <= READ_BUFFER + crate::keys::MAX_RECORD);
                    let n = piece.len();
                    got.extend_from_slice(piece);
                    std::pin::Pin::new(&mut r).consume(n);
                }
                Err(e) => return (got, Some(e)),
            }
        }
    })
}

/// Arbitrary bytes as the wire: refused or read, never a panic, never more
/// plaintext than the wire had bytes, and no clean end without close_notify.
pub fn wire(data: &[u8]) {
    let (got, err) = drain(data);
    assert!(got.len() <= data.len());
    // A clean end needs an authentic close_notify, which random bytes cannot
    // forge; even no bytes at all is a truncation.
    assert!(err.is_some(), "{} random bytes ended cleanly", data.len());
}

/// `data` cut into records (a length byte, then a content-type selector
/// byte, then content), sealed with the test key, then one byte flipped
/// where the last four bytes say (if they say so). Unflipped, the reader
/// must return exactly the data records' content up to the first record
/// that is not data, and stop there for the right reason.
pub fn sealed(data: &[u8]) {
    let (body, flip) = match data.len().checked_sub(4) {
        Some(n) => {
            (&data[..n], u32::from_le_bytes([data[n], data[n + 1], data[n + 2], data[n + 3]]))
        }
        None => (data, 0),
    };
    let mut sealer = match Sealer::new(Suite::Aes128Gcm, &KEY, IV, 0, u64::MAX) {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut wire = Vec::new();
    let mut want = Vec::new();
    // The first record that is not data, and whether it is close_notify.
    let mut stop: Option<(u8, bool)> = None;
    let mut rest = body;
    while let [len, kind, tail @ ..] = rest {
        let n = (usize::from(*len) * 67).min(MAX_PLAINTEXT).min(tail.len());
        let content_type = match kind % 4 {
            0 => ALERT,
            1 => HANDSHAKE,
            _ => APPLICATION_DATA,
        };
        let mut rec = vec![0u8; HEADER_LEN + n + TRAILER_LEN];
        rec[HEADER_LEN..HEADER_LEN + n].copy_from_slice(&tail[..n]);
        if sealer.seal(&mut rec, content_type).is_err() {
            return;
        }
        wire.extend_from_slice(&rec);
        if stop.is_none() {
            if content_type == APPLICATION_DATA {
                want.extend_from_slice(&tail[..n]);
            } else {
                stop = Some((content_type, content_type == ALERT && n == 2 && tail[1] == 0));
            }
        }
        rest = &tail[n..];
    }
    let flipped = flip & 0x8000_0000 != 0 && !wire.is_empty();
    if flipped {
        let at = (flip & 0x7fff_ffff) as usize % wire.len();
        wire[at] ^= 1 << (flip % 8);
    }
    let (got, err) = drain(&wire);
    if flipped {
        // Whatever came out was authentic: nothing of a tampered record.
        assert!(want.starts_with(&got), "tampered bytes handed out");
        return;
    }
    assert_eq!(got, want, "the reader must return exactly the data records' content");
    match (stop, err) {
        (Some((_, true)), None) => {}
        (Some((_, true)), Some(e)) => panic!("close_notify, yet {e}"),
        (_, None) => panic!("no close_notify was sent, yet the stream ended cleanly"),
        (None, Some(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}"),
        (Some(_), Some(e)) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(seed: u32, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn random_wires_are_refused_without_panics() {
        for seed in 0..300u32 {
            let mut w = pseudo_random(seed, (seed as usize * 37) % 3000);
            if seed % 3 == 0 && w.len() > 5 {
                // Plausible headers too, so the length checks are reached.
                w[..5].copy_from_slice(&[23, 3, 3, (seed % 0x50) as u8, 0x10]);
            }
            wire(&w);
        }
    }

    #[test]
    fn sealed_streams_read_back_or_fail_for_the_right_reason() {
        for seed in 0..300u32 {
            sealed(&pseudo_random(seed, (seed as usize * 53) % 5000));
        }
    }
}
