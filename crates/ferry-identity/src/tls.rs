//! rustls configurations for Ferry's mutually authenticated TLS 1.3, and a
//! holder that rebuilds them when the CRL file changes.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_types::HostName;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateRevocationListDer, ServerName};

use crate::{pem, CipherPolicy, Identity, IdentityError};

/// The one application protocol both sides speak.
pub const ALPN: &[u8] = b"ferry/1";

/// Ferry always uses aws-lc-rs explicitly rather than the process default
/// provider: another crate in the same binary enabling rustls's `ring`
/// feature must not change (or, with no default installed, panic) our TLS.
/// Only the policy's TLS 1.3 suites are offered, in its order.
pub(crate) fn provider(ciphers: &CipherPolicy) -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: ciphers.rustls_suites(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    })
}

/// The name a client asks rustls to verify: the host's DNS SAN. The SPIFFE id
/// is checked separately after the handshake (`authenticate_host`).
///
/// Fails for the few valid host names that rustls reads as IP-address-like
/// (all-numeric, `0x1f`); `CaDir::issue_host` refuses those names too.
pub fn server_name(host: &HostName) -> Result<ServerName<'static>, IdentityError> {
    match rustls_pki_types::DnsName::try_from(host.as_str().to_owned()) {
        Ok(name) => Ok(ServerName::DnsName(name)),
        Err(_) => Err(IdentityError::UnusableHostName { host: host.clone() }),
    }
}

fn load_crls(id: &Identity) -> Result<Vec<CertificateRevocationListDer<'static>>, IdentityError> {
    match &id.crl {
        Some(p) => pem::crls(p),
        None => Ok(Vec::new()),
    }
}

/// Server side of an agent.
///
/// SECURITY invariants:
/// - TLS 1.3 only: no downgrade to 1.2's weaker handshake (R2, R4).
/// - A client certificate is REQUIRED and verified against the cluster CA
///   and the CRL; a client whose revocation status cannot be determined is
///   refused (fail closed). Verifying also requires EKU clientAuth.
/// - No 0-RTT (`max_early_data_size = 0`): early data is replayable (R5).
/// - No session resumption (no tickets, no session cache): every connection
///   is a full handshake, so expiry and the *current* CRL are checked on every
///   connection, never skipped by resuming an older session.
/// - Secret extraction is enabled so that ferry-tls can protect the
///   connection's records after the handshake with the same keys (the data
///   path's record layer); extracting consumes the rustls connection, and
///   the keys never leave the process.
pub fn server_config(id: &Identity) -> Result<Arc<ServerConfig>, IdentityError> {
    server_config_with(id, load_crls(id)?, &CipherPolicy::default())
}

fn server_config_with(
    id: &Identity,
    crls: Vec<CertificateRevocationListDer<'static>>,
    ciphers: &CipherPolicy,
) -> Result<Arc<ServerConfig>, IdentityError> {
    let provider = provider(ciphers);
    let mut vb = WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider.clone());
    if !crls.is_empty() {
        vb = vb.with_crls(crls);
    }
    let verifier =
        vb.build().map_err(|source| IdentityError::Verifier { side: "client", source })?;
    let tls = |source| IdentityError::TlsConfig { side: "server", source };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(tls)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.max_early_data_size = 0;
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// Client side (an agent calling another agent, or the operator CLI).
///
/// SECURITY invariants: TLS 1.3 only; the server is verified against the
/// cluster CA and the CRL (EKU serverAuth required, DNS SAN = the host name
/// given to `connect`); our own certificate is always presented; no early
/// data and no resumption, and secret extraction, as in `server_config`.
pub fn client_config(id: &Identity) -> Result<Arc<ClientConfig>, IdentityError> {
    client_config_with(id, load_crls(id)?, &CipherPolicy::default())
}

fn client_config_with(
    id: &Identity,
    crls: Vec<CertificateRevocationListDer<'static>>,
    ciphers: &CipherPolicy,
) -> Result<Arc<ClientConfig>, IdentityError> {
    let provider = provider(ciphers);
    let mut vb = WebPkiServerVerifier::builder_with_provider(id.roots.clone(), provider.clone());
    if !crls.is_empty() {
        vb = vb.with_crls(crls);
    }
    let verifier =
        vb.build().map_err(|source| IdentityError::Verifier { side: "server", source })?;
    let tls = |source| IdentityError::TlsConfig { side: "client", source };
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(tls)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.enable_early_data = false;
    cfg.resumption = Resumption::disabled();
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// What identifies one version of the CRL file. The inode is part of it
/// because the CA replaces crl.pem by rename: two rewrites within one mtime
/// tick with equal length still differ in inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CrlStamp {
    dev: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
    len: u64,
}

fn stamp(path: &Path) -> Result<CrlStamp, IdentityError> {
    let m = std::fs::metadata(path)
        .map_err(|source| IdentityError::Read { path: path.to_owned(), source })?;
    Ok(CrlStamp {
        dev: m.dev(),
        ino: m.ino(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
        len: m.size(),
    })
}

struct Cached {
    stamp: Option<CrlStamp>,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// Server and client configs for one identity, rebuilt when crl.pem changes,
/// so a revocation takes effect at the next connection without a restart.
/// Call `server()`/`client()` once per new connection: the check is one
/// `stat`.
pub struct TlsConfigs {
    identity: Identity,
    ciphers: CipherPolicy,
    cached: Mutex<Cached>,
}

impl TlsConfigs {
    pub fn new(identity: Identity) -> Result<TlsConfigs, IdentityError> {
        Self::with_ciphers(identity, CipherPolicy::default())
    }

    /// Configs that negotiate only `ciphers`' suites, in its order.
    pub fn with_ciphers(
        identity: Identity,
        ciphers: CipherPolicy,
    ) -> Result<TlsConfigs, IdentityError> {
        let cached = build(&identity, &ciphers)?;
        Ok(TlsConfigs { identity, ciphers, cached: Mutex::new(cached) })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The server config to accept the next connection with.
    pub fn server(&self) -> Result<Arc<ServerConfig>, IdentityError> {
        Ok(self.current()?.server.clone())
    }

    /// The client config to open the next connection with.
    pub fn client(&self) -> Result<Arc<ClientConfig>, IdentityError> {
        Ok(self.current()?.client.clone())
    }

    /// SECURITY: fails closed. If crl.pem has become unreadable or invalid,
    /// no new connection is made with the old (possibly now too permissive)
    /// CRL: the error is returned until the file is fixed.
    fn current(&self) -> Result<MutexGuard<'_, Cached>, IdentityError> {
        // The cache is only ever replaced whole, so a panic elsewhere while
        // the lock was held cannot have left it half-updated.
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(path) = &self.identity.crl {
            if Some(stamp(path)?) != cached.stamp {
                *cached = build(&self.identity, &self.ciphers)?;
            }
        }
        Ok(cached)
    }
}

fn build(id: &Identity, ciphers: &CipherPolicy) -> Result<Cached, IdentityError> {
    // Stamp *before* reading: a change racing with the read then shows up
    // as a stamp mismatch next time (one extra rebuild), never as a change
    // silently missed.
    let stamp = id.crl.as_deref().map(stamp).transpose()?;
    let crls = load_crls(id)?;
    Ok(Cached {
        stamp,
        server: server_config_with(id, crls.clone(), ciphers)?,
        client: client_config_with(id, crls, ciphers)?,
    })
}
