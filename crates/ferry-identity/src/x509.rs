//! Reading what Ferry puts in certificates: the SPIFFE URI SAN, the host's
//! DNS SAN, the operator's role (subject OU) and the serial number.
//!
//! Errors here are plain strings: callers wrap them in an `IdentityError`
//! variant that says *whose* certificate it was.

use ferry_types::{SpiffeId, TrustDomain};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

/// Longest operator role.
pub const MAX_ROLE: usize = 32;

/// Roles travel in a certificate subject and into Cedar policy entities; a
/// tiny alphabet keeps both unambiguous.
pub fn valid_role(role: &str) -> bool {
    !role.is_empty()
        && role.len() <= MAX_ROLE
        && role.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
}

/// What an end-entity certificate says about its holder.
#[derive(Debug, Clone)]
pub(crate) struct LeafInfo {
    pub spiffe: SpiffeId,
    /// Only for operators: the role from the subject OU.
    pub role: Option<String>,
    pub serial: String,
}

pub(crate) fn parse(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err("trailing bytes after the certificate".into()),
        Err(e) => Err(format!("not an X.509 certificate: {e}")),
    }
}

fn sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a GeneralName<'a>>, String> {
    match cert.subject_alternative_name() {
        Ok(Some(ext)) => Ok(ext.value.general_names.iter().collect()),
        Ok(None) => Ok(Vec::new()),
        Err(e) => Err(format!("bad subjectAltName extension: {e}")),
    }
}

/// Read the holder's identity from an end-entity certificate.
///
/// SECURITY: this is the only place that turns certificate bytes into a
/// Ferry identity, so it is strict:
/// - exactly one URI SAN (as the X.509-SVID spec requires): a certificate
///   carrying two identities would let the holder be whichever one a check
///   happens to look at first;
/// - a host certificate must also carry its name as a DNS SAN, so that the
///   name rustls checked during the handshake (the DNS SAN) and the name we
///   check afterwards (the URI SAN) are one and the same;
/// - an operator certificate must carry exactly one valid role.
pub(crate) fn leaf_info(der: &[u8]) -> Result<LeafInfo, String> {
    let cert = parse(der)?;
    let sans = sans(&cert)?;
    let uris = sans.iter().filter_map(|g| match g {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let spiffe = SpiffeId::from_uri_sans(uris).map_err(|e| e.to_string())?;
    let role = match &spiffe {
        SpiffeId::Host { name, .. } => {
            let has_dns =
                sans.iter().any(|g| matches!(g, GeneralName::DNSName(d) if *d == name.as_str()));
            if !has_dns {
                return Err(format!("host certificate for {name} lacks the DNS SAN {name}"));
            }
            None
        }
        SpiffeId::Operator { .. } => {
            let ous: Vec<&str> = cert
                .subject()
                .iter_organizational_unit()
                .map(|ou| ou.as_str().map_err(|e| format!("unreadable subject OU: {e}")))
                .collect::<Result<_, _>>()?;
            match ous.as_slice() {
                [role] if valid_role(role) => Some((*role).to_owned()),
                [role] => return Err(format!("operator role {role:?} is invalid")),
                _ => {
                    return Err(format!("{} subject OUs, exactly one role is required", ous.len()))
                }
            }
        }
    };
    Ok(LeafInfo { spiffe, role, serial: serial_hex(cert.raw_serial()) })
}

/// The trust domain a CA certificate names in its `spiffe://<domain>` URI
/// SAN, if it has one (a CA from another PKI may not).
pub(crate) fn ca_domain(der: &[u8]) -> Result<Option<TrustDomain>, String> {
    let cert = parse(der)?;
    for g in sans(&cert)? {
        if let GeneralName::URI(u) = g {
            if let Some(d) = u.strip_prefix("spiffe://") {
                let d = d.strip_suffix('/').unwrap_or(d);
                return d.parse().map(Some).map_err(|e| format!("{e}"));
            }
        }
    }
    Ok(None)
}

/// Canonical text form of a serial number: lowercase hex without leading
/// zero bytes, so that the serial from the registry, from a certificate and
/// from the command line compare equal.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let mut s = String::with_capacity(2 * (raw.len() - start));
    for b in &raw[start..] {
        s.push_str(&format!("{b:02x}"));
    }
    if s.is_empty() {
        s.push_str("00");
    }
    s
}

/// Parse a serial typed by a person (`0A:1b:..`, `0a1b..`) into canonical form.
pub fn normalize_serial(s: &str) -> Option<String> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.is_empty() || hex.len() > 40 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let hex = if hex.len() % 2 == 1 { format!("0{hex}") } else { hex };
    let bytes: Option<Vec<u8>> =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok()).collect();
    bytes.map(|b| serial_hex(&b))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cert(sans: Vec<rcgen::SanType>, ou: Option<&str>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = sans;
        if let Some(ou) = ou {
            p.distinguished_name.push(rcgen::DnType::OrganizationalUnitName, ou);
        }
        p.self_signed(&key).unwrap().der().to_vec()
    }
    fn uri(s: &str) -> rcgen::SanType {
        rcgen::SanType::URI(s.try_into().unwrap())
    }
    fn dns(s: &str) -> rcgen::SanType {
        rcgen::SanType::DnsName(s.try_into().unwrap())
    }

    #[test]
    fn leaf_identity_is_read_strictly() {
        let ok = leaf_info(&cert(vec![uri("spiffe://f.test/host/h1"), dns("h1")], None)).unwrap();
        assert_eq!(ok.spiffe.to_string(), "spiffe://f.test/host/h1");
        let op = leaf_info(&cert(vec![uri("spiffe://f.test/operator/al")], Some("ops"))).unwrap();
        assert_eq!(op.role.as_deref(), Some("ops"));

        let cases = [
            (cert(vec![dns("h1")], None), "no URI SAN"),
            (
                cert(
                    vec![uri("spiffe://f.test/host/h1"), uri("spiffe://f.test/host/h2"), dns("h1")],
                    None,
                ),
                "2 URI SANs",
            ),
            (cert(vec![uri("spiffe://f.test/host/h1"), dns("h2")], None), "lacks the DNS SAN"),
            (cert(vec![uri("spiffe://f.test/operator/al")], None), "0 subject OUs"),
            (cert(vec![uri("spiffe://f.test/operator/al")], Some("Root")), "role"),
            (cert(vec![uri("https://f.test/host/h1")], None), "spiffe://"),
        ];
        for (der, want) in cases {
            let err = leaf_info(&der).unwrap_err();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }

    #[test]
    fn serials_normalize() {
        assert_eq!(serial_hex(&[0, 0, 0x0a, 0xff]), "0aff");
        assert_eq!(normalize_serial("00:0A:FF").as_deref(), Some("0aff"));
        assert_eq!(normalize_serial("aff").as_deref(), Some("0aff"));
        assert_eq!(normalize_serial("xyz"), None);
        assert_eq!(normalize_serial(""), None);
    }

    #[test]
    fn roles_are_small_alphabet() {
        assert!(valid_role("migrator"));
        assert!(valid_role("read-only"));
        for bad in ["", "Admin", "a_b", "a b", "a=b,cn=x", &"a".repeat(33)] {
            assert!(!valid_role(bad), "{bad:?} accepted");
        }
    }
}
