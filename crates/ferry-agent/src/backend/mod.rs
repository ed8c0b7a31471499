//! The seam between a migration session and the VMs it moves. The session
//! decides (who may move what, when the VM may run where); a backend does
//! what it is told to its VMs and hands the session byte streams to carry.
//!
//! * [`qemu`]: Ferry-owned QEMUs, launched from validated specs, over QMP.
//! * A libvirt backend fits the same shapes: libvirt keeps the domain and
//!   runs its own managed migration, and what the session sees is the same.
//!   [`VmBackend::migrate_out`] hands over the connections libvirt's source
//!   side opens (its daemon-to-daemon control connection and QEMU's
//!   streams) as [`Channel`]s; [`VmBackend::launch_incoming`] prepares where
//!   each channel goes on the destination (libvirt launches QEMU itself in
//!   its Prepare phase); and [`VmBackend::open_gate`] releases QEMU's
//!   return-path "loaded" message instead of a QMP `cont`, which is what
//!   lets libvirt's Finish phase resume the VM.
//!
//! Every step that must follow a check takes the check's proof by value:
//! an incoming VM is launched only for an [`AdmittedOffer`], and it runs
//! only with a [`DigestsMatch`].

#[cfg(test)]
pub mod fake;
pub mod libvirt;
pub mod qemu;

use std::time::Duration;

use async_trait::async_trait;
use ferry_policy::VmLabels;
use ferry_types::{MigrationId, VmName};
use ferry_vmm::{Erased, MigrationStatus, VmSpec, VmmError, VtpmSupport};
use tokio::net::UnixStream;

use crate::checks::{AdmittedOffer, DigestsMatch};
use crate::plan::TransferPlan;
use crate::protocol::VmInfo;
use crate::vtpm::{Departure, StaleVtpm};
use ferry_session::VmFacts;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("no VM {0} here")]
    NoSuchVm(VmName),
    #[error("VM {vm} is held by migration {id}")]
    Busy { vm: VmName, id: MigrationId },
    #[error("a VM named {0} already exists here")]
    Exists(VmName),
    #[error("QEMU: {what}")]
    Qemu {
        what: &'static str,
        #[source]
        source: VmmError,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU did not connect its {what} within {after:?}")]
    NoConnection { what: String, after: Duration },
    #[error("QEMU's migration ended {0}")]
    Migration(String),
    #[error("VM {vm}'s QMP stayed busy for {after:?}")]
    QmpBusy { vm: VmName, after: Duration },
    #[error("{0}")]
    Libvirt(String),
    #[error("the domain cannot move with Ferry: {0}")]
    Domain(String),
    #[error("the {backend} backend cannot {what}")]
    Unsupported { backend: &'static str, what: &'static str },
    #[error("this host cannot host a {model} vTPM: it {short}")]
    NoVtpm { model: ferry_vmm::TpmModel, short: ferry_vmm::VtpmShortfall },
}

impl BackendError {
    pub(crate) fn qemu(what: &'static str) -> impl FnOnce(VmmError) -> BackendError {
        move |source| BackendError::Qemu { what, source }
    }
}

/// What a migration needs to know about a VM it moves or keeps company.
#[derive(Debug, Clone)]
pub struct VmDescription {
    pub spec: VmSpec,
    pub labels: VmLabels,
}

/// What a restarted agent took back under management, and what it refused.
#[derive(Debug, Default)]
pub struct Adopted {
    pub vms: usize,
    /// VM directories whose vTPM state must not be used (neither adopted
    /// nor removed: the operator finds out where they came from).
    pub refused: Vec<StaleVtpm>,
}

/// What retiring a source VM destroyed besides its process.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Retired {
    /// Its vTPM state, erased: the destination's is the only copy now.
    pub vtpm: Option<Erased>,
}

/// Which of a migration's byte streams a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    /// libvirt's daemon-to-daemon connection (its migration's RPCs).
    Control,
    /// QEMU's main migration stream (device state, RAM without multifd).
    Main,
    /// QEMU multifd channel `n` (1-based).
    Multifd(u8),
}

/// A byte stream the session carries between hosts.
pub struct Channel {
    pub kind: ChannelKind,
    pub stream: UnixStream,
}

/// The source side's streams, in the order the backend's VM opens them.
pub struct Outgoing {
    rx: tokio::sync::mpsc::Receiver<Result<Channel, BackendError>>,
}

impl Outgoing {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Result<Channel, BackendError>>) -> Self {
        Self { rx }
    }

    /// The next stream, or `None` once the VM opened all it will.
    pub async fn next(&mut self) -> Option<Result<Channel, BackendError>> {
        self.rx.recv().await
    }
}

#[async_trait]
pub trait VmBackend: Send + Sync {
    /// "qemu" or "libvirt", for `ferry status`.
    fn name(&self) -> &'static str;
    /// The accelerator VMs run with ("kvm" or "tcg").
    fn accel(&self) -> &'static str;
    /// The hypervisor's manager runs the migration itself (libvirt): a
    /// control connection travels too, the stream never ends before the
    /// gate (the destination says `Loaded` instead), and the return path
    /// always travels back.
    fn managed(&self) -> bool {
        false
    }

    /// What vTPMs this host can give its VMs (announced to sources).
    fn vtpm_support(&self) -> VtpmSupport {
        VtpmSupport::none(format!("the {} backend does not host vTPMs", self.name()))
    }

    // ---- inventory
    async fn list(&self) -> Vec<VmInfo>;
    async fn count(&self) -> usize;
    /// The VMs this host runs, for placement decisions.
    async fn residents(&self) -> Vec<VmDescription>;
    /// Start a VM on this host (`ferry vm start`).
    async fn start(&self, spec: &VmSpec, labels: &VmLabels) -> Result<VmInfo, BackendError>;
    /// Stop a VM no migration holds.
    async fn stop(&self, vm: &VmName) -> Result<(), BackendError>;
    /// After a restart: take the VMs that survived back under management,
    /// except those whose vTPM state is older than their VM's last
    /// `departures` from this host (SECURITY: no rollback, no clone).
    async fn adopt(&self, departures: &[Departure]) -> Result<Adopted, BackendError>;
    /// What a restarted agent finds of `vm`.
    async fn facts(&self, vm: &VmName) -> VmFacts;

    // ---- which migration owns a VM
    /// Reserve `vm` for migration `id`; refused if it is missing or held.
    async fn hold(&self, vm: &VmName, id: MigrationId) -> Result<VmDescription, BackendError>;
    /// Mark `vm` as held by `id` whatever held it (restart: the record says so).
    async fn claim(&self, vm: &VmName, id: MigrationId);
    /// Let go of `vm` if `id` holds it.
    async fn release(&self, vm: &VmName, id: MigrationId);
    /// Drop `vm` from the inventory if its process is gone (its console log
    /// is kept with the departed VMs); a live VM is left alone.
    async fn forget(&self, vm: &VmName) -> Result<(), BackendError>;

    // ---- source
    /// Start moving `vm` out; its streams arrive through [`Outgoing`].
    async fn migrate_out(&self, vm: &VmName, plan: TransferPlan) -> Result<Outgoing, BackendError>;
    /// The outgoing migration's state and counters.
    async fn outgoing_status(&self, vm: &VmName) -> Result<MigrationStatus, BackendError>;
    /// Undo: stop the outgoing migration if it runs and let the VM run here.
    async fn resume_source(&self, vm: &VmName) -> Result<(), BackendError>;
    /// The destination signed for the VM: quit this host's copy for good,
    /// and erase its vTPM state (the destination's is the only copy now).
    async fn retire_source(&self, vm: &VmName, id: MigrationId) -> Result<Retired, BackendError>;

    // ---- destination
    /// Reserve the name `vm` for incoming migration `id`; false if a VM or
    /// another migration has it.
    async fn reserve_incoming(&self, vm: &VmName, id: MigrationId) -> bool;
    /// Make `vm` ready to receive the offered streams (paused, never run).
    async fn launch_incoming(&self, offer: &AdmittedOffer) -> Result<(), BackendError>;
    /// Where an incoming stream goes.
    async fn connect_incoming(
        &self,
        vm: &VmName,
        kind: ChannelKind,
    ) -> Result<UnixStream, BackendError>;
    /// Wait until the VM loaded everything it was sent.
    async fn wait_loaded(&self, vm: &VmName, timeout: Duration) -> Result<(), BackendError>;
    /// SECURITY: the VM may run here only once the stream matched the
    /// source's signed Commit; this is the only way to let it run.
    async fn open_gate(&self, vm: &VmName, proof: DigestsMatch) -> Result<(), BackendError>;
    /// Once the VM runs here: the guest's downtime as this host's
    /// hypervisor reports it, for backends whose source cannot read it.
    async fn arrival_downtime(&self, _vm: &VmName) -> Option<u64> {
        None
    }
    /// Undo: the incoming VM must never run here.
    async fn discard_incoming(&self, vm: &VmName, id: MigrationId) -> Result<(), BackendError>;

    /// A read-only diagnostic command (the caller checked it against the
    /// allowlist), answered by the VM's hypervisor.
    async fn diagnose(
        &self,
        vm: &VmName,
        command: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, BackendError> {
        let _ = (vm, command, args);
        Err(BackendError::Unsupported { backend: self.name(), what: "run diagnostic commands" })
    }

    /// Post-copy, if this backend can do it.
    fn postcopy(&self) -> Option<&dyn PostcopyBackend> {
        None
    }
}

/// Where a source QEMU stands when its destination is ready to take over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchState {
    /// In post-copy with the VM stopped here: the destination may run it.
    Switched,
    /// QEMU sent everything already: a plain final Commit follows instead.
    Completed,
    /// Anything else (described): the destination must not run the VM.
    Not(String),
}

/// QEMU's post-copy (`postcopy-ram`): the destination runs the VM before
/// the last page arrived and fetches what it lacks over the return path.
#[async_trait]
pub trait PostcopyBackend: Send + Sync {
    /// Source: switch the running migration to post-copy if pre-copy falls
    /// behind; returns once switched or once there is nothing to switch.
    async fn switch_when_behind(&self, vm: &VmName);
    /// Source, when the destination reports the switchover package: where
    /// this host's QEMU stands.
    async fn switch_state(&self, vm: &VmName) -> Result<SwitchState, BackendError>;
    /// Destination: QEMU holds the switchover package, paused.
    async fn wait_switchover(&self, vm: &VmName) -> Result<bool, BackendError>;
    /// Either side: wait until QEMU noticed a broken link (true), or finished
    /// after all (false).
    async fn wait_paused(&self, vm: &VmName) -> Result<bool, BackendError>;
    /// Source: resume the paused post-copy into a fresh stream.
    async fn resume_out(&self, vm: &VmName) -> Result<UnixStream, BackendError>;
    /// Destination: listen again for the resumed stream.
    async fn listen_again(&self, vm: &VmName) -> Result<UnixStream, BackendError>;
    /// The VM's process lives (its pages with it).
    async fn alive(&self, vm: &VmName) -> bool;
}
