//! The on-disk form of one audit record, and the walk that checks a
//! sequence of them (used by `AuditLog::open`, `verify_log` and bundles).
//!
//! One record is one line:
//!
//! ```text
//! {"record":{"seq":N,"prev":"<hex BLAKE3 of the previous line>","ts":"<RFC 3339>","host":"spiffe://...","cert":"<b64 DER, optional>","event":{...}},"sig":"<b64>"}
//! ```
//!
//! The signature covers `"ferry-signed-v1\0audit_record\0"` + the exact bytes
//! of the `record` value, and the line must be exactly that object with no
//! extra whitespace, so that every byte of a line is either signed or fixed.
//! The `prev` hash covers the previous *line* (signature included), so a
//! valid signature on the last record vouches for every record before it.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;

use crate::error::{MessageFault, RecordFault};
use crate::signed::{signing_input, verify_with_cert, CaTrust};
use crate::AuditEvent;

/// Kind used in the signing input of audit records: distinct from every
/// protocol message kind, so a record signature can never be presented as
/// an Offer's or a Receipt's, nor the other way round.
pub(crate) const RECORD_KIND: &str = "audit_record";
/// Longest line accepted: bounds memory when reading a hostile file.
pub(crate) const MAX_LINE: usize = 4 << 20;
/// `prev` of the genesis record.
pub(crate) const GENESIS_PREV: [u8; 32] = [0; 32];

/// The signed part of a record. Field order is the serialisation order.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct Record<E> {
    pub seq: u64,
    pub prev: String,
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    pub host: String,
    /// The host certificate (base64 DER): on the genesis record and whenever
    /// the host's certificate changed (renewal) since the record before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    pub event: E,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineRepr<'a> {
    #[serde(borrow)]
    record: &'a RawValue,
    sig: String,
}

/// Render a line (without the newline) from the record JSON and signature.
pub(crate) fn render_line(record_json: &str, sig: &[u8]) -> String {
    format!("{{\"record\":{record_json},\"sig\":\"{}\"}}", B64.encode(sig))
}

pub(crate) fn line_hash(line: &[u8]) -> [u8; 32] {
    *blake3::hash(line).as_bytes()
}

/// A syntactically valid line.
#[derive(Debug, Clone)]
pub(crate) struct Parsed {
    /// The exact bytes of the `record` value: what was signed.
    pub raw: String,
    pub record: Record<AuditEvent>,
    pub sig: Vec<u8>,
    /// BLAKE3 of the whole line, without its newline.
    pub hash: [u8; 32],
}

pub(crate) fn parse_line(line: &[u8]) -> Result<Parsed, RecordFault> {
    let text = std::str::from_utf8(line).map_err(|_| RecordFault::Malformed("not UTF-8".into()))?;
    let repr: LineRepr<'_> =
        serde_json::from_str(text).map_err(|e| RecordFault::Malformed(e.to_string()))?;
    let sig = B64
        .decode(&repr.sig)
        .map_err(|e| RecordFault::Malformed(format!("sig is not base64: {e}")))?;
    // SECURITY: every byte outside the signed `record` value is fixed: the
    // line must be re-renderable byte for byte, so nothing unsigned (extra
    // whitespace, a reordered key) can be slipped in.
    if render_line(repr.record.get(), &sig) != text {
        return Err(RecordFault::NotCanonical);
    }
    let record: Record<AuditEvent> = serde_json::from_str(repr.record.get())
        .map_err(|e| RecordFault::Malformed(e.to_string()))?;
    Ok(Parsed { raw: repr.record.get().to_owned(), record, sig, hash: line_hash(line) })
}

/// Read lines (without `\n`) from a reader, each with whether it ended in a
/// newline. Lines longer than `MAX_LINE` are an error.
pub(crate) struct Lines<R> {
    reader: R,
    pub line_no: u64,
}

impl<R: std::io::BufRead> Lines<R> {
    pub fn new(reader: R) -> Self {
        Lines { reader, line_no: 0 }
    }

    /// `Ok(None)` at end of file; `Ok(Some((bytes, complete)))` otherwise.
    pub fn next_line(&mut self) -> std::io::Result<Option<(Vec<u8>, bool)>> {
        let mut buf = Vec::new();
        // take() bounds the read even if the file is one huge line.
        let limit = u64::try_from(MAX_LINE + 1).unwrap_or(u64::MAX);
        let n = std::io::Read::take(&mut self.reader, limit).read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        self.line_no += 1;
        let complete = buf.last() == Some(&b'\n');
        if complete {
            buf.pop();
        }
        Ok(Some((buf, complete)))
    }
}

use std::io::BufRead as _;

/// How much `Walker::step` checks.
#[derive(Clone, Copy)]
pub(crate) enum Depth<'a> {
    /// Sequence, chain and certificate identity only; signatures are checked
    /// by the caller where needed (the log tail when resuming).
    Structure,
    /// Everything, against the CA: certificate chains at each record's time,
    /// every record signature, every embedded signed message.
    Full(&'a CaTrust),
}

/// The certificate in force and what was learnt from it.
#[derive(Clone, Debug)]
pub(crate) struct CertInForce {
    pub der: Vec<u8>,
    pub host: String,
    not_before: i64,
    not_after: i64,
}

impl CertInForce {
    fn from_der(der: Vec<u8>, host: String) -> Result<Self, RecordFault> {
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| RecordFault::Untrusted(format!("not an X.509 certificate: {e}")))?;
        let v = cert.validity();
        let (not_before, not_after) = (v.not_before.timestamp(), v.not_after.timestamp());
        Ok(CertInForce { der, host, not_before, not_after })
    }
}

/// State carried from one record to the next.
#[derive(Debug, Clone)]
pub(crate) struct Walker {
    pub next_seq: u64,
    pub prev_hash: [u8; 32],
    pub cert: Option<CertInForce>,
}

impl Walker {
    pub fn new() -> Self {
        Walker { next_seq: 0, prev_hash: GENESIS_PREV, cert: None }
    }

    /// Check the record that follows the last one stepped over.
    pub fn step(&mut self, p: &Parsed, depth: Depth<'_>) -> Result<(), RecordFault> {
        let r = &p.record;
        // SECURITY: seq numbers are dense from 0, so a deleted, inserted or
        // reordered record shows up here, at the first record out of place.
        if r.seq != self.next_seq {
            return Err(RecordFault::Sequence { expected: self.next_seq, found: r.seq });
        }
        // SECURITY: the hash chain pins the exact bytes of the line before;
        // an edit anywhere before this record breaks the chain here even if
        // that record's own signature was somehow replaced.
        if r.prev != hex::encode(self.prev_hash) {
            return Err(RecordFault::Chain);
        }
        self.step_unchained(p, depth)?;
        self.next_seq += 1;
        self.prev_hash = p.hash;
        Ok(())
    }

    /// Everything but sequence and chain (for bundles, which hold only some
    /// records of a log).
    pub fn step_unchained(&mut self, p: &Parsed, depth: Depth<'_>) -> Result<(), RecordFault> {
        let r = &p.record;
        if let Some(b64) = &r.cert {
            let der = B64
                .decode(b64)
                .map_err(|e| RecordFault::Malformed(format!("cert is not base64: {e}")))?;
            let host = match depth {
                Depth::Full(ca) => {
                    ca.check_host_cert(&der, r.ts).map_err(RecordFault::Untrusted)?.to_string()
                }
                Depth::Structure => crate::signed::host_of(&der).map_err(RecordFault::Untrusted)?,
            };
            // SECURITY: a log belongs to one host for its whole life; a
            // record carrying another host's certificate is a splice.
            if let Some(prev) = &self.cert {
                if prev.host != host {
                    return Err(RecordFault::OtherHost {
                        expected: prev.host.clone(),
                        found: host,
                    });
                }
            }
            self.cert = Some(CertInForce::from_der(der, host)?);
        }
        let Some(cert) = &self.cert else {
            return Err(RecordFault::NoCertificate);
        };
        if r.host != cert.host {
            return Err(RecordFault::OtherHost {
                expected: cert.host.clone(),
                found: r.host.clone(),
            });
        }
        if let Depth::Full(ca) = depth {
            // The certificate must have been valid when the record was made.
            // (The time is the signer's own claim: a key holder could
            // backdate, which no log without a trusted clock can prevent.)
            let t = r.ts.unix_timestamp();
            if t < cert.not_before || t > cert.not_after {
                return Err(RecordFault::Untrusted(format!(
                    "the host certificate was not valid at the record's time {}",
                    r.ts
                )));
            }
            self.check_signature(p)?;
            if let Some(msg) = &r.event.signed {
                msg.check(ca, r.ts).map_err(RecordFault::Embedded)?;
                // SECURITY: a record about migration A must not be able to
                // carry B's message, or the bundle and cross-check of A would
                // be built from someone else's evidence.
                if let Some(mid) = msg.body_migration_id() {
                    if r.event.migration_id.as_deref() != Some(mid.as_str()) {
                        return Err(RecordFault::MigrationMismatch {
                            record: r.event.migration_id.clone(),
                            message: mid,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The record's signature under the certificate in force.
    pub fn check_signature(&self, p: &Parsed) -> Result<(), RecordFault> {
        let Some(cert) = &self.cert else {
            return Err(RecordFault::NoCertificate);
        };
        verify_with_cert(&cert.der, &signing_input(RECORD_KIND, p.raw.as_bytes()), &p.sig).map_err(
            |f| match f {
                MessageFault::BadSignature => RecordFault::BadSignature,
                other => RecordFault::Other(other.to_string()),
            },
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn line(record: &str) -> String {
        render_line(record, b"\x30\x06\x02\x01\x01\x02\x01\x01")
    }

    #[test]
    fn only_the_canonical_rendering_parses() {
        let rec = r#"{"seq":0,"prev":"00","ts":"2026-01-01T00:00:00Z","host":"h","event":{"kind":"x","migration_id":null,"vm":null,"peer":null,"detail":null,"signed":null}}"#;
        let good = line(rec);
        let p = parse_line(good.as_bytes()).unwrap();
        assert_eq!(p.raw, rec);
        assert_eq!(p.hash, line_hash(good.as_bytes()));
        for bad in [
            good.replacen(",\"sig\"", ", \"sig\"", 1),
            format!(" {good}"),
            good.replacen("{\"record\"", "{\"sig\":\"\",\"record\"", 1),
        ] {
            assert!(parse_line(bad.as_bytes()).is_err(), "{bad}");
        }
        // Unknown fields inside the record are refused, not ignored.
        let extra = line(&rec.replacen("{\"seq\"", "{\"x\":1,\"seq\"", 1));
        assert!(matches!(parse_line(extra.as_bytes()), Err(RecordFault::Malformed(_))));
    }

    #[test]
    fn lines_reports_torn_and_overlong_lines() {
        let mut l = Lines::new(std::io::Cursor::new(b"a\nbc".to_vec()));
        assert_eq!(l.next_line().unwrap(), Some((b"a".to_vec(), true)));
        assert_eq!(l.next_line().unwrap(), Some((b"bc".to_vec(), false)));
        assert_eq!(l.next_line().unwrap(), None);
        assert_eq!(l.line_no, 2);
        let mut l = Lines::new(std::io::Cursor::new(vec![b'x'; MAX_LINE + 10]));
        let (bytes, complete) = l.next_line().unwrap().unwrap();
        assert!(!complete && bytes.len() == MAX_LINE + 1);
    }
}
