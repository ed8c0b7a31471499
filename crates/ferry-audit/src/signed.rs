//! Host signing keys, the CA trust anchor, and signed protocol messages.
//!
//! What a signature covers: `"ferry-signed-v1\0" + kind + "\0" + body`,
//! where `body` is the exact JSON text that travels in the message. The
//! verifier checks those bytes and only then parses them, so there is no
//! re-canonicalisation step whose quirks could make two parties disagree on
//! what was signed.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ferry_types::{SpiffeId, TrustDomain};
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey as _;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::extensions::GeneralName;

use crate::error::{AuditError, MessageFault, VerifyError};

/// Domain separation: a Ferry signature can never be mistaken for a TLS
/// handshake signature, a signature of another protocol version, or a
/// signature over a message of another kind.
const DOMAIN: &[u8] = b"ferry-signed-v1\0";
/// Longest message kind.
const MAX_KIND: usize = 32;

/// The exact bytes a signature covers.
pub(crate) fn signing_input(kind: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + kind.len() + 1 + body.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(kind.as_bytes());
    m.push(0);
    m.extend_from_slice(body);
    m
}

/// SECURITY: kinds are `[a-z0-9_]{1,32}`, so they contain no NUL and the
/// signing input `DOMAIN kind NUL body` splits into (kind, body) one way only.
pub(crate) fn check_kind(kind: &str) -> Result<(), &'static str> {
    if kind.is_empty() || kind.len() > MAX_KIND {
        return Err("must be 1 to 32 characters");
    }
    if !kind.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        return Err("may contain only a-z, 0-9 and '_'");
    }
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>, AuditError> {
    std::fs::read(path).map_err(|source| AuditError::Read { path: path.to_owned(), source })
}

fn first_cert_pem(path: &Path) -> Result<Vec<u8>, AuditError> {
    let bytes = read(path)?;
    let cert = CertificateDer::pem_slice_iter(&bytes)
        .next()
        .ok_or_else(|| AuditError::Invalid {
            path: path.to_owned(),
            why: "no PEM certificate".into(),
        })?
        .map_err(|e| AuditError::Invalid {
            path: path.to_owned(),
            why: format!("bad PEM certificate: {e}"),
        })?;
    Ok(cert.as_ref().to_vec())
}

fn parse_x509(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, String> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err("trailing bytes after the certificate".into()),
        Err(e) => Err(format!("not an X.509 certificate: {e}")),
    }
}

/// The host's SPIFFE id from a leaf certificate.
///
/// SECURITY: exactly one URI SAN, and it must be a *host* id: an operator
/// certificate (or one naming two identities) cannot sign migration
/// evidence, and a certificate cannot be read as whichever identity suits.
fn host_spiffe(der: &[u8]) -> Result<SpiffeId, String> {
    let cert = parse_x509(der)?;
    let sans = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext.value.general_names.iter().collect::<Vec<_>>(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("bad subjectAltName extension: {e}")),
    };
    let uris = sans.iter().filter_map(|g| match g {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let id = SpiffeId::from_uri_sans(uris).map_err(|e| e.to_string())?;
    if !matches!(id, SpiffeId::Host { .. }) {
        return Err(format!("{id} is not a host identity"));
    }
    // SECURITY: a certificate whose key may not sign (keyUsage without
    // digitalSignature) must not be accepted as a signer.
    if let Ok(Some(ku)) = cert.key_usage() {
        if !ku.value.digital_signature() {
            return Err("the certificate's key usage does not allow digital signatures".into());
        }
    }
    Ok(id)
}

/// A host's signing identity: its certificate and the private key bound to
/// it. Verifiers need only the CA certificate, because every signature
/// travels with (or in a log, is preceded by) the signer's certificate.
pub struct Signer {
    key: SigningKey,
    cert_der: Vec<u8>,
    spiffe: String,
}

impl std::fmt::Debug for Signer {
    // The private key is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("spiffe", &self.spiffe).finish_non_exhaustive()
    }
}

impl Signer {
    /// Load a host certificate (PEM) and its ECDSA P-256 key (PEM PKCS#8 or SEC1).
    ///
    /// SECURITY: refuses a key that does not match the certificate's public
    /// key; otherwise every signature made would name a signer whose key did
    /// not make it, and would fail verification only later, at the auditor.
    pub fn load(cert_pem: &Path, key_pem: &Path) -> Result<Signer, AuditError> {
        let cert_der = first_cert_pem(cert_pem)?;
        let key_text = String::from_utf8(read(key_pem)?).map_err(|_| AuditError::Invalid {
            path: key_pem.to_owned(),
            why: "the key file is not text".into(),
        })?;
        let secret = p256::SecretKey::from_pkcs8_pem(&key_text)
            .or_else(|_| p256::SecretKey::from_sec1_pem(&key_text))
            .map_err(|e| AuditError::Invalid {
                path: key_pem.to_owned(),
                why: format!("not an ECDSA P-256 private key in PEM: {e}"),
            })?;
        let key = SigningKey::from(secret);
        let bad_cert = |why: String| AuditError::Invalid { path: cert_pem.to_owned(), why };
        let cert = parse_x509(&cert_der).map_err(bad_cert)?;
        let ours = key.verifying_key().to_encoded_point(false);
        if cert.public_key().subject_public_key.data.as_ref() != ours.as_bytes() {
            return Err(AuditError::KeyMismatch {
                cert: cert_pem.to_owned(),
                key: key_pem.to_owned(),
            });
        }
        let spiffe = host_spiffe(&cert_der).map_err(bad_cert)?.to_string();
        Ok(Signer { key, cert_der, spiffe })
    }

    /// The host's SPIFFE id, `spiffe://<domain>/host/<name>`.
    pub fn spiffe(&self) -> &str {
        &self.spiffe
    }

    /// The host certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// ECDSA P-256 / SHA-256 signature over `msg`, ASN.1 DER.
    ///
    /// SECURITY: always low-S, and verifiers refuse high-S, so each signed
    /// message has exactly one valid signature encoding (ECDSA is otherwise
    /// malleable: (r, s) and (r, n-s) both verify) and a log line's bytes,
    /// hence its chain hash, cannot be changed without the key.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let sig: Signature = self.key.sign(msg);
        let sig = sig.normalize_s().unwrap_or(sig);
        sig.to_der().as_bytes().to_vec()
    }
}

/// The cluster CA certificate: the only thing a verifier needs.
#[derive(Clone, Debug)]
pub struct CaTrust {
    anchor: TrustAnchor<'static>,
    /// The trust domain the CA names in its URI SAN, if any; signers must
    /// belong to it.
    domain: Option<TrustDomain>,
}

impl CaTrust {
    /// Load the CA certificate (PEM; the first certificate in the file).
    pub fn load(ca_pem: &Path) -> Result<Self, AuditError> {
        let der = first_cert_pem(ca_pem)?;
        Self::from_der(&der).map_err(|why| AuditError::Invalid { path: ca_pem.to_owned(), why })
    }

    /// The CA from its DER encoding.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let cert = CertificateDer::from(der);
        let anchor = webpki::anchor_from_trusted_cert(&cert)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?
            .to_owned();
        let parsed = parse_x509(der)?;
        let mut domain = None;
        if let Ok(Some(ext)) = parsed.subject_alternative_name() {
            for g in &ext.value.general_names {
                if let GeneralName::URI(u) = g {
                    if let Some(d) = u.strip_prefix("spiffe://") {
                        let d = d.strip_suffix('/').unwrap_or(d);
                        domain = Some(d.parse().map_err(|e| format!("{e}"))?);
                    }
                }
            }
        }
        Ok(CaTrust { anchor, domain })
    }

    /// Check that `der` is a host certificate issued by this CA and valid at
    /// `at`; returns the host's SPIFFE id.
    ///
    /// SECURITY: the chain (signature, validity period, CA constraints, EKU
    /// clientAuth) is checked by webpki, the same code that checks TLS peers;
    /// revocation is deliberately not checked here: a certificate revoked
    /// *after* it signed does not make its earlier signatures false, and the
    /// agents refuse revoked peers at the handshake.
    pub(crate) fn check_host_cert(
        &self,
        der: &[u8],
        at: OffsetDateTime,
    ) -> Result<SpiffeId, String> {
        let cert = CertificateDer::from(der);
        let ee = EndEntityCert::try_from(&cert).map_err(|e| format!("not a certificate: {e}"))?;
        let secs =
            u64::try_from(at.unix_timestamp()).map_err(|_| "time before 1970".to_string())?;
        let when = UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs));
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            std::slice::from_ref(&self.anchor),
            &[],
            when,
            KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| format!("does not chain to the CA at {at}: {e}"))?;
        let id = host_spiffe(der)?;
        // SECURITY: a host of another trust domain signed by the same CA
        // (a CA shared between clusters) is not one of ours.
        if let Some(domain) = &self.domain {
            if id.domain() != domain {
                return Err(format!("{id} is outside the CA's trust domain {domain}"));
            }
        }
        Ok(id)
    }

    /// Check `sig` over `msg` with the key of `cert_der`, which must chain to
    /// this CA at `at`. Returns the signer's SPIFFE id.
    pub(crate) fn check_signature(
        &self,
        cert_der: &[u8],
        msg: &[u8],
        sig: &[u8],
        at: OffsetDateTime,
    ) -> Result<SpiffeId, MessageFault> {
        let spiffe = self.check_host_cert(cert_der, at).map_err(MessageFault::Untrusted)?;
        verify_with_cert(cert_der, msg, sig)?;
        Ok(spiffe)
    }
}

/// Check `sig` over `msg` with the public key of `cert_der` (no chain check).
pub(crate) fn verify_with_cert(
    cert_der: &[u8],
    msg: &[u8],
    sig: &[u8],
) -> Result<(), MessageFault> {
    // SECURITY: only the canonical (strict DER, low-S) encoding is accepted;
    // see `Signer::sign`.
    let parsed = Signature::from_der(sig).map_err(|_| MessageFault::BadSignature)?;
    if parsed.normalize_s().is_some() || parsed.to_der().as_bytes() != sig {
        return Err(MessageFault::BadSignature);
    }
    let cert = CertificateDer::from(cert_der);
    let ee = EndEntityCert::try_from(&cert)
        .map_err(|e| MessageFault::Untrusted(format!("not a certificate: {e}")))?;
    ee.verify_signature(webpki::aws_lc_rs::ECDSA_P256_SHA256, msg, sig)
        .map_err(|_| MessageFault::BadSignature)
}

/// A signed protocol message (offer, accept, commit, receipt, abort, ...).
///
/// `body` is JSON text and is exactly what was signed (after the domain
/// prefix); the verifier never re-serialises it. Bodies should name the
/// migration id, both hosts, the VM and the channel binding, so that a
/// signature cannot be replayed into another migration or connection
/// (the agent enforces that; this type only carries it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Signed {
    pub kind: String,
    /// JSON text of the body.
    pub body: String,
    /// Base64 (standard, padded) DER of the signer's host certificate.
    pub signer_cert: String,
    /// Base64 (standard, padded) DER ECDSA P-256/SHA-256 signature.
    pub signature: String,
}

impl Signed {
    /// Sign `body` as a message of `kind` (`[a-z0-9_]{1,32}`).
    ///
    /// The body is serialised once, here, with serde_json: struct fields come
    /// out in declaration order. Bodies must not contain `HashMap`s, whose
    /// order varies; since the verifier checks the bytes as sent this would
    /// not break verification, but it would make equal bodies compare unequal
    /// across the two logs (`cross_check`).
    pub fn sign<T: Serialize>(kind: &str, body: &T, signer: &Signer) -> Result<Signed, AuditError> {
        check_kind(kind).map_err(|why| AuditError::BadKind { kind: kind.to_owned(), why })?;
        let body = serde_json::to_string(body)
            .map_err(|source| AuditError::Encode { what: "a message body", source })?;
        let sig = signer.sign(&signing_input(kind, body.as_bytes()));
        Ok(Signed {
            kind: kind.to_owned(),
            body,
            signer_cert: B64.encode(signer.cert_der()),
            signature: B64.encode(sig),
        })
    }

    /// Verify that this is a `kind` message, its signer certificate chains to
    /// the CA and is valid now, and the signature covers kind and body.
    /// Returns the parsed body and the signer's SPIFFE id; the caller must
    /// still check that id is the host it expects.
    pub fn verify<T: DeserializeOwned>(
        &self,
        kind: &str,
        ca: &CaTrust,
    ) -> Result<(T, SpiffeId), AuditError> {
        self.verify_at(kind, ca, OffsetDateTime::now_utc())
            .map_err(|e| AuditError::Verify(Box::new(e)))
    }

    /// As `verify`, with the certificate's validity checked at `at` (e.g. the
    /// time of the audit record that holds the message, when an auditor
    /// checks old evidence after the certificate expired).
    pub fn verify_at<T: DeserializeOwned>(
        &self,
        kind: &str,
        ca: &CaTrust,
        at: OffsetDateTime,
    ) -> Result<(T, SpiffeId), VerifyError> {
        let what = || format!("signed {kind:?} message");
        // SECURITY: the kind is checked here *and* is inside the signed bytes,
        // so relabelling an Accept as a Receipt fails either way.
        if self.kind != kind {
            return Err(VerifyError::Message {
                what: what(),
                fault: MessageFault::WrongKind {
                    expected: kind.to_owned(),
                    found: self.kind.clone(),
                },
            });
        }
        let spiffe =
            self.check(ca, at).map_err(|fault| VerifyError::Message { what: what(), fault })?;
        let body = serde_json::from_str(&self.body).map_err(|e| VerifyError::Message {
            what: what(),
            fault: MessageFault::Body(e.to_string()),
        })?;
        Ok((body, spiffe))
    }

    /// Signature and chain check without an expected kind; returns the
    /// signer's SPIFFE id.
    pub(crate) fn check(&self, ca: &CaTrust, at: OffsetDateTime) -> Result<SpiffeId, MessageFault> {
        check_kind(&self.kind)
            .map_err(|why| MessageFault::Malformed(format!("kind {:?}: {why}", self.kind)))?;
        let cert = self.cert_der()?;
        let sig = B64
            .decode(&self.signature)
            .map_err(|e| MessageFault::Malformed(format!("signature is not base64: {e}")))?;
        ca.check_signature(&cert, &signing_input(&self.kind, self.body.as_bytes()), &sig, at)
    }

    pub(crate) fn cert_der(&self) -> Result<Vec<u8>, MessageFault> {
        B64.decode(&self.signer_cert)
            .map_err(|e| MessageFault::Malformed(format!("signer_cert is not base64: {e}")))
    }

    /// The SPIFFE id the signer certificate names, *without* checking it:
    /// for reports only, after `check` succeeded.
    pub(crate) fn claimed_signer(&self) -> Option<String> {
        let der = self.cert_der().ok()?;
        host_spiffe(&der).ok().map(|id| id.to_string())
    }

    /// The top-level `migration_id` string of the body, if it has one.
    pub(crate) fn body_migration_id(&self) -> Option<String> {
        body_field(&self.body, "migration_id").and_then(|v| v.as_str().map(str::to_owned))
    }
}

/// A top-level field of a JSON object body.
pub(crate) fn body_field(body: &str, field: &str) -> Option<serde_json::Value> {
    match serde_json::from_str::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut m)) => m.remove(field),
        _ => None,
    }
}

/// Path helper for messages.
pub(crate) fn display(path: &Path) -> String {
    path.display().to_string()
}

/// The host SPIFFE id a certificate names (no chain check).
pub(crate) fn host_of(der: &[u8]) -> Result<String, String> {
    host_spiffe(der).map(|id| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_cannot_contain_the_separator() {
        assert!(check_kind("offer").is_ok() && check_kind("audit_record").is_ok());
        for bad in ["", "of\0fer", "Offer", "a b", &"x".repeat(33)] {
            assert!(check_kind(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn signing_input_is_domain_separated() {
        assert_eq!(signing_input("offer", b"{}"), b"ferry-signed-v1\0offer\0{}".to_vec());
        assert_ne!(signing_input("offer", b"x"), signing_input("offe", b"rx"));
    }
}
