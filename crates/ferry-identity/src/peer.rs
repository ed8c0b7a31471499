//! Who is on the other end of an established connection, and the channel
//! binding both ends derive from it.

use ferry_types::{HostName, OperatorName, SpiffeId, TrustDomain};
use rustls::{ClientConnection, CommonState, Connection, ProtocolVersion, ServerConnection};

use crate::tls::ALPN;
use crate::{x509, IdentityError};

/// The authenticated identity of the peer on a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerIdentity {
    Host(HostName),
    Operator { name: OperatorName, role: String },
}

/// Read the peer's identity from its (already verified) end-entity
/// certificate.
///
/// SECURITY: the caller must have completed the handshake with a config from
/// this crate; that is what makes the certificate *verified* (chain to our CA,
/// validity, CRL, EKU). This function then enforces what webpki cannot:
/// - the session is a Ferry session: TLS 1.3 and ALPN `ferry/1` (defence in
///   depth: the configs already insist on TLS 1.3);
/// - exactly one SPIFFE id, in *our* trust domain (a CA shared with another
///   domain must not let that domain's hosts in);
/// - the identity is well formed (see `x509::leaf_info`).
pub fn peer_identity(
    conn: &CommonState,
    domain: &TrustDomain,
) -> Result<PeerIdentity, IdentityError> {
    if conn.is_handshaking() {
        return Err(IdentityError::HandshakeIncomplete);
    }
    if conn.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
        return Err(IdentityError::NotFerrySession {
            why: format!("negotiated {:?}, Ferry requires TLS 1.3", conn.protocol_version()),
        });
    }
    if conn.alpn_protocol() != Some(ALPN) {
        return Err(IdentityError::NotFerrySession {
            why: format!(
                "application protocol {:?}, expected {:?}",
                conn.alpn_protocol().map(String::from_utf8_lossy),
                String::from_utf8_lossy(ALPN)
            ),
        });
    }
    let leaf =
        conn.peer_certificates().and_then(|c| c.first()).ok_or(IdentityError::NoPeerCertificate)?;
    let info = x509::leaf_info(leaf).map_err(|why| IdentityError::PeerCertificate { why })?;
    if info.spiffe.domain() != domain {
        return Err(IdentityError::PeerDomain {
            expected: domain.clone(),
            actual: info.spiffe.domain().clone(),
        });
    }
    match info.spiffe {
        SpiffeId::Host { name, .. } => Ok(PeerIdentity::Host(name)),
        SpiffeId::Operator { name, .. } => match info.role {
            Some(role) => Ok(PeerIdentity::Operator { name, role }),
            // leaf_info always yields a role for operators; refuse rather
            // than invent one if that ever changes.
            None => Err(IdentityError::PeerCertificate {
                why: "operator certificate without a role".into(),
            }),
        },
    }
}

/// The exporter label of Ferry's channel binding (RFC 8446 §7.5, RFC 9266 style).
pub const BINDING_LABEL: &[u8] = b"EXPORTER-ferry-attestation";

/// One connection's channel binding: 32 bytes of its TLS 1.3 exporter for
/// [`BINDING_LABEL`] with an empty context. Both ends of a connection hold
/// the same value and no other connection can produce it, so a quote or a
/// signed message that carries (a hash of) it cannot be relayed or replayed
/// elsewhere (R1, R5).
///
/// Minted only by [`authenticate_host`], together with the
/// [`PeerAuthenticated`] of the same connection: whoever holds one knows
/// which authenticated peer it belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ChannelBinding([u8; 32]);

impl ChannelBinding {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for ChannelBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not a secret (both ends know it, it is hashed before use), but
        // eight bytes are enough to tell two apart in a log.
        write!(f, "ChannelBinding({:02x?}..)", &self.0[..8])
    }
}

/// Proof that the peer on a connection is the host the operator named,
/// with that connection's binding. Only [`authenticate_host`] makes one, so
/// code that takes a `PeerAuthenticated` cannot be reached with an
/// unchecked peer, nor with another connection's binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthenticated {
    host: HostName,
    binding: ChannelBinding,
}

impl PeerAuthenticated {
    pub fn host(&self) -> &HostName {
        &self.host
    }

    pub fn binding(&self) -> &ChannelBinding {
        &self.binding
    }
}

/// Check that the peer is exactly the host `expected` (R2) and derive the
/// connection's channel binding.
///
/// SECURITY: a perfectly valid certificate for *another* host of the same
/// cluster is refused: this is what stops a hijacked route or DNS entry from
/// delivering a VM to the wrong (if genuine) machine.
pub fn authenticate_host(
    conn: &impl TlsSession,
    domain: &TrustDomain,
    expected: &HostName,
) -> Result<PeerAuthenticated, IdentityError> {
    match peer_identity(conn.common_state(), domain)? {
        PeerIdentity::Host(actual) if &actual == expected => {
            let binding = ChannelBinding(channel_binding(conn, BINDING_LABEL, b"")?);
            Ok(PeerAuthenticated { host: actual, binding })
        }
        PeerIdentity::Host(actual) => {
            Err(IdentityError::WrongHost { expected: expected.clone(), actual })
        }
        PeerIdentity::Operator { name, .. } => {
            Err(IdentityError::NotAHost { expected: expected.clone(), actual: name })
        }
    }
}

/// A TLS connection whose keying material can be exported: rustls's client,
/// server and either-side connection types.
pub trait TlsSession {
    fn common_state(&self) -> &CommonState;
    fn export(&self, out: &mut [u8], label: &[u8], context: &[u8]) -> Result<(), rustls::Error>;
}

macro_rules! tls_session {
    ($t:ty) => {
        impl TlsSession for $t {
            fn common_state(&self) -> &CommonState {
                self
            }
            fn export(
                &self,
                out: &mut [u8],
                label: &[u8],
                context: &[u8],
            ) -> Result<(), rustls::Error> {
                self.export_keying_material(out, label, Some(context)).map(|_| ())
            }
        }
    };
}
tls_session!(ClientConnection);
tls_session!(ServerConnection);

impl TlsSession for Connection {
    fn common_state(&self) -> &CommonState {
        match self {
            Connection::Client(c) => c,
            Connection::Server(s) => s,
        }
    }
    fn export(&self, out: &mut [u8], label: &[u8], context: &[u8]) -> Result<(), rustls::Error> {
        self.export_keying_material(out, label, Some(context)).map(|_| ())
    }
}

/// 32 bytes of TLS 1.3 exporter output (RFC 8446 §7.5) for `label` and
/// `context`; both ends of the same connection get the same value, and no
/// other connection can. Agents bind attestation quotes and signed messages
/// to it so that they cannot be relayed or replayed on another channel (R1, R5).
///
/// SECURITY: refused unless the handshake is complete and the session is
/// TLS 1.3, whose exporter is bound to the full handshake transcript.
pub fn channel_binding(
    conn: &impl TlsSession,
    label: &[u8],
    context: &[u8],
) -> Result<[u8; 32], IdentityError> {
    let common = conn.common_state();
    if common.is_handshaking() {
        return Err(IdentityError::HandshakeIncomplete);
    }
    if common.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
        return Err(IdentityError::NotFerrySession {
            why: format!("negotiated {:?}, Ferry requires TLS 1.3", common.protocol_version()),
        });
    }
    let mut out = [0u8; 32];
    conn.export(&mut out, label, context)
        .map_err(|source| IdentityError::ChannelBinding { source })?;
    Ok(out)
}
