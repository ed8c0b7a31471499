//! A small, strict parser for the few TPM 2.0 structures the verifier and the
//! enrollment authority must read: TPMS_ATTEST (quote), TPMT_SIGNATURE
//! (ECDSA) and TPMT_PUBLIC (ECC). Pure Rust so that verification needs no TPM
//! and no C library; every length is checked against the remaining input
//! before it is used, and trailing bytes are refused so that one byte string
//! has exactly one meaning.

use sha2::{Digest, Sha256};

use crate::AttestError;

pub(crate) const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
pub(crate) const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
pub(crate) const TPM_ALG_SHA256: u16 = 0x000b;
pub(crate) const TPM_ALG_NULL: u16 = 0x0010;
pub(crate) const TPM_ALG_ECDSA: u16 = 0x0018;
pub(crate) const TPM_ALG_ECC: u16 = 0x0023;
pub(crate) const TPM_ECC_NIST_P256: u16 = 0x0003;

// TPMA_OBJECT bits (TPM 2.0 Part 2, 8.3).
pub(crate) const ATTR_FIXED_TPM: u32 = 1 << 1;
pub(crate) const ATTR_FIXED_PARENT: u32 = 1 << 4;
pub(crate) const ATTR_SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
pub(crate) const ATTR_RESTRICTED: u32 = 1 << 16;
pub(crate) const ATTR_DECRYPT: u32 = 1 << 17;
pub(crate) const ATTR_SIGN: u32 = 1 << 18;

/// Big-endian cursor that fails with a `Malformed` error naming the structure.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], AttestError> {
        if self.buf.len() < n {
            return Err(AttestError::malformed(
                self.what,
                format!("truncated: need {n} bytes, {} left", self.buf.len()),
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, AttestError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, AttestError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, AttestError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, AttestError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A TPM2B: u16 size then that many bytes, at most `max`.
    pub(crate) fn tpm2b(&mut self, max: usize) -> Result<&'a [u8], AttestError> {
        let n = usize::from(self.u16()?);
        if n > max {
            return Err(AttestError::malformed(
                self.what,
                format!("sized field of {n} bytes exceeds {max}"),
            ));
        }
        self.take(n)
    }

    pub(crate) fn finish(self) -> Result<(), AttestError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(AttestError::malformed(self.what, format!("{} trailing bytes", self.buf.len())))
        }
    }
}

/// The fields of a quote the verifier looks at.
#[derive(Debug)]
pub(crate) struct QuoteInfo {
    pub extra_data: Vec<u8>,
    /// PCR indices selected in the SHA-256 bank, ascending.
    pub sha256_pcrs: Vec<u8>,
    /// Whether any bank other than SHA-256 was selected (refused by verify).
    pub other_banks: bool,
    pub pcr_digest: Vec<u8>,
}

/// Parse TPMS_ATTEST, requiring the TPM-generated magic and the quote type.
pub(crate) fn parse_quote(attest: &[u8]) -> Result<QuoteInfo, AttestError> {
    let mut r = Reader::new(attest, "TPMS_ATTEST");
    // Security: the magic is what distinguishes a TPM-generated structure from
    // external data the (restricted) AK was asked to sign; restricted keys
    // refuse to sign digests of data starting with this value.
    if r.u32()? != TPM_GENERATED_VALUE {
        return Err(AttestError::malformed("TPMS_ATTEST", "magic is not TPM_GENERATED_VALUE"));
    }
    if r.u16()? != TPM_ST_ATTEST_QUOTE {
        return Err(AttestError::malformed("TPMS_ATTEST", "type is not TPM_ST_ATTEST_QUOTE"));
    }
    let _qualified_signer = r.tpm2b(2 + 64)?;
    let extra_data = r.tpm2b(64)?.to_vec();
    // clockInfo (clock u64, resetCount u32, restartCount u32, safe u8) and
    // firmwareVersion u64: not used for the decision, the channel binding
    // already gives freshness.
    r.u64()?;
    r.u32()?;
    r.u32()?;
    r.u8()?;
    r.u64()?;
    let count = r.u32()?;
    if count > 16 {
        return Err(AttestError::malformed("TPMS_ATTEST", format!("{count} PCR banks")));
    }
    let mut sha256_pcrs = Vec::new();
    let mut other_banks = false;
    let mut seen_sha256 = false;
    for _ in 0..count {
        let hash = r.u16()?;
        let size = usize::from(r.u8()?);
        if size > 4 {
            return Err(AttestError::malformed("TPMS_ATTEST", "PCR select bitmap over 4 bytes"));
        }
        let bitmap = r.take(size)?;
        let pcrs = bitmap_to_pcrs(bitmap);
        if hash == TPM_ALG_SHA256 && !seen_sha256 {
            seen_sha256 = true;
            sha256_pcrs = pcrs;
        } else if !pcrs.is_empty() {
            other_banks = true;
        }
    }
    let pcr_digest = r.tpm2b(64)?.to_vec();
    r.finish()?;
    Ok(QuoteInfo { extra_data, sha256_pcrs, other_banks, pcr_digest })
}

fn bitmap_to_pcrs(bitmap: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (byte_index, byte) in (0u8..).zip(bitmap) {
        for bit in 0..8u8 {
            if byte & (1 << bit) != 0 {
                out.push(byte_index * 8 + bit);
            }
        }
    }
    out
}

/// Parse TPMT_SIGNATURE and return r||s for ECDSA-SHA256 (64 bytes).
pub(crate) fn parse_ecdsa_signature(sig: &[u8]) -> Result<[u8; 64], AttestError> {
    let mut r = Reader::new(sig, "TPMT_SIGNATURE");
    if r.u16()? != TPM_ALG_ECDSA {
        return Err(AttestError::malformed("TPMT_SIGNATURE", "not ECDSA"));
    }
    if r.u16()? != TPM_ALG_SHA256 {
        return Err(AttestError::malformed("TPMT_SIGNATURE", "hash is not SHA-256"));
    }
    let sig_r = r.tpm2b(32)?;
    let sig_s = r.tpm2b(32)?;
    r.finish()?;
    let mut out = [0u8; 64];
    // TPM2B integers may drop leading zeros: right-align them.
    out[32 - sig_r.len()..32].copy_from_slice(sig_r);
    out[64 - sig_s.len()..].copy_from_slice(sig_s);
    Ok(out)
}

/// What the authority learns from an AK's TPMT_PUBLIC.
#[derive(Debug)]
pub(crate) struct AkPublic {
    /// SEC1 uncompressed point (0x04 || x || y).
    pub sec1: Vec<u8>,
    /// TPM name: nameAlg || SHA-256(TPMT_PUBLIC).
    pub name: Vec<u8>,
}

/// Parse and vet an AK's TPMT_PUBLIC.
///
/// Security: this is where the authority decides that the key is fit to be an
/// attestation key. Credential activation proves that a TPM holding the EK
/// also holds an object with exactly this public area (the name binds every
/// byte of it), so the attributes checked here are guarantees the TPM enforces:
/// fixedTPM (never leaves the TPM), restricted + sign (only signs
/// TPM-generated structures such as quotes, so nobody can get it to sign a
/// forged TPMS_ATTEST), not decrypt, and the only scheme ECDSA/SHA-256.
pub(crate) fn parse_ak_public(tpmt_public: &[u8]) -> Result<AkPublic, AttestError> {
    let unsuitable = |why: &str| AttestError::UnsuitableAk { why: why.to_owned() };
    let mut r = Reader::new(tpmt_public, "TPMT_PUBLIC");
    if r.u16()? != TPM_ALG_ECC {
        return Err(unsuitable("not an ECC key"));
    }
    if r.u16()? != TPM_ALG_SHA256 {
        return Err(unsuitable("name algorithm is not SHA-256"));
    }
    let attrs = r.u32()?;
    let required = ATTR_FIXED_TPM
        | ATTR_FIXED_PARENT
        | ATTR_SENSITIVE_DATA_ORIGIN
        | ATTR_RESTRICTED
        | ATTR_SIGN;
    if attrs & required != required {
        return Err(unsuitable(
            "must be fixedTPM, fixedParent, sensitiveDataOrigin, restricted and sign",
        ));
    }
    if attrs & ATTR_DECRYPT != 0 {
        return Err(unsuitable("must not be a decryption key"));
    }
    let _auth_policy = r.tpm2b(64)?;
    if r.u16()? != TPM_ALG_NULL {
        return Err(unsuitable("a signing key must have a NULL symmetric algorithm"));
    }
    if r.u16()? != TPM_ALG_ECDSA || r.u16()? != TPM_ALG_SHA256 {
        return Err(unsuitable("scheme must be ECDSA with SHA-256"));
    }
    if r.u16()? != TPM_ECC_NIST_P256 {
        return Err(unsuitable("curve must be NIST P-256"));
    }
    if r.u16()? != TPM_ALG_NULL {
        return Err(unsuitable("KDF must be NULL"));
    }
    let x = r.tpm2b(32)?;
    let y = r.tpm2b(32)?;
    r.finish()?;
    if x.len() != 32 || y.len() != 32 {
        return Err(unsuitable("ECC point coordinates must be 32 bytes"));
    }
    let mut sec1 = Vec::with_capacity(65);
    sec1.push(0x04);
    sec1.extend_from_slice(x);
    sec1.extend_from_slice(y);
    // Reject points that are not on the curve now rather than at first use.
    p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
        .map_err(|_| unsuitable("public point is not on P-256"))?;
    Ok(AkPublic { sec1, name: sha256_name(tpmt_public) })
}

/// TPM name of an object whose nameAlg is SHA-256.
pub(crate) fn sha256_name(tpmt_public: &[u8]) -> Vec<u8> {
    let mut name = TPM_ALG_SHA256.to_be_bytes().to_vec();
    name.extend_from_slice(&Sha256::digest(tpmt_public));
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_decodes_in_ascending_order() {
        assert_eq!(bitmap_to_pcrs(&[0b1000_0001, 0, 0b0000_0010]), vec![0, 7, 17]);
    }

    #[test]
    fn truncated_and_trailing_inputs_are_refused() {
        assert!(parse_quote(&[0xff, 0x54]).is_err());
        assert!(parse_ecdsa_signature(&[0, 0x18, 0, 0x0b, 0, 0, 0, 0, 1]).is_err());
        assert!(parse_ecdsa_signature(&[0, 0x18, 0, 0x0b, 0, 40]).is_err());
    }
}
