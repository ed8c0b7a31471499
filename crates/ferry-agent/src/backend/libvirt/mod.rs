//! libvirt's domains: libvirt owns them and runs their migrations
//! (peer-to-peer, to a daemon URI and a stream URI that are this agent's
//! local sockets); Ferry carries every byte between the hosts.
//!
//! * [`source`]: the migration's local sockets on the source, who may
//!   connect to them, and libvirt's migrate call.
//! * [`destination`]: where those connections go on the destination: the
//!   control connection through the allowlist to libvirtd, the stream to
//!   the QEMU libvirt prepared, its return path held until the gate opens.

mod destination;
mod refusal;
mod source;

pub use refusal::{Refusal, RefusalKind, Refusals};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferry_libvirt::client::State;
use ferry_libvirt::{vtpm, DomainFacts, Libvirt, LibvirtError};
use ferry_policy::VmLabels;
use ferry_session::VmFacts;
use ferry_types::{MigrationId, VmName};
use ferry_vmm::{MigrationStatus, VmSpec};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use super::{Adopted, BackendError, ChannelKind, Outgoing, Retired};
use super::{VmBackend, VmDescription};
use crate::checks::{AdmittedOffer, DigestsMatch};
use crate::plan::TransferPlan;
use crate::protocol::VmInfo;
use crate::vtpm::Departure;

const NAME: &str = "libvirt";

pub struct LibvirtConfig {
    pub uri: String,
    pub run_dir: PathBuf,
    pub socket_dir: PathBuf,
    /// How long the destination waits for libvirt to run the VM once the
    /// gate opened.
    pub resume_wait: Duration,
    /// Where libvirt keeps its domains' swtpm state (a directory per UUID).
    pub swtpm_state_root: PathBuf,
    /// Where connections and calls refused mid-migration are reported, for
    /// the agent to audit and count.
    pub refusals: Refusals,
}

pub struct LibvirtBackend {
    lv: Arc<Libvirt>,
    cfg: LibvirtConfig,
    /// VMs held by a migration.
    held: std::sync::Mutex<HashMap<VmName, MigrationId>>,
    outgoing: Mutex<HashMap<VmName, source::Migrating>>,
    incoming: Mutex<HashMap<VmName, destination::Arriving>>,
    /// What libvirt's swtpm and QEMU on this host can emulate.
    vtpm: ferry_vmm::VtpmSupport,
}

impl LibvirtBackend {
    pub fn new(cfg: LibvirtConfig) -> Result<Self, BackendError> {
        std::fs::create_dir_all(&cfg.socket_dir).map_err(|source| BackendError::Io {
            what: format!("creating {}", cfg.socket_dir.display()),
            source,
        })?;
        restrict(&cfg.socket_dir)?;
        Ok(Self {
            lv: Arc::new(Libvirt::new(&cfg.uri)),
            cfg,
            held: Default::default(),
            outgoing: Default::default(),
            incoming: Default::default(),
            vtpm: ferry_vmm::VtpmSupport::none("not probed yet"),
        })
    }

    /// The vTPMs libvirt can give domains here: those of the swtpm and QEMU
    /// it runs (found on the PATH, as libvirt finds them).
    pub async fn probe_vtpm(mut self, swtpm: &std::path::Path, qemu: &std::path::Path) -> Self {
        self.vtpm = ferry_vmm::vtpm::probe(swtpm, qemu).await;
        tracing::info!(vtpm = %self.vtpm.summary(), "vTPM support under libvirt");
        self
    }

    /// A libvirt call on a blocking thread (each is an RPC to libvirtd).
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Libvirt) -> Result<T, LibvirtError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let lv = self.lv.clone();
        tokio::task::spawn_blocking(move || f(&lv))
            .await
            .map_err(|e| BackendError::Libvirt(format!("a libvirt call failed: {e}")))?
            .map_err(|e| BackendError::Libvirt(crate::report::report(&e)))
    }

    async fn state(&self, vm: &VmName) -> Result<Option<State>, BackendError> {
        let name = vm.to_string();
        self.call(move |lv| lv.state(&name)).await
    }

    /// The domain as Ferry describes it; a domain Ferry cannot describe
    /// exactly (passthrough arguments, other machines) is named with why.
    async fn describe(&self, vm: &VmName) -> Result<(DomainFacts, VmDescription), BackendError> {
        let name = vm.to_string();
        let xml = self.call(move |lv| lv.xml(&name)).await?;
        let facts = DomainFacts::parse(&xml).map_err(|e| BackendError::Domain(e.to_string()))?;
        let spec = facts.spec().map_err(|e| BackendError::Domain(e.to_string()))?;
        let labels = facts.labels.clone().unwrap_or_default();
        Ok((facts, VmDescription { spec, labels }))
    }

    fn pid_file(&self, vm: &VmName) -> PathBuf {
        self.cfg.run_dir.join("qemu").join(format!("{vm}.pid"))
    }

    /// The domain's QEMU process, from libvirt's pid file.
    fn qemu_pid(&self, vm: &VmName) -> Option<i32> {
        std::fs::read_to_string(self.pid_file(vm)).ok()?.trim().parse().ok()
    }

    /// A migration's own directory of local sockets.
    fn migration_dir(&self, id: MigrationId) -> PathBuf {
        self.cfg.socket_dir.join(id.to_string())
    }

    fn held_by(&self, vm: &VmName) -> Option<MigrationId> {
        self.held.lock().ok()?.get(vm).copied()
    }
}

/// SECURITY: whoever can reach a migration's sockets could feed the VM's
/// stream; only root (libvirt's daemon, this agent) may enter the directory.
fn restrict(dir: &std::path::Path) -> Result<(), BackendError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|source| BackendError::Io { what: format!("securing {}", dir.display()), source })
}

#[async_trait]
impl VmBackend for LibvirtBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn accel(&self) -> &'static str {
        "libvirt"
    }

    fn managed(&self) -> bool {
        true
    }

    fn vtpm_support(&self) -> ferry_vmm::VtpmSupport {
        self.vtpm.clone()
    }

    async fn list(&self) -> Vec<VmInfo> {
        let Ok(active) = self.call(|lv| lv.active()).await else { return Vec::new() };
        active
            .into_iter()
            .filter_map(|a| {
                let facts = DomainFacts::parse(&a.xml).ok()?;
                let name: VmName = a.name.parse().ok()?;
                let pid = self.qemu_pid(&name).unwrap_or(0) as u32;
                Some(VmInfo {
                    migration: self.held_by(&name),
                    name,
                    state: a.state.name().into(),
                    pid,
                    accel: facts.virt_type.clone(),
                    memory_mib: (facts.memory_kib / 1024) as u32,
                    vcpus: facts.vcpus,
                    console_log: facts.serial_log.clone().unwrap_or_default(),
                    tpm: facts.spec().map(|s| s.tpm).unwrap_or_default(),
                })
            })
            .collect()
    }

    async fn count(&self) -> usize {
        self.call(|lv| lv.active()).await.map(|a| a.len()).unwrap_or(0)
    }

    async fn residents(&self) -> Vec<VmDescription> {
        let Ok(active) = self.call(|lv| lv.active()).await else { return Vec::new() };
        active
            .iter()
            .filter_map(|a| {
                let facts = DomainFacts::parse(&a.xml).ok()?;
                let spec = facts.spec().ok()?;
                Some(VmDescription { spec, labels: facts.labels.unwrap_or_default() })
            })
            .collect()
    }

    async fn start(&self, _spec: &VmSpec, _labels: &VmLabels) -> Result<VmInfo, BackendError> {
        Err(BackendError::Unsupported {
            backend: NAME,
            what: "start VMs (libvirt owns them: define and start domains with virsh)",
        })
    }

    async fn stop(&self, _vm: &VmName) -> Result<(), BackendError> {
        Err(BackendError::Unsupported {
            backend: NAME,
            what: "stop VMs (libvirt owns them: use virsh)",
        })
    }

    async fn adopt(&self, _departures: &[Departure]) -> Result<Adopted, BackendError> {
        // libvirt keeps its domains across agent restarts; nothing to take back.
        let vms = self.call(|lv| lv.active()).await?.len();
        Ok(Adopted { vms, refused: Vec::new() })
    }

    async fn facts(&self, vm: &VmName) -> VmFacts {
        match self.state(vm).await {
            Ok(Some(State::Running)) => {
                VmFacts::Alive { running: true, migration_completed: false }
            }
            Ok(Some(State::Paused)) => {
                VmFacts::Alive { running: false, migration_completed: false }
            }
            _ => VmFacts::Gone,
        }
    }

    async fn hold(&self, vm: &VmName, id: MigrationId) -> Result<VmDescription, BackendError> {
        if let Some(other) = self.held_by(vm) {
            return Err(BackendError::Busy { vm: vm.clone(), id: other });
        }
        match self.state(vm).await? {
            Some(State::Running) | Some(State::Paused) => {}
            _ => return Err(BackendError::NoSuchVm(vm.clone())),
        }
        let (facts, description) = self.describe(vm).await?;
        if let ferry_vmm::Boot::Domain { uuid } = &description.spec.boot {
            // Refused before the Offer: a vTPM whose state would not travel
            // in the stream, or that the destination could reach anyway.
            vtpm::check_movable(&facts, uuid, &self.cfg.swtpm_state_root)
                .map_err(|e| BackendError::Domain(crate::report::report(&e)))?;
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(other) = held.get(vm) {
            return Err(BackendError::Busy { vm: vm.clone(), id: *other });
        }
        held.insert(vm.clone(), id);
        Ok(description)
    }

    async fn claim(&self, vm: &VmName, id: MigrationId) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).insert(vm.clone(), id);
    }

    async fn release(&self, vm: &VmName, id: MigrationId) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.get(vm) == Some(&id) {
            held.remove(vm);
        }
    }

    async fn forget(&self, vm: &VmName) -> Result<(), BackendError> {
        self.outgoing.lock().await.remove(vm);
        Ok(())
    }

    async fn migrate_out(&self, vm: &VmName, plan: TransferPlan) -> Result<Outgoing, BackendError> {
        self.start_outgoing(vm, plan).await
    }

    async fn outgoing_status(&self, vm: &VmName) -> Result<MigrationStatus, BackendError> {
        self.outgoing_progress(vm).await
    }

    async fn resume_source(&self, vm: &VmName) -> Result<(), BackendError> {
        self.roll_back(vm).await
    }

    async fn retire_source(&self, vm: &VmName, id: MigrationId) -> Result<Retired, BackendError> {
        let vtpm = self.retire(vm, id).await?;
        Ok(Retired { vtpm })
    }

    async fn reserve_incoming(&self, vm: &VmName, id: MigrationId) -> bool {
        self.reserve(vm, id).await
    }

    async fn launch_incoming(&self, offer: &AdmittedOffer) -> Result<(), BackendError> {
        self.prepare_arrival(offer).await
    }

    async fn connect_incoming(
        &self,
        vm: &VmName,
        kind: ChannelKind,
    ) -> Result<UnixStream, BackendError> {
        self.connect_arrival(vm, kind).await
    }

    async fn wait_loaded(&self, vm: &VmName, timeout: Duration) -> Result<(), BackendError> {
        self.arrival_loaded(vm, timeout).await
    }

    async fn open_gate(&self, vm: &VmName, proof: DigestsMatch) -> Result<(), BackendError> {
        self.release_arrival(vm, proof).await
    }

    async fn discard_incoming(&self, vm: &VmName, id: MigrationId) -> Result<(), BackendError> {
        self.discard_arrival(vm, id).await
    }

    async fn arrival_downtime(&self, vm: &VmName) -> Option<u64> {
        self.arrived_downtime(vm).await
    }
}
