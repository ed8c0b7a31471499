//! Every way attestation can fail, each naming what it is about: the host, the
//! PCR, the file. These messages end up in migration records and in front of
//! operators, so "verification failed" alone is never good enough.

use std::path::PathBuf;

use ferry_types::HostName;

/// Why a quote, an enrollment or a TPM operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// A PCR in the quote differs from the host's reference value: the
    /// platform runs something other than what was approved.
    #[error("{host}: PCR {pcr} is {actual}, reference value is {expected}")]
    PcrMismatch { host: HostName, pcr: u8, expected: String, actual: String },
    /// The quote's qualifying data is not the one derived from this channel,
    /// this migration and this role: a replayed or relayed quote.
    #[error(
        "{host}: quote is not bound to this channel, migration and role (qualifying data mismatch)"
    )]
    BindingMismatch { host: HostName },
    /// No AK is enrolled for the host the peer claims to be.
    #[error("{host}: no attestation key is enrolled for this host")]
    NotEnrolled { host: HostName },
    /// The AK handed to `verify` was enrolled for a different host.
    #[error("{host}: the attestation key offered was enrolled for host {enrolled_for}")]
    AkHostMismatch { host: HostName, enrolled_for: HostName },
    /// The signature does not verify under the enrolled AK.
    #[error("{host}: quote signature does not verify under the enrolled attestation key")]
    BadSignature { host: HostName },
    /// The quote covers a different PCR selection than the reference policy.
    #[error("{host}: quote covers PCRs {quoted:?} in the SHA-256 bank, reference values name {expected:?}")]
    SelectionMismatch { host: HostName, quoted: Vec<u8>, expected: Vec<u8> },
    /// The reported PCR values do not hash to the digest the TPM signed.
    #[error("{host}: reported PCR values do not match the PCR digest the TPM signed")]
    PcrDigestMismatch { host: HostName },
    /// The host has no class (or its class no values) in the reference file.
    #[error("{host}: no reference values for this host")]
    NoReferenceValues { host: HostName },
    /// Bytes from a peer or a file do not parse as the structure they claim to be.
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
    /// Input larger than its named limit; refused before it is decoded.
    #[error("{what} is {len} bytes, over the limit of {max}")]
    TooLarge { what: &'static str, len: usize, max: usize },
    /// The EK certificate does not chain to a trusted TPM-manufacturer CA.
    #[error("EK certificate not trusted: {why}")]
    UntrustedEk { why: String },
    /// No TPM answered at this TCTI; `why` says what was found there and
    /// `hint` what to pass instead.
    #[error("cannot open the TPM at {tcti}: {why}; {hint}")]
    TpmUnreachable { tcti: String, why: String, hint: String },
    /// The AK public area is not a restricted, TPM-resident P-256 signing key.
    #[error("attestation key refused: {why}")]
    UnsuitableAk { why: String },
    /// Credential activation did not prove that the AK lives in the EK's TPM.
    #[error("enrollment of {host} refused: credential activation failed: {why}")]
    ActivationFailed { host: HostName, why: String },
    /// A PCR index outside 0..=23.
    #[error("PCR index {pcr} is out of range (0..=23)")]
    BadPcrIndex { pcr: u8 },
    /// The TCTI string could not be parsed.
    #[error("invalid TCTI {tcti:?}: {why}")]
    BadTcti { tcti: String, why: String },
    /// A TPM command failed.
    #[error("TPM {tcti}: {op} failed")]
    Tpm {
        tcti: String,
        op: &'static str,
        #[source]
        source: tss_esapi::Error,
    },
    /// A configuration, registry or reference-value file is invalid.
    #[error("{path}: {why}")]
    Config { path: PathBuf, why: String },
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// swtpm or swtpm_setup could not be run or did not come up.
    #[error("swtpm: {why}")]
    Swtpm { why: String },
}

impl AttestError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AttestError::Io { path: path.into(), source }
    }

    pub(crate) fn malformed(what: &'static str, why: impl Into<String>) -> Self {
        AttestError::Malformed { what, why: why.into() }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, why: impl Into<String>) -> Self {
        AttestError::Config { path: path.into(), why: why.into() }
    }
}
