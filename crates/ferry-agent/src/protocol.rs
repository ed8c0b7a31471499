//! Ferry protocol v1: the control messages carried in `ferry-channel` control
//! frames, for the operator API and the peer migration protocol. Both run on
//! the same mTLS listener; the peer's certificate (host or operator) decides
//! which side of this file it may speak.
//!
//! Peer migration (source = TLS client, destination = TLS server). Every
//! message marked (signed) is signed by its sender's host key and names the
//! migration, both hosts, the VM and this connection's channel binding; each
//! side writes it to its audit log before sending / before acting on it.
//!
//! ```text
//! source agent                                   destination agent
//!   |== TLS 1.3, both certificates, peer name checked ==|
//!   |-- Hello{protocol} ------------------------------>|
//!   |<------------------------------ Hello{protocol} --|
//!   |-- Attest{id, source quote} --------------------->|  verify: enrolled AK, binding,
//!   |<----------------- Attest{id, destination quote} --|  PCRs vs reference values
//!   |-- Offer (signed: spec, labels, window) --------->|  replay (seen-set), window,
//!   |                                                  |  policy, admission; QEMU -incoming
//!   |<----------------------- Accept (signed) | Refuse -|
//!   |== Data frames (QEMU's stream, BLAKE3-hashed) ===>|  hashed, fed to QEMU
//!   |-- DataEnd -------------------------------------->|
//!   |-- Commit (signed: bytes, digest) --------------->|  QEMU complete + counts and
//!   |                                                  |  digest equal => cont
//!   |<----------------- Receipt (signed) | Abort (signed)
//!   source quits its paused copy only on a valid Receipt
//! ```
//! Either side may send Abort before Commit; the source then resumes its copy.
//!
//! Post-copy (offer says `postcopy`): data frames also flow back, carrying
//! QEMU's return path. When the destination QEMU holds the switchover
//! package (source VM stopped, destination paused), the destination sends
//! PostcopyReady; the source answers with a Commit for the stream so far,
//! in-line after exactly those bytes; the destination checks it, resumes the
//! VM and sends its Receipt. Pages still flow until DataEnd, then a final
//! Commit and Receipt cover the whole stream.
//! A later `Query` on a new connection returns the outcome and, if completed,
//! the signed Receipt (used to settle an in-doubt migration).
//!
//! Version 1. A peer speaking another version is refused at Hello.

use ferry_audit::Signed;
use ferry_types::{Digest32, HostName, MigrationId, VmName};
use ferry_vmm::VmSpec;
use serde::{Deserialize, Serialize};

use crate::records::MigrationRecord;

pub const PROTOCOL_VERSION: u32 = 1;
/// Exporter label of the channel binding offers and quotes are bound to.
pub use ferry_identity::BINDING_LABEL;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub protocol: u32,
}

// ---------------------------------------------------------------- operator API

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ApiRequest {
    Status,
    VmStart {
        spec: VmSpec,
        #[serde(default)]
        labels: Option<ferry_policy::VmLabels>,
    },
    VmList,
    VmStop {
        vm: VmName,
    },
    /// Migrate `vm` to `to`. With `wait`, progress messages follow until the end.
    /// `streams` > 1 carries QEMU's multifd channels on parallel connections.
    Migrate {
        vm: VmName,
        to: HostName,
        wait: bool,
        #[serde(default)]
        streams: Option<u8>,
        /// Allow QEMU post-copy (policy-gated on both hosts).
        #[serde(default)]
        postcopy: bool,
    },
    MigrationList,
    MigrationShow {
        id: MigrationId,
    },
    /// Settle an in-doubt migration by asking its destination.
    MigrationResolve {
        id: MigrationId,
    },
    /// Stop an outgoing migration before it commits; the VM resumes here.
    MigrationCancel {
        id: MigrationId,
    },
    /// Resume a post-copy whose link broke after the hand-over (on its source).
    MigrationRecover {
        id: MigrationId,
    },
    /// Re-read the policy files (as SIGHUP does); the old policy stays on error.
    PolicyReload,
    /// Pass one read-only QMP command (ferry_vmm::diagnostics) to a VM's
    /// QEMU, whose only QMP connection the agent holds.
    VmQmp {
        vm: VmName,
        command: String,
        /// A JSON object, as QMP's `arguments`.
        #[serde(default)]
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
    },
}

// One response per request: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ApiResponse {
    Status(HostStatus),
    Vms {
        vms: Vec<VmInfo>,
    },
    Vm(VmInfo),
    Stopped {
        vm: VmName,
    },
    Progress(Progress),
    Migration(MigrationRecord),
    Migrations {
        migrations: Vec<MigrationRecord>,
    },
    PolicyReloaded {
        policies: usize,
    },
    /// QEMU's `return` value for a [`ApiRequest::VmQmp`].
    Qmp {
        vm: VmName,
        command: String,
        result: serde_json::Value,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// Who is at fault, so scripts can tell an attack from a typo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is wrong (unknown VM, bad spec).
    Request,
    /// The caller may not do this.
    Denied,
    /// The peer refused or misbehaved.
    Peer,
    /// QEMU or the host failed.
    Backend,
    /// The migration's outcome is not known yet; the VM stays paused on the source.
    InDoubt,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostStatus {
    pub host: HostName,
    /// Who runs this host's VMs: "qemu" (Ferry-owned) or "libvirt".
    #[serde(default)]
    pub backend: String,
    pub version: String,
    pub protocol: u32,
    pub accel: String,
    pub vms: usize,
    pub peers: Vec<HostName>,
    pub active_migrations: usize,
    /// The start-up checks, run again now (docs/deploy.md, "When it fails").
    #[serde(default)]
    pub checks: Vec<crate::preflight::Check>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: VmName,
    pub state: String,
    pub pid: u32,
    pub accel: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// The migration holding this VM, if any.
    pub migration: Option<MigrationId>,
    pub console_log: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub id: Option<MigrationId>,
    pub phase: String,
    pub bytes: u64,
    pub elapsed_ms: u64,
    pub ram_total: u64,
    pub ram_remaining: u64,
    pub dirty_pages_rate: u64,
    pub iterations: u64,
}

// ---------------------------------------------------------------- peer protocol

pub use ferry_session::DestinationOutcome;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PeerMessage {
    /// A TPM quote bound to this connection, this migration and the sender's
    /// role; `None` only from a host whose attestation is (insecurely) off.
    Attest {
        migration_id: MigrationId,
        evidence: Option<ferry_attest::Evidence>,
    },
    /// Signed [`crate::evidence::OfferBody`].
    Offer {
        signed: Signed,
    },
    /// Signed [`crate::evidence::AcceptBody`].
    Accept {
        signed: Signed,
    },
    Refuse {
        migration_id: MigrationId,
        reason: String,
    },
    /// Signed [`crate::evidence::StreamBody`]: what the source sent.
    Commit {
        signed: Signed,
    },
    /// Signed [`crate::evidence::StreamBody`]: what the destination received and resumed.
    Receipt {
        signed: Signed,
    },
    /// Signed [`crate::evidence::AbortBody`] when the sender could sign it.
    Abort {
        migration_id: MigrationId,
        reason: String,
        signed: Option<Signed>,
    },
    /// First message of an extra data stream (a QEMU multifd channel) of a
    /// migration already offered and accepted on another connection.
    StreamJoin {
        migration_id: MigrationId,
        index: u8,
    },
    /// First message of a libvirt migration's daemon-to-daemon control
    /// connection, carried both ways on its own connection.
    ControlJoin {
        migration_id: MigrationId,
    },
    /// libvirt, destination to source: my QEMU loaded the whole stream and
    /// waits (its final return-path message held) for the Commit.
    Loaded {
        migration_id: MigrationId,
    },
    /// Post-copy, destination to source: my QEMU holds the switchover
    /// package and waits, paused, for the source's Commit.
    PostcopyReady {
        migration_id: MigrationId,
    },
    /// Post-copy, source to destination on a new connection after the link
    /// broke: resume the paused stream.
    PostcopyRecover {
        migration_id: MigrationId,
    },
    /// Destination: my QEMU listens for the resumed stream.
    PostcopyRecoverReady {
        migration_id: MigrationId,
    },
    /// Source to destination on a new connection: what became of it?
    Query {
        migration_id: MigrationId,
        vm: VmName,
    },
    /// The destination's signed word for its outcome: the Receipt
    /// (`completed`), the hand-over (`postcopy_active`), or an Abort bound
    /// to the query's own connection (`aborted`, `unknown`).
    QueryReply {
        migration_id: MigrationId,
        outcome: DestinationOutcome,
        signed: Option<Signed>,
    },
    /// Post-copy, source to destination on a new connection: my half is
    /// gone, and with it the pages only it held.
    PostcopyLost {
        migration_id: MigrationId,
    },
    /// Destination: recorded; the frozen half is the operator's now.
    PostcopyLostAck {
        migration_id: MigrationId,
    },
}

impl PeerMessage {
    /// The migration a message names: in the clear, or inside a signed
    /// body (not verified here: only for echoing back in a refusal).
    pub fn migration_id(&self) -> Option<MigrationId> {
        match self {
            PeerMessage::Attest { migration_id, .. }
            | PeerMessage::Refuse { migration_id, .. }
            | PeerMessage::Abort { migration_id, .. }
            | PeerMessage::StreamJoin { migration_id, .. }
            | PeerMessage::ControlJoin { migration_id }
            | PeerMessage::Loaded { migration_id }
            | PeerMessage::PostcopyReady { migration_id }
            | PeerMessage::PostcopyRecover { migration_id }
            | PeerMessage::PostcopyRecoverReady { migration_id }
            | PeerMessage::Query { migration_id, .. }
            | PeerMessage::QueryReply { migration_id, .. }
            | PeerMessage::PostcopyLost { migration_id }
            | PeerMessage::PostcopyLostAck { migration_id } => Some(*migration_id),
            PeerMessage::Offer { signed }
            | PeerMessage::Accept { signed }
            | PeerMessage::Commit { signed }
            | PeerMessage::Receipt { signed } => {
                let body: serde_json::Value = serde_json::from_str(&signed.body).ok()?;
                body.get("migration_id")?.as_str()?.parse().ok()
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            PeerMessage::Attest { .. } => "attest",
            PeerMessage::Offer { .. } => "offer",
            PeerMessage::Accept { .. } => "accept",
            PeerMessage::Refuse { .. } => "refuse",
            PeerMessage::Commit { .. } => "commit",
            PeerMessage::Receipt { .. } => "receipt",
            PeerMessage::Abort { .. } => "abort",
            PeerMessage::StreamJoin { .. } => "stream_join",
            PeerMessage::ControlJoin { .. } => "control_join",
            PeerMessage::Loaded { .. } => "loaded",
            PeerMessage::PostcopyReady { .. } => "postcopy_ready",
            PeerMessage::PostcopyRecover { .. } => "postcopy_recover",
            PeerMessage::PostcopyRecoverReady { .. } => "postcopy_recover_ready",
            PeerMessage::Query { .. } => "query",
            PeerMessage::QueryReply { .. } => "query_reply",
            PeerMessage::PostcopyLost { .. } => "postcopy_lost",
            PeerMessage::PostcopyLostAck { .. } => "postcopy_lost_ack",
        }
    }
}

/// The binding carried in an offer: the connection's TLS exporter (label
/// [`BINDING_LABEL`], empty context) hashed with the migration id, so the
/// offer is valid on this connection, for this migration, only.
pub fn offer_binding(exporter: &[u8; 32], id: &MigrationId) -> Digest32 {
    let mut h = blake3::Hasher::new();
    h.update(b"ferry offer binding v1");
    h.update(exporter);
    h.update(id.as_bytes());
    Digest32(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_and_types_are_refused() {
        let ok = r#"{"type":"abort","migration_id":"019ac0b2-6b8e-7c3a-9d1e-2f3a4b5c6d7e","reason":"x","signed":null}"#;
        assert!(serde_json::from_str::<PeerMessage>(ok).is_ok());
        let extra = ok.replace("\"reason\"", "\"evil\":1,\"reason\"");
        assert!(serde_json::from_str::<PeerMessage>(&extra).is_err());
        let unknown = ok.replace("abort", "launch_qemu");
        assert!(serde_json::from_str::<PeerMessage>(&unknown).is_err());
        let req = r#"{"op":"migrate","vm":"../x","to":"host2","wait":true}"#;
        assert!(serde_json::from_str::<ApiRequest>(req).is_err(), "VM names are validated");
        let qmp = r#"{"op":"vm_qmp","vm":"g","command":"query-status","arguments":{"a":1}}"#;
        assert!(serde_json::from_str::<ApiRequest>(qmp).is_ok());
        let list = qmp.replace(r#"{"a":1}"#, "[1]");
        assert!(serde_json::from_str::<ApiRequest>(&list).is_err(), "QMP arguments are an object");
    }
}
