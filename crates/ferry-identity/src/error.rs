//! The one error type of this crate. Each variant names *which* thing failed
//! (a path, a host, a serial) in its fields and keeps *why* as its `#[source]`,
//! so the message never repeats the source and a caller can walk the chain.

use std::path::PathBuf;

use ferry_types::{HostName, OperatorName, TrustDomain};

/// A boxed lower-level cause (PEM, X.509, rcgen, name validation...).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} contains no {what}")]
    Missing { path: PathBuf, what: &'static str },
    #[error("cannot parse {what} in {path}")]
    Parse {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("a CA already exists in {dir} ({existing} is present); refusing to overwrite it")]
    CaExists { dir: PathBuf, existing: PathBuf },
    #[error("no CA in {dir}")]
    NoCa {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {what}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot get random bytes for {what}")]
    Random { what: &'static str },
    #[error("role {role:?} is invalid: must be 1 to 32 characters of a-z and '-'")]
    InvalidRole { role: String },
    #[error(
        "validity window is empty: not_before {not_before} is not before not_after {not_after}"
    )]
    EmptyValidity { not_before: time::OffsetDateTime, not_after: time::OffsetDateTime },
    #[error("no certificate with serial {serial} was issued by the CA in {dir}")]
    UnknownSerial { dir: PathBuf, serial: String },
    #[error("certificate {path} is not for trust domain {expected} (the CA's) but for {actual}")]
    DomainMismatch { path: PathBuf, expected: TrustDomain, actual: TrustDomain },
    #[error("key {key} does not belong to certificate {cert}")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("host name {host} cannot be a TLS server name: it looks like an IP address")]
    UnusableHostName { host: HostName },
    #[error("cannot build the TLS {side} configuration")]
    TlsConfig {
        side: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the {side} certificate verifier")]
    Verifier {
        side: &'static str,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("invalid cipher suite policy: {why}")]
    CipherPolicy { why: String },
    #[error("the TLS handshake is not complete")]
    HandshakeIncomplete,
    #[error("the connection is not a Ferry session: {why}")]
    NotFerrySession { why: String },
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("peer certificate is unusable: {why}")]
    PeerCertificate { why: String },
    #[error("peer is in trust domain {actual}, but ours is {expected}")]
    PeerDomain { expected: TrustDomain, actual: TrustDomain },
    #[error("peer is host {actual}, but the expected host is {expected}")]
    WrongHost { expected: HostName, actual: HostName },
    #[error("peer is operator {actual}, but the expected host is {expected}")]
    NotAHost { expected: HostName, actual: OperatorName },
    #[error("cannot derive channel binding")]
    ChannelBinding {
        #[source]
        source: rustls::Error,
    },
}
