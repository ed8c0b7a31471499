//! PEM loading with the file's path in every error.

use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::fsutil;
use crate::IdentityError;

fn parse_err(
    path: &Path,
    what: &'static str,
) -> impl FnOnce(rustls_pki_types::pem::Error) -> IdentityError {
    let path = path.to_owned();
    move |e| IdentityError::Parse { path, what, source: Box::new(e) }
}

/// All certificates in a PEM file, in order; at least one.
pub(crate) fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let bytes = fsutil::read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(parse_err(path, "certificates"))?;
    if certs.is_empty() {
        return Err(IdentityError::Missing { path: path.to_owned(), what: "PEM certificate" });
    }
    Ok(certs)
}

pub(crate) fn first_cert(path: &Path) -> Result<CertificateDer<'static>, IdentityError> {
    let mut certs = certs(path)?;
    Ok(certs.swap_remove(0))
}

/// The private key (PKCS#8, SEC1 or PKCS#1) in a PEM file.
pub(crate) fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, IdentityError> {
    let bytes = fsutil::read(path)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(k) => Ok(k),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            Err(IdentityError::Missing { path: path.to_owned(), what: "PEM private key" })
        }
        Err(e) => Err(parse_err(path, "the private key")(e)),
    }
}

/// All CRLs in a PEM file; at least one.
pub(crate) fn crls(
    path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, IdentityError> {
    let bytes = fsutil::read(path)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(parse_err(path, "CRLs"))?;
    if crls.is_empty() {
        return Err(IdentityError::Missing { path: path.to_owned(), what: "PEM CRL" });
    }
    Ok(crls)
}

pub(crate) fn first_crl(
    path: &Path,
) -> Result<CertificateRevocationListDer<'static>, IdentityError> {
    let mut crls = crls(path)?;
    Ok(crls.swap_remove(0))
}
