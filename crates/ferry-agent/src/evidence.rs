//! Signed protocol messages and the audit log (R5, R6). Every Offer,
//! Accept, Commit, Receipt and Abort is signed by its sender's host key
//! (bound to its certificate) and names the migration, both hosts, the VM
//! and the channel binding of the connection it was sent on. Each side logs
//! what it signs before sending it and what it receives before acting on
//! it; a step whose record cannot be written does not happen.

use ferry_audit::{AuditEvent, LogHead, Signed};
use ferry_types::{Digest32, HostName, MigrationId, SpiffeId, VmName};
use ferry_vmm::VmSpec;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::Agent;

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

impl Agent {
    /// Sign `body` as `kind` with this host's key.
    pub fn sign<T: Serialize>(&self, kind: &str, body: &T) -> Result<Signed, String> {
        let log = self.audit.lock().map_err(|_| "audit log lock poisoned".to_owned())?;
        Signed::sign(kind, body, log.signer())
            .map_err(|e| format!("cannot sign the {kind}: {}", crate::chain(&e)))
    }

    pub fn log_head(&self) -> LogHead {
        match self.audit.lock() {
            Ok(l) => l.head(),
            Err(p) => p.into_inner().head(),
        }
    }

    /// Verify a peer's signed message: signature, certificate chain to the
    /// cluster CA, signer == `from`, and every address field as expected.
    pub fn verify_from<T: DeserializeOwned + Addressed>(
        &self,
        signed: &Signed,
        kind: &str,
        from: &HostName,
        expect: &Expect<'_>,
    ) -> Result<T, String> {
        let (body, signer): (T, SpiffeId) = signed
            .verify(kind, &self.ca_trust)
            .map_err(|e| format!("{kind} from {from}: {}", crate::chain(&e)))?;
        let signer_host = match signer {
            SpiffeId::Host { name, .. } => name,
            other => return Err(format!("{kind} signed by {other}, not by a host")),
        };
        // SECURITY: a valid signature by another host of the cluster is not
        // this peer's word.
        if &signer_host != from {
            return Err(format!("{kind} is signed by {signer_host}, expected {from}"));
        }
        let (id, source, destination, vm, binding) = body.address();
        if id != expect.id
            || source != expect.source
            || destination != expect.destination
            || vm != expect.vm
        {
            return Err(format!(
                "{kind} from {from} is about migration {id} of {vm} {source} -> {destination}, expected {} of {} {} -> {}",
                expect.id, expect.vm, expect.source, expect.destination
            ));
        }
        if let Some(b) = expect.binding {
            if binding != b {
                return Err(format!(
                    "{kind} from {from} is bound to another connection (replayed or relayed)"
                ));
            }
        }
        Ok(body)
    }

    /// Append to the audit log durably. Err means the step must not happen.
    pub async fn audit(&self, event: AuditEvent) -> Result<u64, String> {
        let log = self.audit.clone();
        let kind = event.kind.clone();
        tokio::task::spawn_blocking(move || {
            let mut log = log.lock().map_err(|_| "audit log lock poisoned".to_owned())?;
            log.append(&event).map_err(|e| {
                format!("cannot write the audit record ({kind}): {}", crate::chain(&e))
            })
        })
        .await
        .map_err(|e| format!("audit task failed: {e}"))?
    }
}

/// An audit event about a migration.
pub fn event(
    kind: &str,
    id: &MigrationId,
    vm: &VmName,
    peer: &HostName,
    detail: serde_json::Value,
    signed: Option<Signed>,
) -> AuditEvent {
    AuditEvent {
        kind: kind.to_owned(),
        migration_id: Some(id.to_string()),
        vm: Some(vm.to_string()),
        peer: Some(peer.to_string()),
        detail,
        signed,
    }
}
