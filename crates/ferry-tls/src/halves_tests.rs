//! The two halves against each other over an in-memory pipe, with fixed
//! keys: record layout, packing, ordering, tampering, alerts, truncation.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::keys::{
    Opener, Sealer, Suite, ALERT, HANDSHAKE, HEADER_LEN, MAX_PLAINTEXT, TRAILER_LEN,
};
use crate::{RecordBatch, RecordError, RecordReader, RecordWriter};

const KEY: [u8; 16] = [3; 16];
const IV: [u8; 12] = [5; 12];
const SUITE: Suite = Suite::Aes128Gcm;

fn sealer() -> Sealer {
    Sealer::new(SUITE, &KEY, IV, 0, u64::MAX).unwrap()
}

fn reader(io: DuplexStream) -> RecordReader<DuplexStream> {
    RecordReader::new(io, Opener::new(SUITE, &KEY, IV, 0, u64::MAX).unwrap(), b"")
}

fn pseudo_random(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Records on the wire: (content length field, whole record).
fn split_records(mut wire: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while wire.len() >= HEADER_LEN {
        let len = usize::from(u16::from_be_bytes([wire[3], wire[4]]));
        out.push(wire[..HEADER_LEN + len].to_vec());
        wire = &wire[HEADER_LEN + len..];
    }
    assert!(wire.is_empty(), "trailing bytes");
    out
}

async fn wire_of(f: impl AsyncFnOnce(&mut RecordWriter<DuplexStream>)) -> Vec<u8> {
    let (a, mut b) = tokio::io::duplex(8 << 20);
    let mut w = RecordWriter::new(a, sealer());
    f(&mut w).await;
    drop(w);
    let mut wire = Vec::new();
    b.read_to_end(&mut wire).await.unwrap();
    wire
}

/// A flushed control message is one record of its own, the size rustls
/// would give it (the attack tests aim flips at such records).
#[tokio::test]
async fn a_flushed_message_is_one_record_of_plaintext_plus_type_and_tag() {
    let wire = wire_of(async |w| {
        w.write_all(&[7u8; 22]).await.unwrap();
        w.flush().await.unwrap();
        w.write_all(b"second").await.unwrap();
        w.flush().await.unwrap();
    })
    .await;
    let recs = split_records(&wire);
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].len(), HEADER_LEN + 22 + TRAILER_LEN);
    assert_eq!(&recs[0][..5], &[23, 3, 3, 0, 39]);
}

#[tokio::test]
async fn big_writes_are_cut_into_full_records_and_read_back_whole() {
    let data = pseudo_random(6 * MAX_PLAINTEXT + 123);
    let wire = wire_of(async |w| {
        w.write_all(&data).await.unwrap();
        w.flush().await.unwrap();
    })
    .await;
    let recs = split_records(&wire);
    assert_eq!(recs.len(), 7);
    assert!(recs[..6].iter().all(|r| r.len() == HEADER_LEN + MAX_PLAINTEXT + TRAILER_LEN));
    let (mut a, b) = tokio::io::duplex(8 << 20);
    a.write_all(&wire).await.unwrap();
    drop(a);
    let mut r = reader(b);
    let mut got = vec![0u8; data.len()];
    r.read_exact(&mut got).await.unwrap();
    assert_eq!(got, data);
}

/// Records that arrive together come out as one slice: the receiving pump
/// hashes and writes them with one call each, without copying.
#[tokio::test]
async fn records_read_together_are_handed_out_as_one_slice() {
    let data = pseudo_random(3 * MAX_PLAINTEXT);
    let wire = wire_of(async |w| {
        w.write_all(&data).await.unwrap();
        w.flush().await.unwrap();
    })
    .await;
    let (mut a, b) = tokio::io::duplex(8 << 20);
    a.write_all(&wire).await.unwrap();
    let mut r = reader(b);
    let first = r.fill_buf().await.unwrap();
    assert_eq!(first, &data[..], "three records, one slice");
}

#[tokio::test]
async fn a_batch_follows_what_was_written_before_it_and_sees_each_record_first() {
    let data = pseudo_random(2 * MAX_PLAINTEXT + 10);
    let mut batch = RecordBatch::new(4);
    batch.plan(0, 0);
    batch.copy_in(&data);
    let mut seen = Vec::new();
    let wire = wire_of(async |w| {
        w.write_all(b"header").await.unwrap();
        w.send_batch(&mut batch, data.len(), |p| seen.extend_from_slice(p)).await.unwrap();
        w.write_all(b"trailer").await.unwrap();
        w.shutdown().await.unwrap();
    })
    .await;
    assert_eq!(seen, data);
    let (mut a, b) = tokio::io::duplex(8 << 20);
    a.write_all(&wire).await.unwrap();
    let mut r = reader(b);
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    let mut want = b"header".to_vec();
    want.extend_from_slice(&data);
    want.extend_from_slice(b"trailer");
    assert_eq!(got, want, "close_notify ends the stream cleanly");
}

async fn read_all(wire: Vec<u8>) -> (Vec<u8>, std::io::Error) {
    let (mut a, b) = tokio::io::duplex(8 << 20);
    a.write_all(&wire).await.unwrap();
    drop(a);
    let mut r = reader(b);
    let mut got = Vec::new();
    let err = tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap_err();
    (got, err)
}

fn tls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
}

#[tokio::test]
async fn a_flipped_bit_stops_the_stream_at_its_record() {
    let data = pseudo_random(4 * MAX_PLAINTEXT);
    let mut wire = wire_of(async |w| {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    })
    .await;
    let third = 2 * (HEADER_LEN + MAX_PLAINTEXT + TRAILER_LEN) + 100;
    wire[third] ^= 0x40;
    let (got, err) = read_all(wire).await;
    assert!(matches!(tls_error(&err), Some(rustls::Error::DecryptError)), "{err}");
    assert_eq!(got, &data[..2 * MAX_PLAINTEXT], "only the records before the flip");
}

#[tokio::test]
async fn a_cut_stream_is_a_truncation_not_an_end() {
    let data = pseudo_random(2 * MAX_PLAINTEXT);
    for cut in [0, 1, HEADER_LEN + MAX_PLAINTEXT + TRAILER_LEN, 2 * MAX_PLAINTEXT] {
        let mut wire = wire_of(async |w| {
            w.write_all(&data).await.unwrap();
            w.flush().await.unwrap();
        })
        .await;
        wire.truncate(cut.min(wire.len()));
        let (_, err) = read_all(wire).await;
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "cut at {cut}: {err}");
    }
}

/// One record with `content_type` and `content`, as a peer could send it.
fn raw_record(s: &mut Sealer, content_type: u8, content: &[u8]) -> Vec<u8> {
    let mut rec = vec![0u8; HEADER_LEN + content.len() + TRAILER_LEN];
    rec[HEADER_LEN..HEADER_LEN + content.len()].copy_from_slice(content);
    s.seal(&mut rec, content_type).unwrap();
    rec
}

#[tokio::test]
async fn alerts_and_post_handshake_messages_end_the_stream_with_their_cause() {
    let mut s = sealer();
    let mut wire = raw_record(&mut s, crate::keys::APPLICATION_DATA, b"before");
    wire.extend(raw_record(&mut s, ALERT, &[2, 20]));
    let (got, err) = read_all(wire).await;
    assert_eq!(got, b"before");
    assert!(
        matches!(
            tls_error(&err),
            Some(rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac))
        ),
        "{err}"
    );

    let mut s = sealer();
    let (_, err) = read_all(raw_record(&mut s, HANDSHAKE, &[24, 0, 0, 1, 0])).await;
    let inner = err.get_ref().and_then(|e| e.downcast_ref::<RecordError>());
    assert!(matches!(inner, Some(RecordError::PostHandshake(24))), "{err}");
}

#[tokio::test]
async fn a_record_header_that_lies_is_refused_before_its_body_is_read() {
    let (_, err) = read_all(vec![23, 3, 3, 0xff, 0xff]).await;
    let inner = err.get_ref().and_then(|e| e.downcast_ref::<RecordError>());
    assert!(matches!(inner, Some(RecordError::RecordOverflow(0xffff))), "{err}");
    let (_, err) = read_all(vec![21, 3, 3, 0, 2, 2, 40]).await;
    let inner = err.get_ref().and_then(|e| e.downcast_ref::<RecordError>());
    assert!(matches!(inner, Some(RecordError::UnexpectedRecordType(21))), "{err}");
}

#[tokio::test]
async fn plaintext_rustls_already_opened_comes_first() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let mut w = RecordWriter::new(a, sealer());
    w.write_all(b" and then ours").await.unwrap();
    w.shutdown().await.unwrap();
    let mut r = RecordReader::new(b, Opener::new(SUITE, &KEY, IV, 0, u64::MAX).unwrap(), b"early");
    let mut got = String::new();
    r.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "early and then ours");
}

#[tokio::test]
async fn nothing_is_written_after_close_notify() {
    let (a, _b) = tokio::io::duplex(1 << 16);
    let mut w = RecordWriter::new(a, sealer());
    w.shutdown().await.unwrap();
    let err = w.write_all(b"late").await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe, "{err}");
}

fn record_error(e: &std::io::Error) -> Option<&RecordError> {
    e.get_ref().and_then(|e| e.downcast_ref::<RecordError>())
}

/// The reader of `wire` and a writer linked to it as one connection's
/// halves (what `take_over` returns), the writer's peer kept open.
async fn linked_halves(
    wire: &[u8],
) -> (RecordReader<DuplexStream>, RecordWriter<DuplexStream>, DuplexStream) {
    let (mut feed, from) = tokio::io::duplex(8 << 20);
    feed.write_all(wire).await.unwrap();
    drop(feed);
    let (to, peer) = tokio::io::duplex(8 << 20);
    let mut r = reader(from);
    let mut w = RecordWriter::new(to, sealer());
    crate::failed::link(&mut r, &mut w);
    (r, w, peer)
}

/// SECURITY (RFC 8446 §5.2): a record that fails to decrypt ends the
/// connection both ways: the writer of the same connection refuses to send
/// anything more, as rustls would.
#[tokio::test]
async fn a_tampered_incoming_record_stops_the_outgoing_direction_too() {
    let mut wire = wire_of(async |w| {
        w.write_all(b"tampered").await.unwrap();
        w.flush().await.unwrap();
    })
    .await;
    wire[HEADER_LEN + 2] ^= 1;
    let (mut r, mut w, _peer) = linked_halves(&wire).await;
    w.write_all(b"before").await.unwrap();
    w.flush().await.unwrap();
    let mut got = Vec::new();
    let err = r.read_to_end(&mut got).await.unwrap_err();
    assert!(matches!(tls_error(&err), Some(rustls::Error::DecryptError)), "{err}");
    let err = w.write_all(b"after").await.unwrap_err();
    assert!(matches!(record_error(&err), Some(RecordError::IncomingFailed)), "{err}");
    let err = w.flush().await.unwrap_err();
    assert!(matches!(record_error(&err), Some(RecordError::IncomingFailed)), "{err}");
    let mut batch = RecordBatch::new(1);
    batch.plan(0, MAX_PLAINTEXT);
    let err = w.send_batch(&mut batch, 1, |_| {}).await.unwrap_err();
    assert!(matches!(record_error(&err), Some(RecordError::IncomingFailed)), "{err}");
}

/// SECURITY (RFC 8446 §5.2, §6): the peer learns why: the first write
/// after a record failed to authenticate sends a fatal bad_record_mac
/// alert (what the writer had already sealed goes before it, whole; what
/// it had not sealed is dropped), and nothing after it.
#[tokio::test]
async fn a_tampered_incoming_record_is_answered_with_bad_record_mac_and_nothing_else() {
    let mut wire = wire_of(async |w| {
        w.write_all(b"tampered").await.unwrap();
        w.flush().await.unwrap();
    })
    .await;
    wire[HEADER_LEN + 2] ^= 1;
    let (mut r, mut w, peer) = linked_halves(&wire).await;
    w.write_all(b"sealed before").await.unwrap();
    w.flush().await.unwrap();
    w.write_all(b"never sealed").await.unwrap();
    r.read_to_end(&mut Vec::new()).await.unwrap_err();
    w.write_all(b"after").await.unwrap_err();
    w.flush().await.unwrap_err();
    w.shutdown().await.unwrap();
    drop(w);
    let mut got = Vec::new();
    let err = reader(peer).read_to_end(&mut got).await.unwrap_err();
    assert_eq!(got, b"sealed before");
    assert!(
        matches!(
            tls_error(&err),
            Some(rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac))
        ),
        "{err}"
    );
}

/// A peer's own alert is not answered with one.
#[tokio::test]
async fn an_alert_from_the_peer_is_not_answered() {
    let mut s = sealer();
    let wire = raw_record(&mut s, ALERT, &[2, 20]);
    let (mut r, mut w, peer) = linked_halves(&wire).await;
    r.read_to_end(&mut Vec::new()).await.unwrap_err();
    w.write_all(b"after").await.unwrap_err();
    w.shutdown().await.unwrap();
    drop(w);
    let mut all = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut { peer }, &mut all).await.unwrap();
    assert!(all.is_empty(), "{} bytes sent after the peer's alert", all.len());
}

/// The peer's close_notify ends only its direction (TLS 1.3 half-close):
/// this side may still answer.
#[tokio::test]
async fn a_clean_close_leaves_the_outgoing_direction_open() {
    let wire = wire_of(async |w| {
        w.write_all(b"last words").await.unwrap();
        w.shutdown().await.unwrap();
    })
    .await;
    let (mut r, mut w, _peer) = linked_halves(&wire).await;
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"last words");
    w.write_all(b"an answer").await.unwrap();
    w.flush().await.unwrap();
}
