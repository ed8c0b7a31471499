//! The TPM side, through tss-esapi 7.7: the attestation key (AK), quotes,
//! PCR reads and extends, and the host's half of enrollment.
//!
//! Key hierarchy: the AK is an ECC P-256 restricted signing key under an ECC
//! P-256 storage root key (SRK) in the owner hierarchy. The SRK is re-derived
//! from the TPM's owner seed with a fixed template on every open (a few ms),
//! so nothing is persisted in the TPM and the AK blobs only load in the TPM
//! that created them. Credential activation does not need the AK to be a child
//! of the EK; it needs the AK and the EK loaded in the same TPM.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use ferry_types::HostName;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tss_esapi::abstraction::{ek, pcr, AsymmetricAlgorithmSelection};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, PcrHandle};
use tss_esapi::interface_types::algorithm::{
    AsymmetricAlgorithm, HashingAlgorithm, PublicAlgorithm,
};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest, DigestValues, EccPoint, EccScheme, EncryptedSecret, HashScheme, IdObject, Nonce,
    PcrSelectionList, PcrSlot, Private, Public, PublicBuilder, PublicEccParametersBuilder,
    SignatureScheme, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::Context;

use crate::credential::{
    check_activation, make_credential, ActivationResponse, CredentialChallenge, EnrollmentRequest,
};
use crate::evidence::MAX_PCRS;
use crate::registry::{hex_bytes, read_capped, write_atomic, EnrolledAk, MAX_RECORD_FILE};
use crate::{AttestError, Evidence};

/// Version tag of the key hierarchy an [`AkBlob`] belongs to; a blob from
/// another layout fails to load with a clear message instead of a TPM error.
const AK_PARENT: &str = "owner/srk-ecc-p256";

/// The AK as the host keeps it on disk (mode 0600): its public area and its
/// private area wrapped by the SRK (useless outside the TPM that made it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AkBlob {
    pub parent: String,
    /// Marshalled TPMT_PUBLIC.
    #[serde(with = "hex_bytes")]
    pub public: Vec<u8>,
    /// TPM2B_PRIVATE contents.
    #[serde(with = "hex_bytes")]
    pub private: Vec<u8>,
}

impl AkBlob {
    /// Write with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), AttestError> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| AttestError::malformed("AK blob", e.to_string()))?;
        write_atomic(path, &json, 0o600)
    }

    /// The AK's TPM name (nameAlg SHA-256 || SHA-256 of its public area), as
    /// the registry records it: equal names mean the same key.
    pub fn name(&self) -> Vec<u8> {
        crate::wire::sha256_name(&self.public)
    }

    /// Read a blob written by [`AkBlob::save`].
    pub fn load(path: &Path) -> Result<Self, AttestError> {
        let text = read_capped(path, MAX_RECORD_FILE)?;
        serde_json::from_str(&text).map_err(|e| AttestError::config(path, e.to_string()))
    }
}

fn tpm_err<'a>(
    tcti: &'a str,
    op: &'static str,
) -> impl FnOnce(tss_esapi::Error) -> AttestError + 'a {
    move |source| AttestError::Tpm { tcti: tcti.to_owned(), op, source }
}

fn connect(tcti: &str) -> Result<Context, AttestError> {
    let conf = TctiNameConf::from_str(tcti)
        .map_err(|e| AttestError::BadTcti { tcti: tcti.to_owned(), why: e.to_string() })?;
    Context::new(conf)
        .map_err(|e| crate::tcti::unreachable(tcti, &crate::tcti::probe(tcti), &e.to_string()))
}

fn ecc_p256_public(
    attrs: ObjectAttributesBuilder,
    params: PublicEccParametersBuilder,
) -> tss_esapi::Result<Public> {
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs.build()?)
        .with_ecc_parameters(params.with_curve(EccCurve::NistP256).build()?)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// Fixed SRK template: same template + same owner seed = same key, every time.
fn srk_template() -> tss_esapi::Result<Public> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true);
    let params = PublicEccParametersBuilder::new_restricted_decryption_key(
        SymmetricDefinitionObject::AES_128_CFB,
        EccCurve::NistP256,
    );
    ecc_p256_public(attrs, params)
}

/// AK template. Security: restricted + sign + fixedTPM is what makes quotes
/// from this key trustworthy; the authority re-checks every one of these
/// attributes in the public area before enrolling it (wire::parse_ak_public).
fn ak_template() -> tss_esapi::Result<Public> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_sign_encrypt(true);
    let params = PublicEccParametersBuilder::new()
        .with_symmetric(SymmetricDefinitionObject::Null)
        .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
        .with_key_derivation_function_scheme(
            tss_esapi::structures::KeyDerivationFunctionScheme::Null,
        )
        .with_is_signing_key(true)
        .with_is_decryption_key(false)
        .with_restricted(true);
    ecc_p256_public(attrs, params)
}

fn create_srk(ctx: &mut Context, tcti: &str) -> Result<KeyHandle, AttestError> {
    let template = srk_template().map_err(tpm_err(tcti, "SRK template"))?;
    ctx.execute_with_session(Some(AuthSession::Password), |c| {
        c.create_primary(Hierarchy::Owner, template, None, None, None, None)
    })
    .map(|r| r.key_handle)
    .map_err(tpm_err(tcti, "CreatePrimary(SRK)"))
}

/// Load the AK under a fresh SRK and flush the SRK (the loaded AK stays).
fn load_ak(ctx: &mut Context, tcti: &str, ak: &AkBlob) -> Result<KeyHandle, AttestError> {
    if ak.parent != AK_PARENT {
        return Err(AttestError::malformed(
            "AK blob",
            format!("parent {:?} is not {AK_PARENT:?}", ak.parent),
        ));
    }
    let public = Public::unmarshall(&ak.public).map_err(tpm_err(tcti, "unmarshal AK public"))?;
    let private = Private::try_from(ak.private.clone()).map_err(tpm_err(tcti, "AK private"))?;
    let srk = create_srk(ctx, tcti)?;
    let loaded =
        ctx.execute_with_session(Some(AuthSession::Password), |c| c.load(srk, private, public));
    // Flush even when Load failed, so transient slots are not leaked.
    let flushed = ctx.flush_context(ObjectHandle::from(srk));
    let handle = loaded.map_err(tpm_err(tcti, "Load(AK)"))?;
    flushed.map_err(tpm_err(tcti, "FlushContext(SRK)"))?;
    Ok(handle)
}

fn selection(pcrs: &[u8]) -> Result<(Vec<u8>, PcrSelectionList), AttestError> {
    let mut sorted: Vec<u8> = pcrs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.is_empty() {
        return Err(AttestError::malformed("PCR selection", "empty"));
    }
    let mut slots = Vec::with_capacity(sorted.len());
    for &p in &sorted {
        if usize::from(p) >= MAX_PCRS {
            return Err(AttestError::BadPcrIndex { pcr: p });
        }
        slots.push(PcrSlot::try_from(1u32 << p).map_err(|_| AttestError::BadPcrIndex { pcr: p })?);
    }
    let list = PcrSelectionList::builder()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|e| AttestError::malformed("PCR selection", e.to_string()))?;
    Ok((sorted, list))
}

fn read_pcrs_ctx(
    ctx: &mut Context,
    tcti: &str,
    pcrs: &[u8],
) -> Result<BTreeMap<u8, [u8; 32]>, AttestError> {
    let (wanted, list) = selection(pcrs)?;
    let data = ctx
        .execute_without_session(|c| pcr::read_all(c, list))
        .map_err(tpm_err(tcti, "PCR_Read"))?;
    let bank = data.pcr_bank(HashingAlgorithm::Sha256).ok_or_else(|| {
        AttestError::malformed("PCR_Read answer", "no SHA-256 bank (is it allocated?)")
    })?;
    let mut out = BTreeMap::new();
    for (slot, digest) in bank {
        let index = u32::from(*slot).trailing_zeros() as u8;
        let value: [u8; 32] = digest
            .value()
            .try_into()
            .map_err(|_| AttestError::malformed("PCR_Read answer", "SHA-256 PCR not 32 bytes"))?;
        out.insert(index, value);
    }
    // The TPM may silently drop PCRs it does not have; a short answer must not
    // turn into a smaller selection.
    if out.keys().copied().collect::<Vec<_>>() != wanted {
        return Err(AttestError::malformed(
            "PCR_Read answer",
            "TPM did not return every selected PCR",
        ));
    }
    Ok(out)
}

/// Current SHA-256 PCR values (for `ferry attest measure` and reference files).
pub fn read_pcrs(tcti: &str, pcrs: &[u8]) -> Result<BTreeMap<u8, [u8; 32]>, AttestError> {
    let mut ctx = connect(tcti)?;
    read_pcrs_ctx(&mut ctx, tcti, pcrs)
}

/// Extend SHA-256(`data`) into a PCR's SHA-256 bank (tests and the lab use
/// this to simulate a platform that booted something unexpected).
pub fn extend_pcr(tcti: &str, pcr: u8, data: &[u8]) -> Result<(), AttestError> {
    if usize::from(pcr) >= MAX_PCRS {
        return Err(AttestError::BadPcrIndex { pcr });
    }
    let mut ctx = connect(tcti)?;
    let handle =
        PcrHandle::try_from(u32::from(pcr)).map_err(|_| AttestError::BadPcrIndex { pcr })?;
    let digest =
        Digest::try_from(Sha256::digest(data).to_vec()).map_err(tpm_err(tcti, "digest"))?;
    let mut values = DigestValues::new();
    values.set(HashingAlgorithm::Sha256, digest);
    ctx.execute_with_session(Some(AuthSession::Password), |c| c.pcr_extend(handle, values))
        .map_err(tpm_err(tcti, "PCR_Extend"))
}

/// A TPM with the enrolled AK loaded, ready to quote.
///
/// Not `Send` (tss-esapi's context is not): the agent should own it on one
/// blocking thread.
pub struct Attester {
    ctx: Context,
    tcti: String,
    ak: KeyHandle,
}

impl std::fmt::Debug for Attester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attester").field("tcti", &self.tcti).finish_non_exhaustive()
    }
}

impl Attester {
    /// Connect to the TPM and load the AK.
    pub fn open(tcti: &str, ak: &AkBlob) -> Result<Attester, AttestError> {
        let mut ctx = connect(tcti)?;
        let handle = load_ak(&mut ctx, tcti, ak)?;
        Ok(Attester { ctx, tcti: tcti.to_owned(), ak: handle })
    }

    /// Quote the SHA-256 bank over `pcrs` with the given qualifying data and
    /// report the PCR values the quote covers.
    pub fn quote(
        &mut self,
        pcrs: &[u8],
        qualifying_data: &[u8; 32],
    ) -> Result<Evidence, AttestError> {
        let tcti = self.tcti.as_str();
        let (_, list) = selection(pcrs)?;
        let qd =
            Data::try_from(qualifying_data.to_vec()).map_err(tpm_err(tcti, "qualifying data"))?;
        let scheme =
            SignatureScheme::EcDsa { hash_scheme: HashScheme::new(HashingAlgorithm::Sha256) };
        let ak = self.ak;
        let (attest, signature) = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| c.quote(ak, qd, scheme, list))
            .map_err(tpm_err(tcti, "Quote"))?;
        // Read after quoting: if a PCR changed in between, the values will not
        // hash to the signed digest and the verifier refuses (fails closed).
        let values = read_pcrs_ctx(&mut self.ctx, tcti, pcrs)?;
        Ok(Evidence {
            attest: attest.marshall().map_err(tpm_err(tcti, "marshal TPMS_ATTEST"))?,
            signature: signature.marshall().map_err(tpm_err(tcti, "marshal TPMT_SIGNATURE"))?,
            pcrs: values,
        })
    }
}

impl Drop for Attester {
    fn drop(&mut self) {
        // Best effort: a transient object left behind is flushed by the
        // resource manager when the connection closes anyway.
        let _ = self.ctx.flush_context(ObjectHandle::from(self.ak));
    }
}

/// Host side, step 1: create an AK and gather what the authority needs.
pub fn request_enrollment(
    tcti: &str,
    host: &HostName,
) -> Result<(AkBlob, EnrollmentRequest), AttestError> {
    let mut ctx = connect(tcti)?;
    let srk = create_srk(&mut ctx, tcti)?;
    let template = ak_template().map_err(tpm_err(tcti, "AK template"))?;
    let created = ctx.execute_with_session(Some(AuthSession::Password), |c| {
        c.create(srk, template, None, None, None, None)
    });
    let flushed = ctx.flush_context(ObjectHandle::from(srk));
    let created = created.map_err(tpm_err(tcti, "Create(AK)"))?;
    flushed.map_err(tpm_err(tcti, "FlushContext(SRK)"))?;
    let public = created.out_public.marshall().map_err(tpm_err(tcti, "marshal AK public"))?;
    let blob = AkBlob {
        parent: AK_PARENT.to_owned(),
        public: public.clone(),
        private: created.out_private.value().to_vec(),
    };
    let ek_cert_der =
        ek::retrieve_ek_pubcert(&mut ctx, AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048))
            .map_err(tpm_err(tcti, "NV_Read(EK certificate)"))?;
    let ek_cert_der = trim_der(ek_cert_der);
    Ok((blob, EnrollmentRequest { host: host.clone(), ek_cert_der, ak_public: public }))
}

/// Host side, step 2: let the TPM open the authority's credential.
///
/// TPM2_ActivateCredential needs two authorizations: the AK's (a password
/// session; its auth is empty) and the EK's, whose policy (TCG default EK
/// template, policy A) is PolicySecret(endorsement hierarchy).
pub fn activate_credential(
    tcti: &str,
    host: &HostName,
    ak: &AkBlob,
    challenge: &CredentialChallenge,
) -> Result<ActivationResponse, AttestError> {
    let refused = |why: String| AttestError::ActivationFailed { host: host.clone(), why };
    let id_object = IdObject::try_from(challenge.credential_blob.clone())
        .map_err(|e| refused(format!("credential blob: {e}")))?;
    let secret = EncryptedSecret::try_from(challenge.encrypted_secret.clone())
        .map_err(|e| refused(format!("encrypted secret: {e}")))?;
    let mut ctx = connect(tcti)?;
    let ak_handle = load_ak(&mut ctx, tcti, ak)?;
    let ek_handle = ek::create_ek_object(&mut ctx, AsymmetricAlgorithm::Rsa, None)
        .map_err(tpm_err(tcti, "CreatePrimary(EK)"))?;

    let session = ctx
        .start_auth_session(
            None,
            None,
            None,
            SessionType::Policy,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .map_err(tpm_err(tcti, "StartAuthSession(policy)"))?
        .ok_or_else(|| refused("TPM returned no policy session".into()))?;
    let policy = PolicySession::try_from(session).map_err(tpm_err(tcti, "policy session"))?;
    let result = ctx
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.policy_secret(
                policy,
                AuthHandle::Endorsement,
                Nonce::default(),
                Digest::default(),
                Nonce::default(),
                None,
            )
        })
        .map_err(tpm_err(tcti, "PolicySecret(endorsement)"))
        .and_then(|_| {
            ctx.execute_with_sessions((Some(AuthSession::Password), Some(session), None), |c| {
                c.activate_credential(ak_handle, ek_handle, id_object, secret)
            })
            // A TPM error here is the TPM saying "this credential is not for
            // an AK in this TPM with this EK": that is a refusal, not a fault.
            .map_err(|e| refused(format!("the TPM would not release the credential ({e})")))
        });
    for handle in [
        ObjectHandle::from(ak_handle),
        ObjectHandle::from(ek_handle),
        ObjectHandle::from(session_handle(session)),
    ] {
        let _ = ctx.flush_context(handle);
    }
    let digest = result?;
    Ok(ActivationResponse { secret: digest.value().to_vec() })
}

/// NV indices are fixed-size and some TPMs pad the certificate after its DER
/// end; keep exactly the outer SEQUENCE so that the verifier's strict parser
/// sees one certificate. Anything unparsable is passed on untouched (and then
/// refused by the authority with a precise error).
fn trim_der(mut der: Vec<u8>) -> Vec<u8> {
    let total = match der.as_slice() {
        [0x30, n, ..] if *n < 0x80 => Some(2 + usize::from(*n)),
        [0x30, 0x81, n, ..] => Some(3 + usize::from(*n)),
        [0x30, 0x82, hi, lo, ..] => Some(4 + (usize::from(*hi) << 8 | usize::from(*lo))),
        _ => None,
    };
    if let Some(total) = total.filter(|&t| t <= der.len()) {
        der.truncate(total);
    }
    der
}

fn session_handle(session: AuthSession) -> tss_esapi::handles::SessionHandle {
    tss_esapi::handles::SessionHandle::from(session)
}

/// Enroll a host's TPM in-process (host and authority sides together, as
/// the lab does): create an AK, check the EK certificate against the trusted
/// manufacturer CAs, make and activate a credential, and return the AK blob
/// (for the host) and the enrolled AK (for the registry).
pub fn enroll(
    tcti: &str,
    host: &HostName,
    manufacturer_cas: &[std::path::PathBuf],
) -> Result<(AkBlob, EnrolledAk), AttestError> {
    let (blob, request) = request_enrollment(tcti, host)?;
    let (challenge, pending) = make_credential(&request, manufacturer_cas)?;
    let response = activate_credential(tcti, host, &blob, &challenge)?;
    let enrolled = check_activation(pending, &response)?;
    Ok((blob, enrolled))
}

#[cfg(test)]
mod tests {
    #[test]
    fn trim_der_drops_nv_padding_only() {
        let cert = vec![0x30, 0x82, 0x00, 0x02, 0xaa, 0xbb];
        let mut padded = cert.clone();
        padded.extend_from_slice(&[0xff; 10]);
        assert_eq!(super::trim_der(padded), cert);
        assert_eq!(super::trim_der(vec![0x30, 0x05, 1]), vec![0x30, 0x05, 1]);
    }
}
