//! The agent's one error type. Who is at fault ([`ErrorKind`]) follows from
//! the variant, so an operator's script can tell an attack from a typo
//! without reading text; messages say what was being done and leave the
//! cause to `#[source]`, and [`report`] prints the chain once, at the edge.

use std::time::Duration;

use ferry_channel::{ChannelError, RelayError};
use ferry_types::{HostName, MigrationId, VmName};

use crate::backend::BackendError;
use crate::net::ConnectError;
use crate::notary::{AuditFailed, EvidenceError, SignFailed};
use crate::plan::PlanError;
use crate::protocol::ErrorKind;
use crate::records::RecordError;
use ferry_session::{IllegalTransition, MigrationState};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The request is wrong.
    #[error("no VM {vm} on {host}")]
    NoSuchVm { vm: VmName, host: HostName },
    #[error(
        "{host} is the agent asked and also the destination named: ask the agent of the host \
         the VM runs on (--host), not {host}"
    )]
    SelfDestination { host: HostName },
    #[error("VM {vm} is held by migration {id}")]
    VmBusy { vm: VmName, id: MigrationId },
    #[error("a VM named {vm} already exists on {host}")]
    VmExists { vm: VmName, host: HostName },
    #[error("unknown destination {0}: not in this agent's [peers] table")]
    UnknownPeer(HostName),
    #[error("no migration {id} on {host}")]
    NoSuchMigration { id: MigrationId, host: HostName },
    #[error("migration {id} is {state} here; {hint}")]
    WrongState { id: MigrationId, state: MigrationState, hint: &'static str },
    #[error("migration {0} is already being worked on")]
    Busy(MigrationId),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("VM labels: {0}")]
    Labels(String),
    #[error("cancelled by the operator")]
    Cancelled,
    #[error("{0}")]
    Qmp(String),
    #[error("policy reload refused, the old policy stays in force: {0}")]
    PolicyReload(String),

    // The caller may not.
    #[error("{0}")]
    Denied(String),
    #[error("operator {operator} (role {role}) may not {what}: allowed roles are {allowed:?}")]
    Role { operator: String, role: String, what: &'static str, allowed: Vec<String> },

    // The peer refused or misbehaved (or the link between us failed).
    #[error(transparent)]
    Connect(Box<ConnectError>),
    #[error("{host} refused the migration: {reason}")]
    Refused { host: HostName, reason: String },
    #[error("{host} aborted the migration: {reason}")]
    PeerAborted { host: HostName, reason: String },
    #[error("{host} answered the {step} with {got}")]
    Unexpected { host: HostName, step: &'static str, got: &'static str },
    #[error("invalid {kind} from {host}")]
    Evidence {
        host: HostName,
        kind: &'static str,
        #[source]
        source: EvidenceError,
    },
    #[error("the connection to {host}")]
    Link {
        host: HostName,
        #[source]
        source: ChannelError,
    },
    #[error("lost the connection to {host}: {why}")]
    Lost { host: HostName, why: String },
    #[error("no {what} from {host} within {after:?}")]
    Silent { host: HostName, what: &'static str, after: Duration },
    #[error("{host} failed attestation: {why}")]
    Attestation { host: HostName, why: String },
    #[error("the VM stream")]
    Relay(#[from] RelayError),

    // QEMU, the host or this agent failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("migration record")]
    Record(#[from] RecordError),
    #[error(transparent)]
    Audit(#[from] AuditFailed),
    #[error(transparent)]
    Sign(#[from] SignFailed),
    #[error("TLS configuration")]
    Tls(#[source] ferry_identity::IdentityError),
    #[error("the local TPM: {0}")]
    Quote(String),
    #[error("the migration did not converge within {0:?}; raise [migration] max_transfer_ms or lower the guest's dirty rate")]
    NoConvergence(Duration),
    #[error("source QEMU's migration failed: {0}")]
    SourceQemu(String),
    #[error("the destination's QEMU did not load the stream: {0}")]
    NotLoaded(String),
    #[error("the stream does not match the commit: {0}")]
    Mismatch(String),
    #[error(
        "VM {vm}'s source half on {host} is gone, and with it the pages only it held: \
         migration {id} is postcopy_lost; its destination keeps what it has for the operator \
         (stop it, or keep it for forensics)"
    )]
    PostcopyLost { id: MigrationId, vm: VmName, host: HostName },
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),

    #[error("migration {id} ended {state} once the destination was asked ({why})")]
    Resolved {
        id: MigrationId,
        state: MigrationState,
        why: String,
        #[source]
        cause: Box<Error>,
    },

    // The migration's outcome is not known yet.
    /// `note` is the record's account: the cause, what it means for the
    /// VM, and what this agent does about it.
    #[error("migration {id} is still {state}: {note}")]
    Unsettled { id: MigrationId, state: MigrationState, note: String },
}

impl Error {
    /// A relayed stream stopped: QEMU's fault, or the link to `peer`'s.
    pub fn relay(e: RelayError, peer: &HostName) -> Error {
        match e {
            RelayError::Peer(source) => Error::Link { host: peer.clone(), source },
            qemu => Error::Relay(qemu),
        }
    }
}

impl From<ConnectError> for Error {
    fn from(e: ConnectError) -> Self {
        Error::Connect(Box::new(e))
    }
}

impl Error {
    /// Who is at fault.
    pub fn kind(&self) -> ErrorKind {
        use Error::*;
        match self {
            NoSuchVm { .. }
            | SelfDestination { .. }
            | VmBusy { .. }
            | VmExists { .. }
            | UnknownPeer(_)
            | NoSuchMigration { .. }
            | WrongState { .. }
            | Busy(_)
            | Plan(_)
            | Labels(_)
            | Cancelled
            | PolicyReload(_)
            | Qmp(_) => ErrorKind::Request,
            Denied(_) | Role { .. } => ErrorKind::Denied,
            Connect(_)
            | Refused { .. }
            | PeerAborted { .. }
            | Unexpected { .. }
            | Evidence { .. }
            | Link { .. }
            | Lost { .. }
            | Silent { .. }
            | Resolved { .. }
            | Attestation { .. } => ErrorKind::Peer,
            Relay(r) if !r.is_qemu() => ErrorKind::Peer,
            Relay(_)
            | Backend(_)
            | Record(_)
            | Audit(_)
            | Sign(_)
            | Tls(_)
            | Quote(_)
            | NoConvergence(_)
            | SourceQemu(_)
            | NotLoaded(_)
            | PostcopyLost { .. }
            | Illegal(_) => ErrorKind::Backend,
            Mismatch(_) => ErrorKind::Peer,
            Unsettled { .. } => ErrorKind::InDoubt,
        }
    }

    /// A peer's signed word that it will never run the VM, as opposed to a
    /// failure: only these let a committed source resume its copy.
    pub fn is_peer_abort(&self) -> bool {
        matches!(self, Error::PeerAborted { .. } | Error::Refused { .. })
    }
}

pub use crate::report::report;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_follows_from_the_variant() {
        let host: HostName = "host2".parse().unwrap();
        let vm: VmName = "web".parse().unwrap();
        assert_eq!(Error::NoSuchVm { vm, host: host.clone() }.kind(), ErrorKind::Request);
        assert_eq!(Error::Denied("policy".into()).kind(), ErrorKind::Denied);
        assert_eq!(
            Error::Refused { host: host.clone(), reason: "no".into() }.kind(),
            ErrorKind::Peer
        );
        let silent = RelayError::QemuSilent(Duration::from_secs(1));
        assert_eq!(Error::Relay(silent).kind(), ErrorKind::Backend);
        let link = RelayError::Peer(ChannelError::Closed);
        assert_eq!(Error::Relay(link).kind(), ErrorKind::Peer);
        let _ = host;
        let note = "no answer; the VM stays paused".to_owned();
        let unsettled =
            Error::Unsettled { id: MigrationId::new(), state: MigrationState::InDoubt, note };
        assert_eq!(unsettled.kind(), ErrorKind::InDoubt);
    }

    #[test]
    fn a_report_names_each_cause_once() {
        let e = Error::Link { host: "host2".parse().unwrap(), source: ChannelError::Closed };
        assert_eq!(report(&e), "the connection to host2: peer closed the connection");
    }
}
