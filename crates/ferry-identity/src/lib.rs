//! Ferry identity: the cluster CA (init, issue host and operator
//! certificates, revoke), loading an identity, rustls configs for mutually
//! authenticated TLS 1.3, and checking who the peer is (requirement R2).
//!
//! How the pieces fit:
//! - `CaDir` writes PEM files (`ca.pem`, `ca.key`, `crl.pem`) any PKI could
//!   also supply, plus a registry `issued.json`.
//! - `Identity::load` + `TlsConfigs` give the rustls configs an agent uses;
//!   they re-read `crl.pem` when it changes.
//! - After a handshake, `authenticate_host` (or `peer_identity`) turns the
//!   verified peer certificate into a Ferry identity, and `channel_binding`
//!   gives the exporter value messages are bound to.
//!
//! Why a separate SPIFFE check: webpki matches DNS SANs only, so the
//! handshake checks the host's DNS SAN and we check the URI SAN afterwards.

mod ca;
mod ciphers;
mod describe;
mod error;
mod fsutil;
mod identity;
mod peer;
mod pem;
mod tls;
mod x509;

pub use ca::{current_crl_number, CaDir, IssuedCert, IssuedRecord, RevokeTarget, Validity};
pub use ciphers::{CipherPolicy, Tls13Suite};
pub use describe::{describe_rustls_error, describe_tls_error};
pub use error::{BoxError, IdentityError};
pub use identity::{ChainProblem, Identity};
pub use peer::{
    authenticate_host, channel_binding, peer_identity, ChannelBinding, PeerAuthenticated,
    PeerIdentity, TlsSession, BINDING_LABEL,
};
pub use tls::{client_config, server_config, server_name, TlsConfigs, ALPN};
pub use x509::{normalize_serial, serial_hex, valid_role, MAX_ROLE};
