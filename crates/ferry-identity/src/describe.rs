//! Human-readable causes for failed handshakes.
//!
//! tokio-rustls reports a TLS failure as an `io::Error` of kind
//! `InvalidData` wrapping the `rustls::Error`. The side that found a problem
//! gets a precise `InvalidCertificate(..)`; the other side only receives the
//! TLS alert, so both cases are described here.
//!
//! Note for callers: in TLS 1.3 the *client* finishes its handshake before
//! the server has checked the client certificate. A client whose
//! certificate is refused therefore sees the alert on its first read, not
//! from `connect()`: pass that read's error here too.

use rustls::{AlertDescription, CertificateError, Error, PeerIncompatible};

/// Describe an I/O error from a TLS handshake or the first read after it.
pub fn describe_tls_error(err: &std::io::Error) -> String {
    if let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        return describe_rustls_error(tls);
    }
    match err.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            "connection closed by the peer during the TLS handshake (it may have refused us without an alert)".into()
        }
        std::io::ErrorKind::ConnectionReset => "connection reset by the peer".into(),
        std::io::ErrorKind::ConnectionRefused => "connection refused (no agent listening there?)".into(),
        std::io::ErrorKind::TimedOut => "timed out".into(),
        _ => format!("I/O error: {err}"),
    }
}

/// Describe a rustls error: what went wrong, and on which side.
pub fn describe_rustls_error(err: &Error) -> String {
    match err {
        Error::InvalidCertificate(c) => describe_cert_error(c),
        Error::NoCertificatesPresented => {
            "peer presented no certificate (a client certificate from this cluster's CA is required)".into()
        }
        Error::AlertReceived(alert) => describe_alert(*alert),
        Error::PeerIncompatible(p) => describe_incompatible(p),
        Error::NoApplicationProtocol => {
            "no common application protocol: the peer does not speak ferry/1".into()
        }
        Error::InvalidCertRevocationList(e) => format!("the CRL is invalid: {e:?}"),
        Error::InconsistentKeys(_) => "our private key does not match our certificate".into(),
        Error::DecryptError => "decryption failed: data was changed on the way, or a key mismatch".into(),
        other => format!("TLS error: {other}"),
    }
}

fn when(t: rustls_pki_types::UnixTime) -> String {
    let secs = i64::try_from(t.as_secs()).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{secs} s after the epoch"))
}

fn describe_cert_error(c: &CertificateError) -> String {
    match c {
        CertificateError::ExpiredContext { time, not_after } => {
            format!(
                "peer certificate expired (not after {}, now {})",
                when(*not_after),
                when(*time)
            )
        }
        CertificateError::Expired => "peer certificate expired".into(),
        CertificateError::NotValidYetContext { time, not_before } => format!(
            "peer certificate not yet valid (not before {}, now {}; check the clocks)",
            when(*not_before),
            when(*time)
        ),
        CertificateError::NotValidYet => "peer certificate not yet valid (check the clocks)".into(),
        CertificateError::Revoked => "peer certificate revoked (listed in our CRL)".into(),
        CertificateError::UnknownIssuer => {
            "unknown CA (peer certificate not issued by this cluster's CA)".into()
        }
        CertificateError::UnknownRevocationStatus => {
            "peer certificate's revocation status is unknown (our CRL is not from its issuer)"
                .into()
        }
        CertificateError::ExpiredRevocationList
        | CertificateError::ExpiredRevocationListContext { .. } => "our CRL has expired".into(),
        // webpki reports a certificate from a foreign CA whose subject name
        // equals our CA's as a bad signature, not as an unknown issuer.
        CertificateError::BadSignature => {
            "peer certificate has a bad signature (not issued by this cluster's CA, or altered)"
                .into()
        }
        CertificateError::NotValidForNameContext { expected, presented } => format!(
            "peer certificate is for {} but we expected {}",
            presented.iter().map(|p| unwrap_name(p)).collect::<Vec<_>>().join(", "),
            expected.to_str()
        ),
        CertificateError::NotValidForName => {
            "peer certificate is not for the host we expected".into()
        }
        CertificateError::InvalidPurposeContext { required, presented } => format!(
            "peer certificate not valid for this use (needs {required:?}, has {presented:?}); \
             an operator certificate cannot act as an agent"
        ),
        CertificateError::InvalidPurpose => {
            "peer certificate not valid for this use (wrong extended key usage)".into()
        }
        CertificateError::BadEncoding => "peer certificate is malformed".into(),
        other => format!("peer certificate refused: {other}"),
    }
}

/// rustls lists presented names as `DnsName("h")` / `UniformResourceIdentifier("u")`:
/// show just the name.
fn unwrap_name(p: &str) -> &str {
    match (p.find('"'), p.rfind('"')) {
        (Some(a), Some(b)) if b > a => &p[a + 1..b],
        _ => p,
    }
}

fn describe_alert(alert: AlertDescription) -> String {
    let why = match alert {
        AlertDescription::CertificateExpired => "certificate expired (or not yet valid)".to_owned(),
        AlertDescription::CertificateRevoked => "certificate revoked".to_owned(),
        AlertDescription::UnknownCA => {
            "unknown CA (our certificate is not issued by the peer's CA, or the peer cannot tell whether it is revoked)"
                .to_owned()
        }
        AlertDescription::BadCertificate => "bad certificate (malformed, or not for the expected name)".to_owned(),
        AlertDescription::UnsupportedCertificate => "unsupported certificate (wrong extended key usage)".to_owned(),
        AlertDescription::CertificateRequired => {
            return "peer requires a client certificate and we presented none".into()
        }
        AlertDescription::ProtocolVersion => {
            return "peer refused the TLS version (Ferry requires TLS 1.3)".into()
        }
        AlertDescription::NoApplicationProtocol => {
            return "peer refused the application protocol (expected ferry/1)".into()
        }
        AlertDescription::HandshakeFailure => {
            return "peer aborted the handshake (no common parameters)".into()
        }
        AlertDescription::DecryptError => {
            "bad signature (our certificate is not from the peer's CA, or the handshake was altered)".to_owned()
        }
        AlertDescription::AccessDenied => "access denied".to_owned(),
        other => return format!("peer sent TLS alert {other:?}"),
    };
    format!("peer refused our certificate: {why}")
}

fn describe_incompatible(p: &PeerIncompatible) -> String {
    match p {
        PeerIncompatible::SupportedVersionsExtensionRequired
        | PeerIncompatible::Tls12NotOffered
        | PeerIncompatible::Tls12NotOfferedOrEnabled
        | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig
        | PeerIncompatible::ServerDoesNotSupportTls12Or13 => {
            format!("peer does not speak TLS 1.3, which Ferry requires ({p:?})")
        }
        other => format!("peer is incompatible: {other:?}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io;

    fn wrap(e: Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn alerts_name_the_cause() {
        let s =
            describe_tls_error(&wrap(Error::AlertReceived(AlertDescription::CertificateRevoked)));
        assert!(s.contains("revoked") && s.contains("refused our certificate"), "{s}");
        let s = describe_tls_error(&wrap(Error::AlertReceived(AlertDescription::UnknownCA)));
        assert!(s.contains("unknown CA"), "{s}");
    }

    #[test]
    fn expiry_shows_the_date() {
        let e = Error::InvalidCertificate(CertificateError::ExpiredContext {
            time: rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                1_700_000_000,
            )),
            not_after: rustls_pki_types::UnixTime::since_unix_epoch(
                std::time::Duration::from_secs(1_600_000_000),
            ),
        });
        let s = describe_tls_error(&wrap(e));
        assert!(s.contains("expired") && s.contains("2020-09-13"), "{s}");
    }

    #[test]
    fn plain_io_errors_pass_through() {
        let s = describe_tls_error(&io::Error::from(io::ErrorKind::UnexpectedEof));
        assert!(s.contains("closed by the peer"), "{s}");
    }
}
