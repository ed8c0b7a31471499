//! What a quote looks like on the wire, and the qualifying data that binds it
//! to one channel, one migration and one role.
//!
//! Evidence arrives from a peer that has not yet been attested, so decoding is
//! defensive: the whole message is size-checked before serde sees it, and every
//! byte field is length-checked as a string before it is hex-decoded, so a
//! hostile peer cannot make us allocate more than a few kilobytes.

use std::collections::BTreeMap;
use std::fmt;

use ferry_types::MigrationId;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::AttestError;

/// Largest TPMS_ATTEST accepted. A quote is ~150 bytes; the TPM's own upper
/// bound (sizeof TPMS_ATTEST) is under 2 KiB.
pub const MAX_ATTEST: usize = 2048;
/// Largest TPMT_SIGNATURE accepted (ECDSA P-256 is 72 bytes; room for RSA-4096).
pub const MAX_SIGNATURE: usize = 1024;
/// PCRs a TPM has (0..=23); also the largest number of PCR values accepted.
pub const MAX_PCRS: usize = 24;
/// Largest encoded Evidence accepted, checked before decoding.
pub const MAX_EVIDENCE_JSON: usize = 16 * 1024;

/// Domain separation for the qualifying data: a hash made for anything else
/// can never be mistaken for one made here.
const QD_CONTEXT: &[u8] = b"ferry quote v1";

/// Which end of a migration made the quote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuoteRole {
    Source,
    Destination,
}

impl QuoteRole {
    fn byte(self) -> u8 {
        match self {
            QuoteRole::Source => 1,
            QuoteRole::Destination => 2,
        }
    }
}

/// Qualifying data for a quote:
/// SHA-256("ferry quote v1" || tls_exporter(32) || migration_id(16) || role).
///
/// Security: the exporter is unique to one TLS connection, so a quote relayed
/// from another connection (a man in the middle with its own valid host cert)
/// or replayed from an earlier session cannot match; the migration id stops
/// reuse across migrations on one connection; the role byte stops a peer from
/// reflecting our own quote back to us as its own.
pub fn qualifying_data(
    exporter: &[u8; 32],
    migration_id: &MigrationId,
    role: QuoteRole,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(QD_CONTEXT);
    h.update(exporter);
    h.update(migration_id.as_bytes());
    h.update([role.byte()]);
    h.finalize().into()
}

/// A TPM quote as it travels: TPMS_ATTEST and TPMT_SIGNATURE exactly as the
/// TPM produced them, plus the SHA-256 PCR values the quote covers (the quote
/// itself carries only their digest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    #[serde(with = "hex_attest")]
    pub attest: Vec<u8>,
    #[serde(with = "hex_signature")]
    pub signature: Vec<u8>,
    #[serde(serialize_with = "ser_pcrs", deserialize_with = "de_pcrs")]
    pub pcrs: BTreeMap<u8, [u8; 32]>,
}

impl Evidence {
    /// Encode as JSON (the control channel's format).
    pub fn to_json(&self) -> Result<Vec<u8>, AttestError> {
        serde_json::to_vec(self).map_err(|e| AttestError::malformed("evidence", e.to_string()))
    }

    /// Decode from JSON, refusing oversized input before parsing it.
    pub fn from_json(bytes: &[u8]) -> Result<Self, AttestError> {
        if bytes.len() > MAX_EVIDENCE_JSON {
            return Err(AttestError::TooLarge {
                what: "evidence",
                len: bytes.len(),
                max: MAX_EVIDENCE_JSON,
            });
        }
        serde_json::from_slice(bytes).map_err(|e| AttestError::malformed("evidence", e.to_string()))
    }

    /// The field limits, for evidence that did not come through `from_json`
    /// (e.g. embedded in a larger message).
    pub(crate) fn check_limits(&self) -> Result<(), AttestError> {
        let too_large = |what, len, max| {
            if len > max {
                Err(AttestError::TooLarge { what, len, max })
            } else {
                Ok(())
            }
        };
        too_large("attest", self.attest.len(), MAX_ATTEST)?;
        too_large("signature", self.signature.len(), MAX_SIGNATURE)?;
        too_large("pcr values", self.pcrs.len(), MAX_PCRS)?;
        if let Some(&pcr) = self.pcrs.keys().find(|&&p| usize::from(p) >= MAX_PCRS) {
            return Err(AttestError::BadPcrIndex { pcr });
        }
        Ok(())
    }
}

/// Hex-decode a string of at most `max` bytes, checking the length first.
fn bounded_hex<E: de::Error>(s: &str, max: usize, what: &str) -> Result<Vec<u8>, E> {
    if s.len() > max * 2 {
        return Err(E::custom(format_args!("{what} longer than {max} bytes")));
    }
    hex::decode(s).map_err(|e| E::custom(format_args!("{what}: {e}")))
}

struct BoundedHex {
    max: usize,
    what: &'static str,
}

impl Visitor<'_> for BoundedHex {
    type Value = Vec<u8>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a hex string of at most {} bytes", self.max)
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Vec<u8>, E> {
        bounded_hex(s, self.max, self.what)
    }
}

macro_rules! hex_field {
    ($module:ident, $max:expr, $what:literal) => {
        mod $module {
            use super::*;
            pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&hex::encode(v))
            }
            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
                d.deserialize_str(BoundedHex { max: $max, what: $what })
            }
        }
    };
}
hex_field!(hex_attest, MAX_ATTEST, "attest");
hex_field!(hex_signature, MAX_SIGNATURE, "signature");

fn ser_pcrs<S: Serializer>(pcrs: &BTreeMap<u8, [u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(pcrs.iter().map(|(k, v)| (k.to_string(), hex::encode(v))))
}

struct PcrMapVisitor;

impl<'de> Visitor<'de> for PcrMapVisitor {
    type Value = BTreeMap<u8, [u8; 32]>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a map of at most {MAX_PCRS} PCR indices to SHA-256 hex values")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        // Keys and values are read as borrowed-or-transient strings and the
        // count is capped as we go, so a huge map fails early and cheaply.
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if out.len() >= MAX_PCRS {
                return Err(de::Error::custom(format_args!("more than {MAX_PCRS} PCR values")));
            }
            let pcr: u8 = key
                .parse()
                .ok()
                .filter(|&p: &u8| usize::from(p) < MAX_PCRS)
                .ok_or_else(|| de::Error::custom(format_args!("invalid PCR index {key:?}")))?;
            let value: std::borrow::Cow<'de, str> = map.next_value()?;
            let bytes = bounded_hex::<A::Error>(&value, 32, "PCR value")?;
            let arr: [u8; 32] = bytes
                .try_into()
                .map_err(|_| de::Error::custom(format_args!("PCR {pcr} value is not 32 bytes")))?;
            if out.insert(pcr, arr).is_some() {
                return Err(de::Error::custom(format_args!("PCR {pcr} given twice")));
            }
        }
        Ok(out)
    }
}

fn de_pcrs<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u8, [u8; 32]>, D::Error> {
    d.deserialize_map(PcrMapVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualifying_data_separates_roles_exporters_and_migrations() {
        let m1 = MigrationId::new();
        let m2 = MigrationId::new();
        let a = qualifying_data(&[1; 32], &m1, QuoteRole::Source);
        assert_ne!(a, qualifying_data(&[1; 32], &m1, QuoteRole::Destination));
        assert_ne!(a, qualifying_data(&[2; 32], &m1, QuoteRole::Source));
        assert_ne!(a, qualifying_data(&[1; 32], &m2, QuoteRole::Source));
        assert_eq!(a, qualifying_data(&[1; 32], &m1, QuoteRole::Source));
    }

    #[test]
    fn evidence_round_trips_and_refuses_junk() {
        let e = Evidence {
            attest: vec![1, 2, 3],
            signature: vec![4],
            pcrs: BTreeMap::from([(0, [7; 32]), (7, [8; 32])]),
        };
        let json = e.to_json().expect("encode");
        assert_eq!(Evidence::from_json(&json).expect("decode"), e);

        let unknown = br#"{"attest":"","signature":"","pcrs":{},"extra":1}"#;
        assert!(Evidence::from_json(unknown).is_err());
        let bad_pcr = br#"{"attest":"","signature":"","pcrs":{"24":"00"}}"#;
        assert!(Evidence::from_json(bad_pcr).is_err());
        let long_attest =
            format!(r#"{{"attest":"{}","signature":"","pcrs":{{}}}}"#, "00".repeat(MAX_ATTEST + 1));
        assert!(Evidence::from_json(long_attest.as_bytes()).is_err());
        let huge = vec![b' '; MAX_EVIDENCE_JSON + 1];
        assert!(matches!(Evidence::from_json(&huge), Err(AttestError::TooLarge { .. })));
    }
}
