//! TLS 1.3 record protection (RFC 8446 §5.2–5.3) with the traffic keys
//! rustls negotiated: one [`Sealer`] for what we send, sealing a record
//! where it lies, and one [`Opener`] for what we receive, opening a record
//! in one pass into a plaintext buffer.

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::ConnectionTrafficSecrets;

use crate::RecordError;

/// Bytes in a record header: type, legacy version (2), length (2).
pub const HEADER_LEN: usize = 5;
/// Most plaintext one record carries (2^14).
pub const MAX_PLAINTEXT: usize = 16 * 1024;
const TAG_LEN: usize = 16;
/// What sealing adds after the plaintext: the inner content type and the tag.
pub const TRAILER_LEN: usize = 1 + TAG_LEN;
/// A full record on the wire.
pub const MAX_RECORD: usize = HEADER_LEN + MAX_PLAINTEXT + TRAILER_LEN;
/// Largest `TLSCiphertext.length` a peer may send (RFC 8446 §5.2: 2^14 + 256).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;

/// Record content types (RFC 8446 §5.1).
pub const ALERT: u8 = 21;
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;
const LEGACY_VERSION: [u8; 2] = [3, 3];

/// The TLS 1.3 AEADs rustls's aws-lc-rs provider negotiates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Suite {
    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    pub fn tls_name(self) -> &'static str {
        match self {
            Suite::Aes128Gcm => "TLS_AES_128_GCM_SHA256",
            Suite::Aes256Gcm => "TLS_AES_256_GCM_SHA384",
            Suite::Chacha20Poly1305 => "TLS_CHACHA20_POLY1305_SHA256",
        }
    }
}

/// One direction's key, IV and record counter.
struct DirectionKey {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    /// Sequence number of the next record.
    seq: u64,
    /// Records this key may protect in all (the suite's confidentiality limit).
    limit: u64,
    direction: &'static str,
}

impl DirectionKey {
    fn new(
        suite: Suite,
        key: &[u8],
        iv: [u8; NONCE_LEN],
        seq: u64,
        limit: u64,
        direction: &'static str,
    ) -> Result<Self, RecordError> {
        let unbound = UnboundKey::new(suite.algorithm(), key)
            .map_err(|_| RecordError::BadKey { suite: suite.tls_name(), len: key.len() })?;
        Ok(Self { key: LessSafeKey::new(unbound), iv, seq, limit, direction })
    }

    /// The nonce for the next record, and the counter moved past it.
    ///
    /// SECURITY: the nonce is the IV XOR the 64-bit sequence number (RFC
    /// 8446 §5.3); the counter only ever increases and stops at the limit,
    /// so no nonce is ever used twice under one key and the key never
    /// protects more records than its cipher's confidentiality limit.
    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        if self.seq >= self.limit {
            return Err(RecordError::KeyExhausted { direction: self.direction, limit: self.limit });
        }
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

fn header(content_len: usize) -> [u8; HEADER_LEN] {
    let l = (content_len as u16).to_be_bytes();
    [APPLICATION_DATA, LEGACY_VERSION[0], LEGACY_VERSION[1], l[0], l[1]]
}

fn from_secrets(
    secrets: &ConnectionTrafficSecrets,
) -> Result<(Suite, &[u8], [u8; 12]), RecordError> {
    let (suite, key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Suite::Aes128Gcm, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Suite::Aes256Gcm, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (Suite::Chacha20Poly1305, key, iv)
        }
        _ => return Err(RecordError::UnsupportedSuite),
    };
    let iv: [u8; NONCE_LEN] = iv.as_ref().try_into().map_err(|_| RecordError::UnsupportedSuite)?;
    Ok((suite, key.as_ref(), iv))
}

/// Seals the records we send.
pub struct Sealer {
    dir: DirectionKey,
    suite: Suite,
}

impl Sealer {
    /// A sealer for `key`/`iv` whose next record is number `seq`; it refuses
    /// to seal record number `limit` or later.
    pub fn new(
        suite: Suite,
        key: &[u8],
        iv: [u8; NONCE_LEN],
        seq: u64,
        limit: u64,
    ) -> Result<Self, RecordError> {
        Ok(Self { dir: DirectionKey::new(suite, key, iv, seq, limit, "sending")?, suite })
    }

    pub fn from_secrets(
        secrets: &ConnectionTrafficSecrets,
        seq: u64,
        limit: u64,
    ) -> Result<Self, RecordError> {
        let (suite, key, iv) = from_secrets(secrets)?;
        Self::new(suite, key, iv, seq, limit)
    }

    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// Seal one record in place. `record` is laid out as it goes on the
    /// wire: [`HEADER_LEN`] bytes for the header, the plaintext, then
    /// [`TRAILER_LEN`] bytes of room for the content type and the tag.
    pub fn seal(&mut self, record: &mut [u8], content_type: u8) -> Result<(), RecordError> {
        let Some(len) = record.len().checked_sub(HEADER_LEN + TRAILER_LEN) else {
            return Err(RecordError::NoRoom(record.len()));
        };
        if len > MAX_PLAINTEXT {
            return Err(RecordError::RecordOverflow(len));
        }
        let head = header(len + TRAILER_LEN);
        record[..HEADER_LEN].copy_from_slice(&head);
        let inner_end = HEADER_LEN + len + 1;
        record[inner_end - 1] = content_type;
        let nonce = self.dir.next_nonce()?;
        let tag = self
            .dir
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(head), &mut record[HEADER_LEN..inner_end])
            .map_err(|_| RecordError::SealFailed)?;
        record[inner_end..].copy_from_slice(tag.as_ref());
        Ok(())
    }
}

/// A record's body length from its header, checked before it is read.
pub fn body_len(head: &[u8; HEADER_LEN]) -> Result<usize, RecordError> {
    if head[0] != APPLICATION_DATA {
        return Err(RecordError::UnexpectedRecordType(head[0]));
    }
    if head[1..3] != LEGACY_VERSION {
        return Err(RecordError::BadVersion(u16::from_be_bytes([head[1], head[2]])));
    }
    let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
    if len > MAX_CIPHERTEXT {
        return Err(RecordError::RecordOverflow(len));
    }
    if len < TRAILER_LEN {
        return Err(RecordError::RecordTooShort(len));
    }
    Ok(len)
}

/// Opens the records we receive.
pub struct Opener {
    dir: DirectionKey,
}

/// What an opened record held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub content_type: u8,
    /// Plaintext bytes, at the start of the buffer given to [`Opener::open_into`].
    pub len: usize,
}

impl Opener {
    pub fn new(
        suite: Suite,
        key: &[u8],
        iv: [u8; NONCE_LEN],
        seq: u64,
        limit: u64,
    ) -> Result<Self, RecordError> {
        Ok(Self { dir: DirectionKey::new(suite, key, iv, seq, limit, "receiving")? })
    }

    pub fn from_secrets(
        secrets: &ConnectionTrafficSecrets,
        seq: u64,
        limit: u64,
    ) -> Result<Self, RecordError> {
        let (suite, key, iv) = from_secrets(secrets)?;
        Self::new(suite, key, iv, seq, limit)
    }

    /// Open `record` (header included, checked with [`body_len`]) into
    /// `out`, which must have room for its body less the tag: one pass over
    /// the ciphertext, which stays as it was.
    ///
    /// SECURITY: nothing of the record counts as received unless the tag
    /// verified over the header and the whole body
    /// (`rustls::Error::DecryptError` otherwise, as rustls reports it).
    pub fn open_into(&mut self, record: &[u8], out: &mut [u8]) -> Result<Opened, OpenError> {
        let head: [u8; HEADER_LEN] = record
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(OpenError::Record(RecordError::NoRoom(record.len())))?;
        let len = body_len(&head).map_err(OpenError::Record)?;
        if record.len() != HEADER_LEN + len {
            return Err(OpenError::Record(RecordError::NoRoom(record.len())));
        }
        let (ciphertext, tag) = record[HEADER_LEN..].split_at(len - TAG_LEN);
        let room = out.len();
        let inner =
            out.get_mut(..ciphertext.len()).ok_or(OpenError::Record(RecordError::NoRoom(room)))?;
        let nonce = self.dir.next_nonce().map_err(OpenError::Record)?;
        self.dir
            .key
            .open_separate_gather(nonce, Aad::from(head), ciphertext, tag, inner)
            .map_err(|_| OpenError::Tls(rustls::Error::DecryptError))?;
        // The inner plaintext is content, content type, then zero padding.
        let Some(type_at) = inner.iter().rposition(|&b| b != 0) else {
            return Err(OpenError::Record(RecordError::NoContentType));
        };
        if type_at > MAX_PLAINTEXT {
            return Err(OpenError::Record(RecordError::RecordOverflow(type_at)));
        }
        Ok(Opened { content_type: inner[type_at], len: type_at })
    }
}

/// Why a record could not be opened: a TLS failure as rustls names it (so
/// `ferry_identity::describe_tls_error` describes it), or a record-layer one.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Tls(rustls::Error),
    #[error(transparent)]
    Record(RecordError),
}

impl From<OpenError> for std::io::Error {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Tls(t) => std::io::Error::new(std::io::ErrorKind::InvalidData, t),
            OpenError::Record(r) => r.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rustls::crypto::cipher::{
        AeadKey, InboundOpaqueMessage, Iv, OutboundChunks, OutboundPlainMessage,
    };
    use rustls::{ContentType, ProtocolVersion};

    const KEY: [u8; 32] = [7; 32];
    const IV: [u8; 12] = [9; 12];

    fn rustls_suite(suite: Suite) -> &'static rustls::Tls13CipherSuite {
        use rustls::crypto::aws_lc_rs::cipher_suite as cs;
        let s = match suite {
            Suite::Aes256Gcm => cs::TLS13_AES_256_GCM_SHA384,
            Suite::Chacha20Poly1305 => cs::TLS13_CHACHA20_POLY1305_SHA256,
            Suite::Aes128Gcm => cs::TLS13_AES_128_GCM_SHA256,
        };
        s.tls13().unwrap()
    }

    /// Open `rec` the way the reader does; the plaintext replaces `rec`.
    fn open(o: &mut Opener, rec: &mut Vec<u8>) -> Result<Opened, OpenError> {
        let mut out = vec![0u8; rec.len()];
        let opened = o.open_into(rec, &mut out)?;
        out.truncate(opened.len);
        *rec = out;
        Ok(opened)
    }

    fn seal_one(s: &mut Sealer, plain: &[u8]) -> Vec<u8> {
        let mut rec = vec![0u8; HEADER_LEN + plain.len() + TRAILER_LEN];
        rec[HEADER_LEN..HEADER_LEN + plain.len()].copy_from_slice(plain);
        s.seal(&mut rec, APPLICATION_DATA).unwrap();
        rec
    }

    /// Our records are rustls's records and back, for the suites whose
    /// 32-byte keys rustls lets a test build (AES-128 is covered by the
    /// handshake tests, with keys from a real connection).
    #[test]
    fn records_interoperate_with_rustls_in_both_directions() {
        for suite in [Suite::Aes256Gcm, Suite::Chacha20Poly1305] {
            let alg = rustls_suite(suite).aead_alg;
            let mut ours = Sealer::new(suite, &KEY, IV, 5, u64::MAX).unwrap();
            let mut theirs = alg.decrypter(AeadKey::from(KEY), Iv::from(IV));
            for (seq, plain) in [(5u64, &b"hello"[..]), (6, &[0u8; MAX_PLAINTEXT][..])] {
                let mut rec = seal_one(&mut ours, plain);
                let (head, body) = rec.split_at_mut(HEADER_LEN);
                assert_eq!(head[..3], [23, 3, 3]);
                let msg = InboundOpaqueMessage::new(
                    ContentType::ApplicationData,
                    ProtocolVersion::TLSv1_2,
                    body,
                );
                let got = theirs.decrypt(msg, seq).unwrap();
                assert_eq!(got.typ, ContentType::ApplicationData);
                assert_eq!(got.payload, plain, "{suite:?}");
            }

            let mut enc = alg.encrypter(AeadKey::from(KEY), Iv::from(IV));
            let mut opener = Opener::new(suite, &KEY, IV, 0, u64::MAX).unwrap();
            for plain in [&b"from rustls"[..], &[1u8; 1000][..]] {
                let chunks = [plain];
                let msg = OutboundPlainMessage {
                    typ: ContentType::ApplicationData,
                    version: ProtocolVersion::TLSv1_2,
                    payload: OutboundChunks::new(&chunks),
                };
                let seq = opener.dir.seq;
                let mut wire = enc.encrypt(msg, seq).unwrap().encode();
                let opened = open(&mut opener, &mut wire).unwrap();
                assert_eq!(opened.content_type, APPLICATION_DATA);
                assert_eq!(&wire[..opened.len], plain);
            }
        }
    }

    #[test]
    fn opening_leaves_the_record_as_it_was() {
        let mut s = Sealer::new(Suite::Aes256Gcm, &KEY, IV, 0, u64::MAX).unwrap();
        let mut o = Opener::new(Suite::Aes256Gcm, &KEY, IV, 0, u64::MAX).unwrap();
        let rec = seal_one(&mut s, b"first");
        let mut out = [0u8; 64];
        let kept = rec.clone();
        let opened = o.open_into(&rec, &mut out).unwrap();
        assert_eq!(&out[..opened.len], b"first");
        assert_eq!(rec, kept);
        let e = o.open_into(&seal_one(&mut s, &[1; 100]), &mut out).unwrap_err();
        assert!(matches!(e, OpenError::Record(RecordError::NoRoom(64))), "{e:?}");
    }

    #[test]
    fn any_flipped_bit_is_refused_as_a_decrypt_error() {
        let mut s = Sealer::new(Suite::Aes256Gcm, &KEY, IV, 0, u64::MAX).unwrap();
        let rec = seal_one(&mut s, b"guest memory");
        for i in 0..rec.len() * 8 {
            let mut bad = rec.clone();
            bad[i / 8] ^= 1 << (i % 8);
            let mut o = Opener::new(Suite::Aes256Gcm, &KEY, IV, 0, u64::MAX).unwrap();
            match open(&mut o, &mut bad) {
                Err(OpenError::Tls(rustls::Error::DecryptError)) => {}
                // A flipped header bit (type, version, length) is refused
                // before decryption.
                Err(OpenError::Record(_)) if i / 8 < HEADER_LEN => {}
                other => panic!("bit {i}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_replayed_or_reordered_record_does_not_open() {
        let mut s = Sealer::new(Suite::Aes128Gcm, &KEY[..16], IV, 0, u64::MAX).unwrap();
        let one = seal_one(&mut s, b"one");
        let two = seal_one(&mut s, b"two");
        let mut o = Opener::new(Suite::Aes128Gcm, &KEY[..16], IV, 0, u64::MAX).unwrap();
        assert!(open(&mut o, &mut one.clone()).is_ok());
        let replay = open(&mut o, &mut one.clone()).unwrap_err();
        assert!(matches!(replay, OpenError::Tls(rustls::Error::DecryptError)), "{replay:?}");
        let mut o = Opener::new(Suite::Aes128Gcm, &KEY[..16], IV, 0, u64::MAX).unwrap();
        assert!(open(&mut o, &mut two.clone()).is_err(), "record 1 opened as record 0");
    }

    #[test]
    fn a_key_stops_at_its_limit_in_both_directions() {
        let mut s = Sealer::new(Suite::Aes256Gcm, &KEY, IV, 0, 2).unwrap();
        let mut o = Opener::new(Suite::Aes256Gcm, &KEY, IV, 0, 2).unwrap();
        for _ in 0..2 {
            let mut r = seal_one(&mut s, b"x");
            open(&mut o, &mut r).unwrap();
        }
        let mut rec = vec![0u8; HEADER_LEN + 1 + TRAILER_LEN];
        let e = s.seal(&mut rec, APPLICATION_DATA).unwrap_err();
        assert!(matches!(e, RecordError::KeyExhausted { limit: 2, .. }), "{e}");
        let mut s3 = Sealer::new(Suite::Aes256Gcm, &KEY, IV, 2, 3).unwrap();
        let mut third = seal_one(&mut s3, b"y");
        let e = open(&mut o, &mut third).unwrap_err();
        assert!(matches!(e, OpenError::Record(RecordError::KeyExhausted { .. })), "{e}");
    }

    #[test]
    fn hostile_headers_are_refused_before_any_work() {
        assert!(matches!(body_len(&[22, 3, 3, 0, 40]), Err(RecordError::UnexpectedRecordType(22))));
        assert!(matches!(body_len(&[23, 3, 1, 0, 40]), Err(RecordError::BadVersion(0x0301))));
        assert!(matches!(body_len(&[23, 3, 3, 0x41, 1]), Err(RecordError::RecordOverflow(_))));
        assert!(matches!(body_len(&[23, 3, 3, 0, 16]), Err(RecordError::RecordTooShort(16))));
        assert_eq!(body_len(&[23, 3, 3, 0x41, 0]).unwrap(), MAX_CIPHERTEXT);
    }

    /// Seal an inner plaintext exactly as given (content, type, padding).
    fn seal_inner(s: &mut Sealer, inner: &[u8]) -> Vec<u8> {
        let head = header(inner.len() + TAG_LEN);
        let mut rec = head.to_vec();
        rec.extend_from_slice(inner);
        let nonce = s.dir.next_nonce().unwrap();
        let tag = s
            .dir
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(head), &mut rec[HEADER_LEN..])
            .unwrap();
        rec.extend_from_slice(tag.as_ref());
        rec
    }

    #[test]
    fn padding_is_stripped_and_an_all_padding_record_refused() {
        let mut s = Sealer::new(Suite::Aes256Gcm, &KEY, IV, 0, u64::MAX).unwrap();
        let mut o = Opener::new(Suite::Aes256Gcm, &KEY, IV, 0, u64::MAX).unwrap();
        let mut rec = seal_inner(&mut s, &[b'a', b'b', APPLICATION_DATA, 0, 0, 0]);
        let opened = open(&mut o, &mut rec).unwrap();
        assert_eq!(opened, Opened { content_type: APPLICATION_DATA, len: 2 });
        assert_eq!(&rec[..2], b"ab");
        let mut rec = seal_inner(&mut s, &[0; 4]);
        let e = open(&mut o, &mut rec).unwrap_err();
        assert!(matches!(e, OpenError::Record(RecordError::NoContentType)), "{e:?}");
    }
}
