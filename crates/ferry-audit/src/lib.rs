//! Ferry audit: signed migration messages, the hash-chained signed audit log
//! each agent keeps, and evidence a third party verifies with only the
//! cluster CA certificate (requirements R5 and R6: replay resistance and
//! source non-repudiation).
//!
//! - [`Signer`] is a host's certificate and key; [`Signed`] is one protocol
//!   message (Offer, Accept, Commit, Receipt, Abort) carrying its exact signed
//!   bytes, the signer's certificate and the signature.
//! - [`AuditLog`] appends durable, chained, signed records; [`verify_log`]
//!   checks one log; [`cross_check`] checks a source's and a destination's
//!   logs against each other.
//! - [`export_bundle`] / [`verify_bundle`]: the evidence for one migration.
//!
//! Replay resistance itself (single-use migration ids, channel binding)
//! lives in the agent: message bodies carry the migration id, both hosts,
//! the VM and the channel binding, and this crate checks the signatures.
//!
//! Contract for the agent, on which `cross_check` relies: append the record
//! of a message you sign *before* sending it, and of a message you receive
//! before acting on it; put `log_head` (from [`AuditLog::head`]) as a
//! top-level field of the bodies you sign, so the peer's log witnesses how
//! far yours went.

mod bundle;
mod error;
pub mod fuzz;
mod log;
mod record;
mod signed;
mod verify;

pub use bundle::{
    export_bundle, verify_bundle, BundleLog, BundleRecord, BundleSummary, EvidenceBundle,
};
pub use error::{AuditError, MessageFault, RecordFault, VerifyError};
pub use log::{AuditEvent, AuditLog, LogHead};
pub use signed::{CaTrust, Signed, Signer};
pub use verify::{cross_check, verify_log, CrossSummary, LogSummary, MigrationCheck};
