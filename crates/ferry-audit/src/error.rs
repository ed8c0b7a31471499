//! Errors. `AuditError` is for producing evidence (loading keys, signing,
//! appending); `VerifyError` is for checking it and always says *which*
//! record or message failed and why, so an auditor can point at it.

use std::path::PathBuf;

/// Loading a signer or CA, signing, appending to or exporting from a log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the audit log {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("the private key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("message kind {kind:?} is invalid: {why}")]
    BadKind { kind: String, why: &'static str },
    #[error("cannot encode {what} as JSON")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// The log on disk failed its check when it was opened: the agent must
    /// not append behind a record it cannot vouch for.
    #[error("refusing to resume the audit log: {0}")]
    Damaged(#[source] Box<VerifyError>),
    #[error("the audit log {path} belongs to {log_host}, not to this host ({signer})")]
    NotOurLog { path: PathBuf, log_host: String, signer: String },
    /// An earlier append failed part-way; the tail of the file is unknown, so
    /// every later append is refused until the log is reopened (and checked).
    #[error("the audit log {path} is unusable after an earlier write failure; reopen it")]
    Poisoned { path: PathBuf },
    #[error("no record in {logs} mentions migration {migration_id}")]
    NoSuchMigration { migration_id: String, logs: String },
    #[error("signature refused")]
    Verify(#[from] Box<VerifyError>),
}

/// Checking a signed message, a log, two logs against each other, or a bundle.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A signed protocol message is not acceptable.
    #[error("{what}: {fault}")]
    Message { what: String, fault: MessageFault },
    /// A record of an audit log is not acceptable. `line` is 1-based.
    #[error("{path} line {line}{}: {fault}", seq_text(*.seq))]
    Record { path: String, line: u64, seq: Option<u64>, fault: RecordFault },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: the log is empty (not even a genesis record)")]
    Empty { path: String },
    /// Two logs (or a bundle) disagree about a migration.
    #[error("migration {migration_id}: {why}")]
    Disagree { migration_id: String, why: String },
    /// Two logs cannot be compared at all (e.g. both are the same host's).
    #[error("cross-check: {0}")]
    CrossCheck(String),
    #[error("evidence bundle: {0}")]
    Bundle(String),
}

fn seq_text(seq: Option<u64>) -> String {
    match seq {
        Some(s) => format!(" (seq {s})"),
        None => String::new(),
    }
}

/// Why a signed message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageFault {
    #[error("is a {found:?} message where a {expected:?} was expected")]
    WrongKind { expected: String, found: String },
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("the signer certificate is not trusted: {0}")]
    Untrusted(String),
    #[error("the signature does not match the message and its signer certificate")]
    BadSignature,
    #[error("the body does not have the expected shape: {0}")]
    Body(String),
}

/// Why an audit-log record was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordFault {
    #[error("malformed record: {0}")]
    Malformed(String),
    #[error("the record is not in canonical form (bytes were changed outside the signed part)")]
    NotCanonical,
    #[error("incomplete record (no end of line): the log was truncated or a write was torn")]
    Incomplete,
    #[error("record longer than {0} bytes")]
    TooLong(usize),
    #[error(
        "expected seq {expected}, found seq {found}: a record was deleted, reordered or inserted"
    )]
    Sequence { expected: u64, found: u64 },
    #[error("the hash chain is broken: the previous record was changed, deleted or reordered")]
    Chain,
    #[error("the first record does not carry the host certificate")]
    NoCertificate,
    #[error("the certificate carried here is not trusted: {0}")]
    Untrusted(String),
    #[error("the certificate carried here names {found}, but the log belongs to {expected}")]
    OtherHost { expected: String, found: String },
    #[error("the record's signature does not verify: it was edited or forged")]
    BadSignature,
    #[error("the embedded signed message is refused: {0}")]
    Embedded(MessageFault),
    #[error("the record says migration {record:?} but its signed message is about {message:?}")]
    MigrationMismatch { record: Option<String>, message: String },
    #[error("{0}")]
    Other(String),
}
