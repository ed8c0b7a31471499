//! Ferry-owned QEMUs: launched by this agent from validated specs
//! (daemonized, so they outlive an agent crash), driven over QMP, and
//! adopted again after a restart.

mod console;
mod destination;
mod postcopy;
mod source;
mod vms;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use ferry_policy::VmLabels;
use ferry_session::VmFacts;
use ferry_types::{MigrationId, VmName};
use ferry_vmm::{Accel, LaunchMode, MigrationState, MigrationStatus, QemuConfig, RunState};
use ferry_vmm::{SharedQmp, VmSpec};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use super::{BackendError, ChannelKind, Outgoing, PostcopyBackend, VmBackend, VmDescription};
use crate::checks::{AdmittedOffer, DigestsMatch};
use crate::plan::TransferPlan;
use crate::protocol::VmInfo;
use vms::VmEntry;

pub struct QemuBackend {
    cfg: QemuConfig,
    accel: Accel,
    /// Where a migrated-away VM's directory (its console log) is kept.
    departed: PathBuf,
    vms: Mutex<BTreeMap<VmName, VmEntry>>,
    /// Names of incoming VMs being launched (not yet in `vms`), by migration.
    reserved: std::sync::Mutex<HashMap<VmName, MigrationId>>,
}

impl QemuBackend {
    pub fn new(cfg: QemuConfig, departed: PathBuf) -> Result<Self, BackendError> {
        let accel =
            ferry_vmm::resolve_accel(cfg.accel).map_err(BackendError::qemu("accelerator"))?;
        std::fs::create_dir_all(&cfg.run_dir).map_err(|source| BackendError::Io {
            what: format!("creating {}", cfg.run_dir.display()),
            source,
        })?;
        Ok(Self {
            cfg,
            accel,
            departed,
            vms: Mutex::new(BTreeMap::new()),
            reserved: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The VM's QMP handle, whatever holds it.
    async fn qmp(&self, vm: &VmName) -> Result<SharedQmp, BackendError> {
        self.vms
            .lock()
            .await
            .get(vm)
            .map(|e| e.qmp.clone())
            .ok_or_else(|| BackendError::NoSuchVm(vm.clone()))
    }

    async fn dir(&self, vm: &VmName) -> Result<PathBuf, BackendError> {
        self.vms
            .lock()
            .await
            .get(vm)
            .map(|e| e.proc.dir.clone())
            .ok_or_else(|| BackendError::NoSuchVm(vm.clone()))
    }

    /// Kill a VM's QEMU and forget it, whatever state it is in.
    async fn remove(&self, vm: &VmName) -> Result<Option<VmEntry>, BackendError> {
        let entry = self.vms.lock().await.remove(vm);
        if let Some(e) = &entry {
            vms::kill(&e.proc).await.map_err(BackendError::qemu("stopping QEMU"))?;
        }
        Ok(entry)
    }
}

#[async_trait]
impl VmBackend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn accel(&self) -> &'static str {
        self.accel.qemu_name()
    }

    async fn list(&self) -> Vec<VmInfo> {
        let vms = self.vms.lock().await;
        let mut out = Vec::with_capacity(vms.len());
        for entry in vms.values() {
            out.push(entry.info().await);
        }
        out
    }

    async fn count(&self) -> usize {
        self.vms.lock().await.len()
    }

    async fn residents(&self) -> Vec<VmDescription> {
        let vms = self.vms.lock().await;
        vms.values()
            .map(|e| VmDescription { spec: e.spec.clone(), labels: e.labels.clone() })
            .collect()
    }

    async fn start(&self, spec: &VmSpec, labels: &VmLabels) -> Result<VmInfo, BackendError> {
        let mut table = self.vms.lock().await;
        let reserved = self.reserved.lock().map(|r| r.contains_key(&spec.name)).unwrap_or(true);
        if table.contains_key(&spec.name) || reserved {
            return Err(BackendError::Exists(spec.name.clone()));
        }
        let entry = vms::launch(&self.cfg, spec, labels, LaunchMode::Run)
            .await
            .map_err(BackendError::qemu("starting the VM"))?;
        let info = entry.info().await;
        table.insert(spec.name.clone(), entry);
        Ok(info)
    }

    async fn stop(&self, vm: &VmName) -> Result<(), BackendError> {
        let mut table = self.vms.lock().await;
        let entry = table.get(vm).ok_or_else(|| BackendError::NoSuchVm(vm.clone()))?;
        if let Some(id) = entry.busy {
            return Err(BackendError::Busy { vm: vm.clone(), id });
        }
        vms::kill(&entry.proc).await.map_err(BackendError::qemu("stopping the VM"))?;
        let _ = std::fs::remove_dir_all(&entry.proc.dir);
        table.remove(vm);
        Ok(())
    }

    async fn adopt(&self) -> Result<usize, BackendError> {
        let (live, dead) =
            vms::adopt_all(&self.cfg.run_dir).await.map_err(BackendError::qemu("adopting VMs"))?;
        for dir in dead {
            tracing::warn!(dir = %dir.display(), "removing the directory of a VM whose QEMU is gone");
            let _ = std::fs::remove_dir_all(&dir);
        }
        let mut table = self.vms.lock().await;
        let n = live.len();
        for entry in live {
            tracing::info!(vm = %entry.spec.name, pid = entry.proc.pid, "adopted running VM");
            table.insert(entry.spec.name.clone(), entry);
        }
        Ok(n)
    }

    async fn facts(&self, vm: &VmName) -> VmFacts {
        let Ok(qmp) = self.qmp(vm).await else { return VmFacts::Gone };
        let mut q = qmp.lock().await;
        let running = matches!(q.status().await, Ok(RunState::Running));
        let migration_completed =
            matches!(q.query_migrate().await, Ok(s) if s.status == MigrationState::Completed);
        VmFacts::Alive { running, migration_completed }
    }

    async fn hold(&self, vm: &VmName, id: MigrationId) -> Result<VmDescription, BackendError> {
        let mut table = self.vms.lock().await;
        let entry = table.get_mut(vm).ok_or_else(|| BackendError::NoSuchVm(vm.clone()))?;
        if let Some(other) = entry.busy {
            return Err(BackendError::Busy { vm: vm.clone(), id: other });
        }
        entry.busy = Some(id);
        Ok(VmDescription { spec: entry.spec.clone(), labels: entry.labels.clone() })
    }

    async fn claim(&self, vm: &VmName, id: MigrationId) {
        if let Some(e) = self.vms.lock().await.get_mut(vm) {
            e.busy = Some(id);
        }
    }

    async fn release(&self, vm: &VmName, id: MigrationId) {
        if let Some(e) = self.vms.lock().await.get_mut(vm) {
            if e.busy == Some(id) {
                e.busy = None;
            }
        }
        if let Ok(mut r) = self.reserved.lock() {
            if r.get(vm) == Some(&id) {
                r.remove(vm);
            }
        }
    }

    async fn forget(&self, vm: &VmName) -> Result<(), BackendError> {
        let mut table = self.vms.lock().await;
        if table.get(vm).is_some_and(|e| !e.proc.is_alive()) {
            if let Some(entry) = table.remove(vm) {
                let _ = std::fs::create_dir_all(&self.departed);
                let name = format!("{vm}-lost-{}", crate::records::now_unix_ms());
                let _ = std::fs::rename(&entry.proc.dir, self.departed.join(name));
            }
        }
        Ok(())
    }

    async fn migrate_out(&self, vm: &VmName, plan: TransferPlan) -> Result<Outgoing, BackendError> {
        self.start_outgoing(vm, plan).await
    }

    async fn outgoing_status(&self, vm: &VmName) -> Result<MigrationStatus, BackendError> {
        let qmp = self.qmp(vm).await?;
        let status = qmp.lock().await.query_migrate().await;
        status.map_err(BackendError::qemu("query-migrate"))
    }

    async fn resume_source(&self, vm: &VmName) -> Result<(), BackendError> {
        self.roll_back(vm).await
    }

    async fn retire_source(&self, vm: &VmName, id: MigrationId) -> Result<(), BackendError> {
        self.retire(vm, id).await
    }

    async fn reserve_incoming(&self, vm: &VmName, id: MigrationId) -> bool {
        let taken = self.vms.lock().await.contains_key(vm);
        match self.reserved.lock() {
            Ok(mut r) if !taken && !r.contains_key(vm) => {
                r.insert(vm.clone(), id);
                true
            }
            _ => false,
        }
    }

    async fn launch_incoming(&self, offer: &AdmittedOffer) -> Result<(), BackendError> {
        self.launch_for(offer).await
    }

    async fn connect_incoming(
        &self,
        vm: &VmName,
        kind: ChannelKind,
    ) -> Result<UnixStream, BackendError> {
        // QEMU 7.2 takes the first connection as the main channel, and
        // multifd channels after it, all on the same socket.
        let _ = kind;
        destination::connect_retry(&self.dir(vm).await?.join(destination::INCOMING_SOCK)).await
    }

    async fn wait_loaded(&self, vm: &VmName, timeout: Duration) -> Result<(), BackendError> {
        let qmp = self.qmp(vm).await?;
        ferry_vmm::wait_migration_done(&qmp, Duration::from_millis(10), timeout)
            .await
            .map(drop)
            .map_err(BackendError::qemu("loading the incoming stream"))
    }

    async fn open_gate(&self, vm: &VmName, proof: DigestsMatch) -> Result<(), BackendError> {
        // SECURITY: `proof` is the resume verdict; QEMU was started with -S
        // and autostart off, so this `cont` is the only way it runs.
        let _ = proof;
        let qmp = self.qmp(vm).await?;
        let resumed = qmp.lock().await.cont().await;
        resumed.map_err(BackendError::qemu("resuming the VM"))
    }

    async fn discard_incoming(&self, vm: &VmName, id: MigrationId) -> Result<(), BackendError> {
        let held = self.vms.lock().await.get(vm).map(|e| e.busy);
        if let Ok(mut r) = self.reserved.lock() {
            if r.get(vm) == Some(&id) {
                r.remove(vm);
            }
        }
        // Only the incoming VM of this migration: never a VM that happens to
        // carry the same name.
        if held == Some(Some(id)) {
            if let Some(entry) = self.remove(vm).await? {
                let _ = std::fs::remove_dir_all(&entry.proc.dir);
            }
        }
        Ok(())
    }

    async fn diagnose(
        &self,
        vm: &VmName,
        command: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, BackendError> {
        // The VM's one QMP connection may be mid-way through a migration
        // step: wait for it, within reason.
        const QMP_WAIT: Duration = Duration::from_secs(10);
        let qmp = self.qmp(vm).await?;
        let mut q = tokio::time::timeout(QMP_WAIT, qmp.lock())
            .await
            .map_err(|_| BackendError::QmpBusy { vm: vm.clone(), after: QMP_WAIT })?;
        q.execute(command, args).await.map_err(BackendError::qemu("a diagnostic command"))
    }

    fn postcopy(&self) -> Option<&dyn PostcopyBackend> {
        Some(self)
    }
}
