//! What the libvirt backend refuses on its own, while a migration runs: a
//! local process on a migration's socket, a call on libvirt's control
//! connection. The backend cannot write the audit log; it reports each
//! refusal here and the agent audits and counts it (`crate::refusals`).

use ferry_types::{MigrationId, VmName};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// A process other than libvirt's daemon or the domain's QEMU connected
    /// to a migration's local socket on the source.
    LocalConnection,
    /// The source's libvirtd sent a call the control connection's
    /// allowlist refuses (the destination).
    ControlCall,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub migration: MigrationId,
    pub vm: VmName,
    pub kind: RefusalKind,
    pub why: String,
}

/// The sending end; without a receiver (tests of the backend alone) a
/// refusal is only logged.
#[derive(Debug, Clone, Default)]
pub struct Refusals(Option<mpsc::UnboundedSender<Refusal>>);

impl Refusals {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Refusal>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(Some(tx)), rx)
    }

    pub fn report(&self, migration: MigrationId, vm: &VmName, kind: RefusalKind, why: String) {
        tracing::warn!(%migration, %vm, ?kind, %why, "refused");
        if let Some(tx) = &self.0 {
            let _ = tx.send(Refusal { migration, vm: vm.clone(), kind, why });
        }
    }
}
