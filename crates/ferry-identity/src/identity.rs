//! An agent's or operator's own identity as loaded from PEM files.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_types::{SpiffeId, TrustDomain};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{pem, tls, x509, IdentityError};

/// Own certificate chain and key, the cluster CA roots, and where the CRL is.
pub struct Identity {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) crl: Option<PathBuf>,
    spiffe: SpiffeId,
    role: Option<String>,
    serial: String,
    cert_path: PathBuf,
}

impl fmt::Debug for Identity {
    // The private key is deliberately left out: Debug output ends up in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("spiffe", &self.spiffe.to_string())
            .field("role", &self.role)
            .field("serial", &self.serial)
            .field("cert", &self.cert_path)
            .field("crl", &self.crl)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Load `cert` (own chain, leaf first), `key`, the CA certificate(s) in
    /// `ca`, and optionally the CRL path.
    ///
    /// With `crl` given, both verifiers check every peer against it and a
    /// peer whose revocation status cannot be determined is refused. Without
    /// it there is no revocation checking at all: agents should always pass
    /// one; a one-shot operator command may not have it.
    ///
    /// The certificate's validity period is deliberately not checked here: an
    /// expired identity still loads, and the *peer* refuses it (tests rely on
    /// that to exercise the peer's checks).
    pub fn load(
        cert: &Path,
        key: &Path,
        ca: &Path,
        crl: Option<&Path>,
    ) -> Result<Identity, IdentityError> {
        let chain = pem::certs(cert)?;
        let leaf = x509::leaf_info(&chain[0])
            .map_err(|why| IdentityError::Invalid { path: cert.to_owned(), why })?;
        let key_der = pem::private_key(key)?;
        // Catch a key/cert mix-up here, with both paths in the message,
        // rather than as an opaque error when the TLS config is built.
        rustls::sign::CertifiedKey::from_der(
            chain.clone(),
            key_der.clone_key(),
            &tls::provider(&crate::CipherPolicy::default()),
        )
        .map_err(|source| IdentityError::KeyMismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        })?;

        let mut roots = RootCertStore::empty();
        for ca_der in pem::certs(ca)? {
            // A CA that names its trust domain must name ours: loading a
            // certificate of cluster A with the CA of cluster B is a
            // misconfiguration that would only show up as handshake failures.
            match x509::ca_domain(&ca_der) {
                Ok(Some(d)) if &d != leaf.spiffe.domain() => {
                    return Err(IdentityError::DomainMismatch {
                        path: cert.to_owned(),
                        expected: d,
                        actual: leaf.spiffe.domain().clone(),
                    })
                }
                Ok(_) => {}
                Err(why) => return Err(IdentityError::Invalid { path: ca.to_owned(), why }),
            }
            roots.add(ca_der).map_err(|e| IdentityError::Parse {
                path: ca.to_owned(),
                what: "a CA certificate",
                source: Box::new(e),
            })?;
        }
        if let Some(crl) = crl {
            // Fail at start-up, not at the first connection.
            pem::crls(crl)?;
        }
        Ok(Identity {
            chain,
            key: key_der,
            roots: Arc::new(roots),
            crl: crl.map(Path::to_owned),
            spiffe: leaf.spiffe,
            role: leaf.role,
            serial: leaf.serial,
            cert_path: cert.to_owned(),
        })
    }

    /// Who this identity is.
    pub fn spiffe(&self) -> &SpiffeId {
        &self.spiffe
    }

    /// Our trust domain: peers must be in the same one.
    pub fn domain(&self) -> &TrustDomain {
        self.spiffe.domain()
    }

    /// The operator role, for operator identities.
    pub fn role(&self) -> Option<&str> {
        self.role.as_deref()
    }

    /// Our certificate's serial (canonical hex), for logs and revocation.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    pub fn crl_path(&self) -> Option<&Path> {
        self.crl.as_deref()
    }

    /// Whether peers would accept our own certificate as far as we can tell
    /// locally: does it chain to the CA we were given, and is it valid now?
    /// `load` deliberately checks neither (see there), so a process can
    /// start with a certificate of another CA or an expired one and say why.
    pub fn chain_problem(&self) -> Option<ChainProblem> {
        let Some(leaf) = self.chain.first() else {
            return Some(ChainProblem::NotIssuedByCa("no certificate".into()));
        };
        let leaf = match webpki::EndEntityCert::try_from(leaf) {
            Ok(l) => l,
            Err(e) => return Some(ChainProblem::NotIssuedByCa(format!("{e:?}"))),
        };
        // Only its signature algorithms are used; the suites do not matter.
        let provider = tls::provider(&crate::CipherPolicy::default());
        let verified = leaf.verify_for_usage(
            provider.signature_verification_algorithms.all,
            &self.roots.roots,
            &self.chain[1..],
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        );
        match verified {
            Ok(_) => None,
            Err(
                e @ (webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. }),
            ) => Some(ChainProblem::OutsideValidity(format!("{e:?}"))),
            Err(e) => Some(ChainProblem::NotIssuedByCa(format!("{e:?}"))),
        }
    }
}

/// Why peers would refuse an identity's own certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainProblem {
    /// Signed by the configured CA, but expired or not valid yet.
    OutsideValidity(String),
    /// Not signed by (a chain up to) any CA in the configured CA file.
    NotIssuedByCa(String),
}
