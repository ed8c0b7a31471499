//! The enrollment authority's side of AK enrollment, in pure Rust:
//! check the EK certificate against trusted TPM-manufacturer CAs, vet the AK's
//! public area, make a credential that only that EK's TPM can open and only
//! for that AK (TPM2_MakeCredential in software), and check the answer.
//!
//! The host's side (`activate_credential`) lives in `tpm.rs`. The two halves
//! exchange only the serde types below, so they can run on different machines.

use std::path::PathBuf;

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use ferry_types::HostName;
use hmac::{Hmac, Mac};
use rsa::{BigUint, Oaep, RsaPublicKey};
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::registry::{hex_bytes, read_capped, EnrolledAk};
use crate::wire::parse_ak_public;
use crate::AttestError;

/// Largest EK certificate accepted.
pub const MAX_EK_CERT: usize = 8 * 1024;
/// Largest AK public area accepted.
pub const MAX_AK_PUBLIC: usize = 1024;

/// tcg-kp-EKCertificate (2.23.133.8.1), DER content octets.
const TCG_KP_EK_CERTIFICATE: &[u8] = &[0x67, 0x81, 0x05, 0x08, 0x01];

/// What the host sends the authority to start enrollment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentRequest {
    pub host: HostName,
    /// DER EK certificate read from the TPM's NV (index 0x01c00002, RSA 2048).
    #[serde(with = "hex_bytes")]
    pub ek_cert_der: Vec<u8>,
    /// The AK's marshalled TPMT_PUBLIC.
    #[serde(with = "hex_bytes")]
    pub ak_public: Vec<u8>,
}

/// What the authority sends back: TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET
/// contents, as TPM2_ActivateCredential takes them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialChallenge {
    #[serde(with = "hex_bytes")]
    pub credential_blob: Vec<u8>,
    #[serde(with = "hex_bytes")]
    pub encrypted_secret: Vec<u8>,
}

/// The host's answer: the credential the TPM released.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationResponse {
    #[serde(with = "hex_bytes")]
    pub secret: Vec<u8>,
}

/// State the authority keeps between challenge and answer. Not serializable:
/// the secret never leaves the authority except encrypted to the EK.
pub struct PendingEnrollment {
    secret: [u8; 32],
    enrolled: EnrolledAk,
}

impl std::fmt::Debug for PendingEnrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingEnrollment")
            .field("enrolled", &self.enrolled)
            .finish_non_exhaustive()
    }
}

/// Validate the request and make a credential for it.
pub fn make_credential(
    req: &EnrollmentRequest,
    manufacturer_cas: &[PathBuf],
) -> Result<(CredentialChallenge, PendingEnrollment), AttestError> {
    if req.ek_cert_der.len() > MAX_EK_CERT {
        return Err(AttestError::TooLarge {
            what: "EK certificate",
            len: req.ek_cert_der.len(),
            max: MAX_EK_CERT,
        });
    }
    if req.ak_public.len() > MAX_AK_PUBLIC {
        return Err(AttestError::TooLarge {
            what: "AK public area",
            len: req.ak_public.len(),
            max: MAX_AK_PUBLIC,
        });
    }
    check_ek_cert(&req.ek_cert_der, manufacturer_cas)?;
    let ek = ek_public_key(&req.ek_cert_der)?;
    let ak = parse_ak_public(&req.ak_public)?;

    let mut secret = [0u8; 32];
    let mut rng = rand_core::OsRng;
    rand_core::RngCore::fill_bytes(&mut rng, &mut secret);
    let challenge = encrypt_credential(&ek, &ak.name, &secret, &mut rng)?;
    let enrolled = EnrolledAk {
        host: req.host.clone(),
        ak_public: ak.sec1,
        ak_name: ak.name,
        ek_cert_sha256: hex::encode(Sha256::digest(&req.ek_cert_der)),
    };
    Ok((challenge, PendingEnrollment { secret, enrolled }))
}

/// Accept the AK if the TPM released the right credential.
///
/// Security: only a TPM that holds the EK private key could decrypt the seed,
/// and it releases the credential only if an object whose name equals the AK
/// name we bound into the credential is loaded in that same TPM. A right
/// answer therefore proves "this AK lives in the TPM this EK certificate names".
pub fn check_activation(
    pending: PendingEnrollment,
    resp: &ActivationResponse,
) -> Result<EnrolledAk, AttestError> {
    if !bool::from(resp.secret.as_slice().ct_eq(pending.secret.as_slice())) {
        return Err(AttestError::ActivationFailed {
            host: pending.enrolled.host,
            why: "the TPM released a different credential".into(),
        });
    }
    Ok(pending.enrolled)
}

/// Check that the EK certificate chains to one of the trusted CAs.
///
/// Security: this is the root of trust for the whole enrollment — the EK
/// certificate is what says "this key is inside a genuine TPM". EK
/// certificates carry the TCG EK EKU, so we accept that EKU (when present)
/// instead of TLS ones; signatures, validity and CA constraints are checked
/// by webpki as for any chain.
pub fn check_ek_cert(ek_der: &[u8], manufacturer_cas: &[PathBuf]) -> Result<(), AttestError> {
    let untrusted = |why: String| AttestError::UntrustedEk { why };
    let mut ca_ders = Vec::new();
    for path in manufacturer_cas {
        let text = read_capped(path, 1024 * 1024)?;
        for pem in x509_parser::pem::Pem::iter_from_buffer(text.as_bytes()) {
            let pem = pem.map_err(|e| AttestError::config(path, format!("bad PEM: {e}")))?;
            if pem.label == "CERTIFICATE" {
                ca_ders.push(CertificateDer::from(pem.contents));
            }
        }
    }
    if ca_ders.is_empty() {
        return Err(untrusted("no trusted TPM-manufacturer CA configured".into()));
    }
    let anchors = ca_ders
        .iter()
        .map(|der| webpki::anchor_from_trusted_cert(der).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| untrusted(format!("a configured manufacturer CA is unusable: {e}")))?;
    let ek = CertificateDer::from(ek_der);
    let end_entity = webpki::EndEntityCert::try_from(&ek)
        .map_err(|e| untrusted(format!("cannot parse EK certificate: {e}")))?;
    // Vendors publish a root and the intermediate that signs EK
    // certificates; a bundle of both works, as does the intermediate alone.
    // Security: an intermediate is only a path-building hint, every path
    // still has to end at a certificate the operator configured.
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &ca_ders,
            UnixTime::now(),
            webpki::KeyUsage::required_if_present(TCG_KP_EK_CERTIFICATE),
            None,
            None,
        )
        .map_err(|e| untrusted(not_chained(ek_der, &e)))?;
    Ok(())
}

/// Why an EK certificate did not chain, naming its issuer (and where the
/// issuer's certificate can be fetched, if the EK certificate says), so the
/// operator knows which CA certificate to pass.
fn not_chained(ek_der: &[u8], e: &webpki::Error) -> String {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(ek_der) else {
        return format!("does not chain to a trusted TPM-manufacturer CA: {e:?}");
    };
    let issuer_url = cert
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityInfoAccess(aia) => aia
                .accessdescs
                .iter()
                .filter(|d| d.access_method.to_id_string() == "1.3.6.1.5.5.7.48.2")
                .find_map(|d| match &d.access_location {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                }),
            _ => None,
        })
        .map(|u| format!(" (its certificate: {u})"))
        .unwrap_or_default();
    format!(
        "it was issued by \"{}\"{issuer_url}, which does not chain to a trusted \
         TPM-manufacturer CA ({e:?}): pass that issuer's certificate, or a bundle of it and the \
         CAs above it, with --manufacturer-ca",
        cert.issuer()
    )
}

/// The RSA 2048 EK public key from the certificate.
///
/// Security: the credential is encrypted to the key in the *certificate*, not
/// to anything the host claims, so a host cannot substitute a software key.
fn ek_public_key(ek_der: &[u8]) -> Result<RsaPublicKey, AttestError> {
    let untrusted = |why: &str| AttestError::UntrustedEk { why: why.into() };
    let (_, cert) = x509_parser::parse_x509_certificate(ek_der)
        .map_err(|_| untrusted("cannot parse EK certificate"))?;
    let key = cert.public_key().parsed().map_err(|_| untrusted("cannot parse EK public key"))?;
    let x509_parser::public_key::PublicKey::RSA(rsa) = key else {
        return Err(untrusted("only RSA 2048 EKs are supported"));
    };
    let key = RsaPublicKey::new(
        BigUint::from_bytes_be(rsa.modulus),
        BigUint::from_bytes_be(rsa.exponent),
    )
    .map_err(|e| untrusted(&format!("bad RSA EK key: {e}")))?;
    if rsa::traits::PublicKeyParts::size(&key) != 256 {
        return Err(untrusted("only RSA 2048 EKs are supported"));
    }
    Ok(key)
}

/// TPM2_MakeCredential (TPM 2.0 Part 1 §24; Part 3 §12.6) for an RSA EK made
/// from the default template (nameAlg SHA-256, AES-128-CFB).
fn encrypt_credential(
    ek: &RsaPublicKey,
    ak_name: &[u8],
    credential: &[u8; 32],
    rng: &mut rand_core::OsRng,
) -> Result<CredentialChallenge, AttestError> {
    let fail = |why: String| AttestError::malformed("credential", why);
    // The seed is as long as the EK's nameAlg digest.
    let mut seed = [0u8; 32];
    rand_core::RngCore::fill_bytes(rng, &mut seed);
    let encrypted_secret = ek
        .encrypt(rng, Oaep::new_with_label::<Sha256, _>("IDENTITY\0"), &seed)
        .map_err(|e| fail(format!("RSA-OAEP: {e}")))?;

    // The AK name is the KDF context: the symmetric key, and so the
    // credential, exist only for that exact AK.
    let sym_key = kdfa(&seed, b"STORAGE", ak_name, 128);
    let mut enc_identity = Vec::with_capacity(2 + credential.len());
    enc_identity.extend_from_slice(&(credential.len() as u16).to_be_bytes());
    enc_identity.extend_from_slice(credential);
    cfb_mode::Encryptor::<aes::Aes128>::new_from_slices(&sym_key, &[0u8; 16])
        .map_err(|e| fail(format!("AES-CFB: {e}")))?
        .encrypt(&mut enc_identity);

    let hmac_key = kdfa(&seed, b"INTEGRITY", &[], 256);
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(&hmac_key).map_err(|e| fail(e.to_string()))?;
    mac.update(&enc_identity);
    mac.update(ak_name);
    let outer_hmac = mac.finalize().into_bytes();

    let mut credential_blob = Vec::with_capacity(2 + outer_hmac.len() + enc_identity.len());
    credential_blob.extend_from_slice(&(outer_hmac.len() as u16).to_be_bytes());
    credential_blob.extend_from_slice(&outer_hmac);
    credential_blob.extend_from_slice(&enc_identity);
    Ok(CredentialChallenge { credential_blob, encrypted_secret })
}

/// KDFa (SP 800-108 counter mode, HMAC-SHA-256) as TPM 2.0 Part 1 §11.4.10.2
/// defines it: the label is followed by a zero byte, contextV is empty here.
fn kdfa(key: &[u8], label: &[u8], context_u: &[u8], bits: u32) -> Vec<u8> {
    let bytes = (bits / 8) as usize;
    let mut out = Vec::with_capacity(bytes + 32);
    let mut counter: u32 = 1;
    while out.len() < bytes {
        // HMAC accepts keys of any length, so this cannot fail.
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(key) else {
            break;
        };
        mac.update(&counter.to_be_bytes());
        mac.update(label);
        mac.update(&[0]);
        mac.update(context_u);
        mac.update(&bits.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
        counter += 1;
    }
    out.truncate(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_params(cn: &str) -> rcgen::CertificateParams {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        p
    }

    /// A vendor root, its EK-signing intermediate, and an EK certificate.
    /// Trusting the root alone must fail naming the intermediate; the root
    /// plus the intermediate, or the intermediate alone, must pass.
    #[test]
    fn an_untrusted_ek_names_its_issuer_and_bundles_with_intermediates_work() {
        let kp = || rcgen::KeyPair::generate().expect("key");
        let root =
            rcgen::CertifiedIssuer::self_signed(ca_params("Vendor Root CA"), kp()).expect("root");
        let inter =
            rcgen::CertifiedIssuer::signed_by(ca_params("Vendor EK Issuing CA 7"), kp(), &root)
                .expect("intermediate");
        let ek = rcgen::CertificateParams::new(Vec::<String>::new())
            .expect("params")
            .signed_by(&kp(), &inter)
            .expect("ek");
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, pem: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).expect("write");
            p
        };
        let root_pem = write("root.pem", root.pem());
        let inter_pem = write("inter.pem", inter.pem());
        let bundle = write("bundle.pem", format!("{}{}", root.pem(), inter.pem()));

        let e = check_ek_cert(ek.der(), std::slice::from_ref(&root_pem)).expect_err("root only");
        let msg = e.to_string();
        assert!(msg.contains("issued by \"CN=Vendor EK Issuing CA 7\""), "{msg}");
        assert!(msg.contains("--manufacturer-ca"), "{msg}");
        check_ek_cert(ek.der(), &[bundle]).expect("root + intermediate bundle");
        check_ek_cert(ek.der(), &[root_pem, inter_pem]).expect("two files");
        let only_inter = write("only.pem", inter.pem());
        check_ek_cert(ek.der(), &[only_inter]).expect("the issuing CA alone");
    }

    #[test]
    fn kdfa_lengths() {
        assert_eq!(kdfa(b"k", b"STORAGE", b"n", 128).len(), 16);
        assert_eq!(kdfa(b"k", b"INTEGRITY", b"", 256).len(), 32);
        assert_ne!(kdfa(b"k", b"STORAGE", b"n", 128), kdfa(b"k", b"STORAGE", b"m", 128));
    }
}
