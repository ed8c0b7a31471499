//! The cluster CA: a directory of PEM files that any other PKI could also
//! supply.
//!
//! ```text
//! <dir>/ca.pem       CA certificate (the trust anchor every agent loads)
//! <dir>/ca.key       CA private key, mode 0600
//! <dir>/crl.pem      current CRL, rewritten atomically on each revocation
//! <dir>/issued.json  serial -> what was issued, and whether it is revoked
//! ```
//!
//! Concurrent `issue`/`revoke` runs on one CA directory are not serialized:
//! the CA is operated by one person at a time from one machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_types::{HostName, OperatorName, SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::fsutil::{self, KEY_MODE, PUBLIC_MODE};
use crate::pem;
use crate::x509;
use crate::IdentityError;

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const CRL: &str = "crl.pem";
const REGISTRY: &str = "issued.json";

/// How far back a new certificate's not_before is put, so that a peer whose
/// clock is a little behind the CA's does not see it as "not yet valid".
const BACKDATE: Duration = Duration::hours(1);

/// The verifiers do not enforce a CRL's nextUpdate (see `tls.rs`), so this
/// is only informational for other tools reading crl.pem.
const CRL_LIFETIME: Duration = Duration::days(365);

/// When a certificate is valid. Tests build expired ones directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// Valid from (a little before) now for `days` days.
    pub fn days(days: u32) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity { not_before: now - BACKDATE, not_after: now + Duration::days(i64::from(days)) }
    }

    fn check(&self) -> Result<(), IdentityError> {
        if self.not_before >= self.not_after {
            return Err(IdentityError::EmptyValidity {
                not_before: self.not_before,
                not_after: self.not_after,
            });
        }
        Ok(())
    }
}

/// Files and facts of a newly issued certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: String,
    pub spiffe: SpiffeId,
}

/// What to revoke: a certificate file, or a serial (hex, colons allowed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevokeTarget {
    CertFile(PathBuf),
    Serial(String),
}

/// One line of issued.json.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedRecord {
    /// The SPIFFE id, as text.
    pub spiffe: String,
    /// The subject common name (host or operator name).
    pub subject: String,
    /// Operators only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// When it was revoked, if it was.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revoked: Option<OffsetDateTime>,
}

/// A cluster CA directory.
#[derive(Clone, Debug)]
pub struct CaDir(PathBuf);

impl CaDir {
    /// Create a new CA for `domain` in `dir` (created if missing, mode 0700).
    /// Refuses if `dir` already holds a CA certificate or key: overwriting a
    /// CA would silently cut every host of the cluster off.
    pub fn init(
        dir: &Path,
        domain: &TrustDomain,
        validity_days: u32,
    ) -> Result<CaDir, IdentityError> {
        for name in [CA_CERT, CA_KEY] {
            let existing = dir.join(name);
            if existing.exists() {
                return Err(IdentityError::CaExists { dir: dir.to_owned(), existing });
            }
        }
        fsutil::create_private_dir(dir)?;
        let key = new_key("the CA key")?;
        let validity = Validity::days(validity_days);

        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "Ferry");
        // A unique subject per CA: webpki picks candidate issuers by name, so
        // a foreign CA with the *same* name makes a foreign certificate fail
        // as "bad signature" instead of the clearer "unknown issuer".
        let tag: String = x509::serial_hex(serial.as_ref()).chars().take(12).collect();
        params.distinguished_name.push(DnType::CommonName, format!("Ferry CA {domain} {tag}"));
        // pathlen 0: this CA signs leaves only. A leaf key that leaks can
        // then never mint further certificates that chain to it.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        // The trust domain travels with the CA certificate, so `trust_domain`
        // and `Identity::load` can check that leaves belong to it.
        params.subject_alt_names = vec![uri_san(&format!("spiffe://{domain}"))?];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(serial);
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.self_signed(&key).map_err(gen("the CA certificate"))?;

        // The key is written first and with O_EXCL: of two concurrent `init`s
        // only one can claim the directory.
        fsutil::write_new(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), KEY_MODE)?;
        fsutil::write_atomic(&dir.join(CA_CERT), cert.pem().as_bytes(), PUBLIC_MODE)?;
        let ca = CaDir(dir.to_owned());
        ca.save_registry(&BTreeMap::new())?;
        ca.write_crl(&BTreeMap::new())?;
        Ok(ca)
    }

    /// Open an existing CA directory.
    pub fn open(dir: &Path) -> Result<CaDir, IdentityError> {
        for name in [CA_CERT, CA_KEY] {
            std::fs::metadata(dir.join(name))
                .map_err(|source| IdentityError::NoCa { dir: dir.to_owned(), source })?;
        }
        Ok(CaDir(dir.to_owned()))
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }
    pub fn cert_path(&self) -> PathBuf {
        self.0.join(CA_CERT)
    }
    pub fn crl_path(&self) -> PathBuf {
        self.0.join(CRL)
    }

    /// The trust domain named in the CA certificate.
    pub fn trust_domain(&self) -> Result<TrustDomain, IdentityError> {
        let path = self.cert_path();
        let der = pem::first_cert(&path)?;
        match x509::ca_domain(&der) {
            Ok(Some(d)) => Ok(d),
            Ok(None) => Err(IdentityError::Invalid {
                path,
                why: "the CA certificate names no spiffe://<trust domain> URI SAN".into(),
            }),
            Err(why) => Err(IdentityError::Invalid { path, why }),
        }
    }

    /// Everything this CA has issued, by serial.
    pub fn issued(&self) -> Result<BTreeMap<String, IssuedRecord>, IdentityError> {
        let path = self.0.join(REGISTRY);
        let bytes = fsutil::read(&path)?;
        serde_json::from_slice(&bytes).map_err(|e| IdentityError::Parse {
            path,
            what: "the issued-certificate registry",
            source: Box::new(e),
        })
    }

    /// Issue a host certificate into `out_dir/<name>.pem` and `<name>.key`.
    ///
    /// It names the host twice: URI SAN `spiffe://<domain>/host/<name>` (what
    /// Ferry checks) and DNS SAN `<name>` (what rustls's server-name check
    /// can match, since webpki ignores URI SANs). EKU serverAuth and
    /// clientAuth: an agent both accepts and opens connections.
    pub fn issue_host(
        &self,
        name: &HostName,
        validity: Validity,
        out_dir: &Path,
    ) -> Result<IssuedCert, IdentityError> {
        // A name rustls cannot verify as a server name would yield a
        // certificate no client could ever connect to.
        crate::tls::server_name(name)?;
        let domain = self.trust_domain()?;
        let spiffe = SpiffeId::Host { domain, name: name.clone() };
        let mut params = leaf_params(name.as_str(), &spiffe, validity)?;
        params
            .subject_alt_names
            .push(SanType::DnsName(name.as_str().try_into().map_err(gen("the host DNS SAN"))?));
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, spiffe, None, out_dir, name.as_str())
    }

    /// Issue an operator certificate carrying `role` as the subject OU.
    /// EKU clientAuth only: an operator certificate cannot serve as an agent.
    pub fn issue_operator(
        &self,
        name: &OperatorName,
        role: &str,
        validity: Validity,
        out_dir: &Path,
    ) -> Result<IssuedCert, IdentityError> {
        if !x509::valid_role(role) {
            return Err(IdentityError::InvalidRole { role: role.chars().take(40).collect() });
        }
        let domain = self.trust_domain()?;
        let spiffe = SpiffeId::Operator { domain, name: name.clone() };
        let mut params = leaf_params(name.as_str(), &spiffe, validity)?;
        params.distinguished_name.push(DnType::OrganizationalUnitName, role);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, spiffe, Some(role.to_owned()), out_dir, name.as_str())
    }

    fn issue(
        &self,
        params: CertificateParams,
        spiffe: SpiffeId,
        role: Option<String>,
        out_dir: &Path,
        file_stem: &str,
    ) -> Result<IssuedCert, IdentityError> {
        let issuer = self.issuer()?;
        let key = new_key("a leaf key")?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(gen(format!("the certificate for {spiffe}")))?;
        let serial =
            x509::serial_hex(params.serial_number.as_ref().map(|s| s.as_ref()).unwrap_or_default());

        // Record the certificate before handing it out: a certificate that
        // exists but is missing from the registry could not be revoked by serial.
        let mut reg = self.issued()?;
        reg.insert(
            serial.clone(),
            IssuedRecord {
                spiffe: spiffe.to_string(),
                subject: file_stem.to_owned(),
                role,
                not_before: params.not_before,
                not_after: params.not_after,
                revoked: None,
            },
        );
        self.save_registry(&reg)?;

        fsutil::create_private_dir(out_dir)?;
        let cert_path = out_dir.join(format!("{file_stem}.pem"));
        let key_path = out_dir.join(format!("{file_stem}.key"));
        // SECURITY: the private key is created 0600 (never briefly wider).
        fsutil::write_atomic(&key_path, key.serialize_pem().as_bytes(), KEY_MODE)?;
        fsutil::write_atomic(&cert_path, cert.pem().as_bytes(), PUBLIC_MODE)?;
        Ok(IssuedCert { cert: cert_path, key: key_path, serial, spiffe })
    }

    /// Revoke a certificate this CA issued and rewrite crl.pem with the next
    /// CRL number. Revoking twice is harmless (the first time is kept).
    /// Running agents pick the new CRL up at their next connection.
    pub fn revoke(&self, target: RevokeTarget) -> Result<(), IdentityError> {
        let serial = match &target {
            RevokeTarget::Serial(s) => {
                x509::normalize_serial(s).ok_or_else(|| IdentityError::UnknownSerial {
                    dir: self.0.clone(),
                    serial: s.chars().take(64).collect(),
                })?
            }
            RevokeTarget::CertFile(path) => {
                let der = pem::first_cert(path)?;
                let cert = x509::parse(&der)
                    .map_err(|why| IdentityError::Invalid { path: path.clone(), why })?;
                x509::serial_hex(cert.raw_serial())
            }
        };
        let mut reg = self.issued()?;
        // Only serials we issued: a typo must not "succeed" by revoking nothing.
        let Some(rec) = reg.get_mut(&serial) else {
            return Err(IdentityError::UnknownSerial { dir: self.0.clone(), serial });
        };
        rec.revoked.get_or_insert_with(OffsetDateTime::now_utc);
        // Registry first: if the CRL write fails, revoking again rebuilds it.
        self.save_registry(&reg)?;
        self.write_crl(&reg)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, IdentityError> {
        let key_path = self.0.join(CA_KEY);
        let key_pem = String::from_utf8(fsutil::read(&key_path)?).map_err(|e| {
            IdentityError::Parse { path: key_path.clone(), what: "the CA key", source: Box::new(e) }
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| IdentityError::Parse {
            path: key_path,
            what: "the CA key",
            source: Box::new(e),
        })?;
        let cert_path = self.cert_path();
        let der = pem::first_cert(&cert_path)?;
        Issuer::from_ca_cert_der(&der, key).map_err(|e| IdentityError::Parse {
            path: cert_path,
            what: "the CA certificate",
            source: Box::new(e),
        })
    }

    fn save_registry(&self, reg: &BTreeMap<String, IssuedRecord>) -> Result<(), IdentityError> {
        let path = self.0.join(REGISTRY);
        let json = serde_json::to_vec_pretty(reg).map_err(|e| IdentityError::Write {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        fsutil::write_atomic(&path, &json, PUBLIC_MODE)
    }

    /// Write crl.pem listing every revoked serial, numbered one past the
    /// current crl.pem (1 for the first).
    fn write_crl(&self, reg: &BTreeMap<String, IssuedRecord>) -> Result<(), IdentityError> {
        let path = self.crl_path();
        let number = match path.exists() {
            true => current_crl_number(&path)? + 1,
            false => 1,
        };
        let now = OffsetDateTime::now_utc();
        let mut revoked_certs = Vec::new();
        for (serial, rec) in reg {
            let Some(when) = rec.revoked else { continue };
            let bytes = hex::decode(serial).map_err(|e| IdentityError::Parse {
                path: self.0.join(REGISTRY),
                what: "a serial number",
                source: Box::new(e),
            })?;
            revoked_certs.push(rcgen::RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: when,
                reason_code: None,
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + CRL_LIFETIME,
            crl_number: SerialNumber::from_slice(&trimmed_be(number)),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer()?).map_err(gen("the CRL"))?;
        let pem = crl.pem().map_err(gen("the CRL"))?;
        fsutil::write_atomic(&path, pem.as_bytes(), PUBLIC_MODE)
    }
}

/// The CRL number of an existing crl.pem.
pub fn current_crl_number(path: &Path) -> Result<u64, IdentityError> {
    let der = pem::first_crl(path)?;
    let bad = |why: String| IdentityError::Invalid { path: path.to_owned(), why };
    let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| bad(format!("not a CRL: {e}")))?;
    let n = crl.crl_number().ok_or_else(|| bad("the CRL has no CRL number".into()))?;
    let bytes = n.to_bytes_be();
    if bytes.len() > 8 {
        return Err(bad("the CRL number does not fit in 64 bits".into()));
    }
    Ok(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
}

fn trimmed_be(n: u64) -> Vec<u8> {
    let b = n.to_be_bytes();
    let start = b.iter().position(|x| *x != 0).unwrap_or(7);
    b[start..].to_vec()
}

fn leaf_params(
    cn: &str,
    spiffe: &SpiffeId,
    validity: Validity,
) -> Result<CertificateParams, IdentityError> {
    validity.check()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "Ferry");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names = vec![uri_san(&spiffe.to_string())?];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    params.key_identifier_method = KeyIdMethod::Sha256;
    Ok(params)
}

fn uri_san(uri: &str) -> Result<SanType, IdentityError> {
    Ok(SanType::URI(uri.try_into().map_err(gen(format!("the URI SAN {uri}")))?))
}

/// All keys are ECDSA P-256: fast, small, and supported by every TLS stack.
fn new_key(what: &str) -> Result<KeyPair, IdentityError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen(what))
}

/// 128 random bits, positive and without a leading zero byte, so that the
/// DER encoding, the registry key and `serial_hex` of a parsed certificate
/// all agree. Random serials also make issued certificates unpredictable.
fn random_serial() -> Result<SerialNumber, IdentityError> {
    let mut b = [0u8; 16];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut b)
        .map_err(|_| IdentityError::Random { what: "a serial number" })?;
    b[0] &= 0x7f;
    if b[0] == 0 {
        b[0] = 1;
    }
    Ok(SerialNumber::from_slice(&b))
}

fn gen(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> IdentityError {
    let what = what.into();
    move |source| IdentityError::Generate { what, source }
}
