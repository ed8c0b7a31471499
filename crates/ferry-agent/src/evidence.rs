//! Signed protocol messages and the audit log (R5, R6). Every Offer,
//! Accept, Commit, Receipt and Abort is signed by its sender's host key
//! (bound to its certificate) and names the migration, both hosts, the VM
//! and the channel binding of the connection it was sent on. Each side logs
//! what it signs before sending it and what it receives before acting on
//! it; a step whose record cannot be written does not happen.

use ferry_audit::LogHead;
use ferry_types::{Digest32, HostName, MigrationId, VmName};
use ferry_vmm::VmSpec;
use serde::{Deserialize, Serialize};

pub const OFFER: &str = "offer";
pub const ACCEPT: &str = "accept";
pub const COMMIT: &str = "commit";
pub const RECEIPT: &str = "receipt";
pub const ABORT: &str = "abort";
/// Post-copy: the source's Commit to the stream up to the switch.
pub const SWITCHOVER: &str = "switchover";
/// Post-copy: the destination's Receipt for it; it runs the VM from here.
pub const HANDOVER: &str = "handover";

// Every body repeats the same address fields (migration id, both hosts, the
// VM, the channel binding, the signer's log head) rather than flattening a
// shared header: serde's `flatten` cannot be combined with
// `deny_unknown_fields`, and a signed body must refuse unknown fields.
// `Addressed` below checks them the same way for every kind.

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OfferBody {
    pub migration_id: MigrationId,
    pub source: HostName,
    pub destination: HostName,
    pub vm: VmName,
    pub channel_binding: Digest32,
    pub log_head: LogHead,
    pub spec: VmSpec,
    pub labels: ferry_policy::VmLabels,
    /// The offer is void after this instant (UNIX ms).
    pub not_after_unix_ms: u64,
    /// Data streams: 1, or 1 + QEMU multifd channels.
    #[serde(default = "one_stream")]
    pub streams: u8,
    /// The source may switch to post-copy; the destination's policy decides.
    #[serde(default)]
    pub postcopy: bool,
}

fn one_stream() -> u8 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AcceptBody {
    pub migration_id: MigrationId,
    pub source: HostName,
    pub destination: HostName,
    pub vm: VmName,
    pub channel_binding: Digest32,
    pub log_head: LogHead,
}

/// Commit (source) and Receipt (destination): what moved.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StreamBody {
    pub migration_id: MigrationId,
    pub source: HostName,
    pub destination: HostName,
    pub vm: VmName,
    pub channel_binding: Digest32,
    pub log_head: LogHead,
    pub bytes: u64,
    pub digest: Digest32,
    /// In a Receipt: how long the guest was stopped, as the destination's
    /// hypervisor reports it for the switchover (libvirt's completed job), when
    /// only it knows. Absent in Commits and in older bodies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_downtime_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AbortBody {
    pub migration_id: MigrationId,
    pub source: HostName,
    pub destination: HostName,
    pub vm: VmName,
    pub channel_binding: Digest32,
    pub log_head: LogHead,
    pub reason: String,
}

/// The parts of a body checked against what this side expects.
pub trait Addressed {
    fn address(&self) -> (&MigrationId, &HostName, &HostName, &VmName, &Digest32);
}

macro_rules! addressed {
    ($($t:ty),*) => {$(
        impl Addressed for $t {
            fn address(&self) -> (&MigrationId, &HostName, &HostName, &VmName, &Digest32) {
                (&self.migration_id, &self.source, &self.destination, &self.vm, &self.channel_binding)
            }
        }
    )*};
}
addressed!(OfferBody, AcceptBody, StreamBody, AbortBody);

/// What a verified message must be about.
pub struct Expect<'a> {
    pub id: &'a MigrationId,
    pub source: &'a HostName,
    pub destination: &'a HostName,
    pub vm: &'a VmName,
    /// None when the message comes over another connection (a receipt
    /// relayed in answer to an in-doubt query).
    pub binding: Option<&'a Digest32>,
}
