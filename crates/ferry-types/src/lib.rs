//! Ferry's shared vocabulary: validated names, migration ids, digests and
//! SPIFFE identities. Everything here is pure data; nothing does I/O.
//!
//! Names are validated on construction and on deserialization, so a value of
//! these types that came from a peer, a config file or the command line is
//! already known to be safe to use in a file name or a certificate SAN.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a name, id or digest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("{kind} {value:?} is invalid: {why}")]
    Invalid { kind: &'static str, value: String, why: &'static str },
}

fn invalid(kind: &'static str, value: &str, why: &'static str) -> ParseError {
    ParseError::Invalid { kind, value: value.chars().take(80).collect(), why }
}

/// Longest host name: a DNS label.
pub const MAX_HOST_NAME: usize = 63;
/// Longest VM or operator name.
pub const MAX_VM_NAME: usize = 64;

macro_rules! validated_name {
    ($(#[$doc:meta])* $ty:ident, $kind:literal, $check:path) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $ty {
            type Error = ParseError;
            fn try_from(s: String) -> Result<Self, ParseError> {
                $check(&s).map_err(|why| invalid($kind, &s, why))?;
                Ok(Self(s))
            }
        }
        impl FromStr for $ty {
            type Err = ParseError;
            fn from_str(s: &str) -> Result<Self, ParseError> {
                Self::try_from(s.to_owned())
            }
        }
        impl From<$ty> for String {
            fn from(n: $ty) -> String {
                n.0
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
    };
}

fn check_host_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > MAX_HOST_NAME {
        return Err("must be 1 to 63 characters");
    }
    if !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err("may contain only a-z, 0-9 and '-'");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must not start or end with '-'");
    }
    Ok(())
}

/// Names of VMs and operators end up in file names, QEMU arguments and
/// certificate SANs: a strict alphabet keeps all three safe.
fn check_object_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > MAX_VM_NAME {
        return Err("must be 1 to 64 characters");
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') {
        return Err("may contain only A-Z, a-z, 0-9, '-', '_' and '.'");
    }
    if s.starts_with('.') || s.starts_with('-') {
        return Err("must not start with '.' or '-'");
    }
    Ok(())
}

validated_name!(
    /// A hypervisor host's name: a DNS label, also the last segment of its SPIFFE id.
    HostName, "host name", check_host_name
);
validated_name!(
    /// A VM's name, unique on the host that runs it.
    VmName, "VM name", check_object_name
);
validated_name!(
    /// An operator's name, the last segment of its SPIFFE id.
    OperatorName, "operator name", check_object_name
);
validated_name!(
    /// A SPIFFE trust domain (`ferry.example`): lowercase DNS name.
    TrustDomain, "trust domain", check_trust_domain
);

fn check_trust_domain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 253 {
        return Err("must be 1 to 253 characters");
    }
    for label in s.split('.') {
        check_host_name(label).map_err(|_| "must be dot-separated lowercase DNS labels")?;
    }
    Ok(())
}

/// A single-use migration id: a UUIDv7, so ids sort by creation time and carry it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MigrationId(uuid::Uuid);

impl MigrationId {
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }
    /// Milliseconds since the UNIX epoch at which the id was made.
    pub fn created_unix_ms(&self) -> u64 {
        match self.0.get_timestamp() {
            Some(ts) => {
                let (secs, nanos) = ts.to_unix();
                secs * 1000 + u64::from(nanos) / 1_000_000
            }
            None => 0,
        }
    }
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl Default for MigrationId {
    fn default() -> Self {
        Self::new()
    }
}

impl TryFrom<String> for MigrationId {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, ParseError> {
        s.parse()
    }
}
impl FromStr for MigrationId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let id = uuid::Uuid::parse_str(s).map_err(|_| invalid("migration id", s, "not a UUID"))?;
        if id.get_version_num() != 7 {
            return Err(invalid("migration id", s, "not a UUIDv7"));
        }
        Ok(Self(id))
    }
}
impl From<MigrationId> for String {
    fn from(id: MigrationId) -> String {
        id.0.to_string()
    }
}
impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}
impl fmt::Debug for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MigrationId({})", self.0)
    }
}

/// A BLAKE3 (or other 32-byte) digest, hex in text form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest32(pub [u8; 32]);

impl TryFrom<String> for Digest32 {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, ParseError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out)
            .map_err(|_| invalid("digest", &s, "not 64 hex digits"))?;
        Ok(Self(out))
    }
}
impl From<Digest32> for String {
    fn from(d: Digest32) -> String {
        hex::encode(d.0)
    }
}
impl fmt::Display for Digest32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}
impl fmt::Debug for Digest32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest32({})", hex::encode(&self.0[..8]))
    }
}

/// Who a certificate says its holder is: `spiffe://<domain>/host/<name>` or
/// `spiffe://<domain>/operator/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SpiffeId {
    Host { domain: TrustDomain, name: HostName },
    Operator { domain: TrustDomain, name: OperatorName },
}

impl SpiffeId {
    pub fn domain(&self) -> &TrustDomain {
        match self {
            SpiffeId::Host { domain, .. } | SpiffeId::Operator { domain, .. } => domain,
        }
    }

    /// The one identity a certificate names, from its URI SANs (the caller
    /// extracts them with its X.509 parser; ferry-identity for TLS peers,
    /// ferry-audit for signers: both apply this same rule).
    ///
    /// SECURITY: exactly one URI SAN, and it must parse as a Ferry SPIFFE
    /// id, so a certificate cannot be read as whichever identity suits.
    pub fn from_uri_sans<'a>(uris: impl IntoIterator<Item = &'a str>) -> Result<Self, SanError> {
        let uris: Vec<&str> = uris.into_iter().collect();
        match uris.as_slice() {
            [one] => one.parse().map_err(SanError::Invalid),
            [] => Err(SanError::Missing),
            many => Err(SanError::Several(many.len())),
        }
    }
}

/// Why a certificate's URI SANs name no identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SanError {
    #[error("no URI SAN (SPIFFE id)")]
    Missing,
    #[error("{0} URI SANs, exactly one SPIFFE id is required")]
    Several(usize),
    #[error(transparent)]
    Invalid(ParseError),
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpiffeId::Host { domain, name } => write!(f, "spiffe://{domain}/host/{name}"),
            SpiffeId::Operator { domain, name } => write!(f, "spiffe://{domain}/operator/{name}"),
        }
    }
}

impl FromStr for SpiffeId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| invalid("SPIFFE id", s, "must start with spiffe://"))?;
        let mut parts = rest.split('/');
        let (Some(domain), Some(kind), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid(
                "SPIFFE id",
                s,
                "must be spiffe://<domain>/<host|operator>/<name>",
            ));
        };
        let domain: TrustDomain = domain.parse()?;
        match kind {
            "host" => Ok(SpiffeId::Host { domain, name: name.parse()? }),
            "operator" => Ok(SpiffeId::Operator { domain, name: name.parse()? }),
            _ => Err(invalid("SPIFFE id", s, "kind must be host or operator")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_names_exactly_one_identity() {
        let id = SpiffeId::from_uri_sans(["spiffe://ferry.test/host/h1"]).unwrap();
        assert_eq!(id.to_string(), "spiffe://ferry.test/host/h1");
        assert_eq!(SpiffeId::from_uri_sans([]), Err(SanError::Missing));
        let two = ["spiffe://ferry.test/host/h1", "spiffe://ferry.test/host/h2"];
        assert_eq!(SpiffeId::from_uri_sans(two), Err(SanError::Several(2)));
        assert!(matches!(
            SpiffeId::from_uri_sans(["https://ferry.test/host/h1"]),
            Err(SanError::Invalid(_))
        ));
    }

    #[test]
    fn host_names_are_dns_labels() {
        assert!("host-1".parse::<HostName>().is_ok());
        for bad in ["", "Host", "a_b", "-a", "a-", "a/b", &"x".repeat(64)] {
            assert!(bad.parse::<HostName>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn vm_names_cannot_escape_a_directory() {
        assert!("guest-1.test".parse::<VmName>().is_ok());
        for bad in ["", "..", ".hidden", "a/b", "a b", "-rf", "a\0b"] {
            assert!(bad.parse::<VmName>().is_err(), "{bad:?} accepted");
        }
        let err = serde_json::from_str::<VmName>("\"../etc\"").unwrap_err();
        assert!(err.to_string().contains("VM name"), "{err}");
    }

    #[test]
    fn spiffe_ids_round_trip_and_refuse_junk() {
        for s in ["spiffe://ferry.test/host/h1", "spiffe://ferry.test/operator/alice"] {
            assert_eq!(s.parse::<SpiffeId>().unwrap().to_string(), s);
        }
        for bad in [
            "http://ferry.test/host/h1",
            "spiffe://ferry.test/host/h1/extra",
            "spiffe://ferry.test/vm/h1",
            "spiffe://Ferry/host/h1",
            "spiffe://ferry.test/host/H1",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn migration_ids_are_v7_and_ordered() {
        let a = MigrationId::new();
        let b = MigrationId::new();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<MigrationId>().unwrap(), a);
        let v4 = "6f1c2b4e-8a43-4d6e-9f00-1d2c3b4a5e6f";
        assert!(v4.parse::<MigrationId>().is_err());
        assert!(a.created_unix_ms() > 1_700_000_000_000);
    }

    #[test]
    fn digests_are_hex() {
        let d = Digest32([0xab; 32]);
        let s: String = d.into();
        assert_eq!(Digest32::try_from(s).unwrap(), d);
        assert!(Digest32::try_from("zz".to_owned()).is_err());
    }
}
