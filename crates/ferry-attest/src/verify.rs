//! Pure-Rust quote verification: no TPM, no C library.
//!
//! The order of checks matters: nothing in the quote is believed before the
//! signature by the enrolled AK has been checked over the exact bytes, and the
//! binding is checked before any PCR is compared, so a relayed quote is always
//! reported as such rather than as a PCR problem.

use ferry_types::HostName;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::refs::ReferenceValues;
use crate::registry::EnrolledAk;
use crate::wire::{parse_ecdsa_signature, parse_quote};
use crate::{AttestError, Evidence};

/// Proof that a host's evidence passed every check. Only [`verify`] can make
/// one (the private field), so code holding one knows attestation happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvidenceVerified {
    pub host: HostName,
    /// The PCRs the quote covered, all equal to their reference values.
    pub pcrs: Vec<u8>,
    attest_sha256: [u8; 32],
}

impl EvidenceVerified {
    /// SHA-256 of the verified TPMS_ATTEST: what the migration record and the
    /// audit log cite to say which quote was accepted.
    pub fn attest_sha256(&self) -> [u8; 32] {
        self.attest_sha256
    }
}

/// Verify a peer's evidence.
///
/// `ak` must be the registry entry for `host`, the host the peer's TLS
/// certificate names; `expected_qd` is [`crate::qualifying_data`] computed
/// locally from this connection's exporter, the migration id and the role the
/// peer plays.
pub fn verify(
    e: &Evidence,
    ak: &EnrolledAk,
    host: &HostName,
    expected_qd: &[u8; 32],
    refs: &ReferenceValues,
) -> Result<EvidenceVerified, AttestError> {
    // Security: an AK speaks only for the host it was enrolled for. Without
    // this, a host with its own valid AK could present its quote as another's.
    if &ak.host != host {
        return Err(AttestError::AkHostMismatch {
            host: host.clone(),
            enrolled_for: ak.host.clone(),
        });
    }
    e.check_limits()?;

    // Security: signature first, over the attest bytes exactly as received.
    // ECDSA P-256 with SHA-256 is the only scheme an enrolled AK can have.
    let key = VerifyingKey::from_sec1_bytes(&ak.ak_public)
        .map_err(|_| AttestError::malformed("enrolled AK", "public key is not a P-256 point"))?;
    let bad_sig = || AttestError::BadSignature { host: host.clone() };
    let rs = parse_ecdsa_signature(&e.signature).map_err(|_| bad_sig())?;
    let sig = Signature::from_slice(&rs).map_err(|_| bad_sig())?;
    key.verify(&e.attest, &sig).map_err(|_| bad_sig())?;

    // From here on the attest bytes are known to come from the enrolled AK's
    // TPM, and the restricted AK guarantees the TPM generated them.
    let quote = parse_quote(&e.attest)?;

    // Security: channel binding. Constant-time only out of habit; the value
    // is not secret.
    if !bool::from(quote.extra_data.as_slice().ct_eq(expected_qd.as_slice())) {
        return Err(AttestError::BindingMismatch { host: host.clone() });
    }

    let expected =
        refs.expected(host).ok_or_else(|| AttestError::NoReferenceValues { host: host.clone() })?;
    let expected_sel: Vec<u8> = expected.keys().copied().collect();
    let reported_sel: Vec<u8> = e.pcrs.keys().copied().collect();
    // Security: the TPM-signed selection, the reported values and the policy
    // must name the same PCRs; otherwise an unchecked PCR could hide a change,
    // or reported values could be for PCRs the TPM never quoted.
    if quote.other_banks || quote.sha256_pcrs != expected_sel || reported_sel != expected_sel {
        return Err(AttestError::SelectionMismatch {
            host: host.clone(),
            quoted: quote.sha256_pcrs,
            expected: expected_sel,
        });
    }

    // Security: the reported values are believed only because they hash to
    // the digest the TPM signed (values concatenated in ascending PCR order,
    // as the TPM does for a single bank).
    let mut h = Sha256::new();
    for v in e.pcrs.values() {
        h.update(v);
    }
    if h.finalize().as_slice() != quote.pcr_digest.as_slice() {
        return Err(AttestError::PcrDigestMismatch { host: host.clone() });
    }

    for (pcr, want) in expected {
        // Both maps have the same keys (checked above); a missing one is a bug
        // that must still fail closed.
        let got = e.pcrs.get(pcr).ok_or_else(|| AttestError::SelectionMismatch {
            host: host.clone(),
            quoted: reported_sel.clone(),
            expected: expected_sel.clone(),
        })?;
        if got != want {
            return Err(AttestError::PcrMismatch {
                host: host.clone(),
                pcr: *pcr,
                expected: hex::encode(want),
                actual: hex::encode(got),
            });
        }
    }

    Ok(EvidenceVerified {
        host: host.clone(),
        pcrs: expected_sel,
        attest_sha256: Sha256::digest(&e.attest).into(),
    })
}
