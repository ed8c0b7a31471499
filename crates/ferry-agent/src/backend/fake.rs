//! A backend of pretend VMs for the fast test tier: each VM's "memory" is a
//! few MiB of bytes derived from its name, its migration stream is exactly
//! those bytes, and a destination "loads" a stream only if it regenerates
//! the same bytes (as QEMU refuses a corrupt stream). Hooks let a test act
//! at the moments that matter (the gate opening, the source's stream done).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use ferry_policy::VmLabels;
use ferry_session::VmFacts;
use ferry_types::{MigrationId, VmName};
use ferry_vmm::{MigrationState, MigrationStatus, VmSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch, Mutex};

use super::{BackendError, Channel, ChannelKind, Outgoing, VmBackend, VmDescription};
use crate::checks::{AdmittedOffer, DigestsMatch};
use crate::plan::TransferPlan;
use crate::protocol::VmInfo;

/// How much pretend memory a VM has.
pub const MEMORY: usize = 3 << 20;

pub type Hook = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

#[derive(Default)]
pub struct Hooks {
    /// Runs inside `open_gate`, before the VM runs (and before the
    /// destination can send its receipt).
    pub before_gate: StdMutex<Option<Hook>>,
    /// Runs when the source's stream has been written out in full.
    pub stream_done: StdMutex<Option<Hook>>,
    /// Runs when the destination waits for its VM to load the stream.
    pub before_loaded: StdMutex<Option<Hook>>,
    /// The destination's VM refuses to load what it received.
    pub fail_load: std::sync::atomic::AtomicBool,
}

type Received = Arc<Mutex<Vec<u8>>>;
type Incoming = (Vec<Received>, watch::Receiver<usize>, watch::Sender<usize>);

pub struct FakeVm {
    pub spec: VmSpec,
    pub labels: VmLabels,
    pub running: bool,
    pub busy: Option<MigrationId>,
    pub outgoing: MigrationState,
    /// Destination: bytes received per stream index, and streams ended.
    incoming: Option<Incoming>,
}

#[derive(Default)]
pub struct Inner {
    pub vms: Mutex<BTreeMap<VmName, FakeVm>>,
    reserved: StdMutex<HashMap<VmName, MigrationId>>,
    pub hooks: Hooks,
}

/// Cloning shares the VMs: a test keeps a clone to look at them.
#[derive(Clone, Default)]
pub struct FakeBackend(pub Arc<Inner>);

/// The bytes a VM named `vm` holds.
pub fn memory_of(vm: &VmName) -> Vec<u8> {
    let mut x: u32 = vm.as_str().bytes().fold(0x9e37_79b9, |h, b| h.rotate_left(5) ^ u32::from(b));
    (0..MEMORY)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Stream `index` of `n`: a contiguous share of the memory.
fn share(memory: &[u8], index: usize, n: usize) -> &[u8] {
    let part = memory.len().div_ceil(n);
    let start = (index * part).min(memory.len());
    &memory[start..(start + part).min(memory.len())]
}

impl FakeBackend {
    pub async fn insert_running(&self, spec: VmSpec) {
        let vm = FakeVm {
            spec: spec.clone(),
            labels: VmLabels { tenant: "default".into(), ..Default::default() },
            running: true,
            busy: None,
            outgoing: MigrationState::None,
            incoming: None,
        };
        self.0.vms.lock().await.insert(spec.name.clone(), vm);
    }

    pub async fn state(&self, vm: &VmName) -> Option<(bool, Option<MigrationId>)> {
        self.0.vms.lock().await.get(vm).map(|v| (v.running, v.busy))
    }

    pub async fn claim_for_test(&self, vm: &VmName, id: MigrationId) {
        if let Some(v) = self.0.vms.lock().await.get_mut(vm) {
            v.busy = Some(id);
        }
    }

    pub async fn pause(&self, vm: &VmName) {
        if let Some(v) = self.0.vms.lock().await.get_mut(vm) {
            v.running = false;
        }
    }

    pub async fn remove(&self, vm: &VmName) {
        self.0.vms.lock().await.remove(vm);
    }

    pub fn set(slot: &StdMutex<Option<Hook>>, hook: Hook) {
        if let Ok(mut h) = slot.lock() {
            *h = Some(hook);
        }
    }

    fn hook(slot: &StdMutex<Option<Hook>>) -> Option<Hook> {
        slot.lock().ok().and_then(|h| h.clone())
    }
}

fn no_vm(vm: &VmName) -> BackendError {
    BackendError::NoSuchVm(vm.clone())
}

#[async_trait]
impl VmBackend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn accel(&self) -> &'static str {
        "none"
    }

    async fn list(&self) -> Vec<VmInfo> {
        let vms = self.0.vms.lock().await;
        vms.values()
            .map(|v| VmInfo {
                name: v.spec.name.clone(),
                state: if v.running { "running".into() } else { "paused".into() },
                pid: 0,
                accel: "none".into(),
                memory_mib: v.spec.memory_mib,
                vcpus: v.spec.vcpus,
                migration: v.busy,
                console_log: String::new(),
            })
            .collect()
    }

    async fn count(&self) -> usize {
        self.0.vms.lock().await.len()
    }

    async fn residents(&self) -> Vec<VmDescription> {
        let vms = self.0.vms.lock().await;
        vms.values()
            .map(|v| VmDescription { spec: v.spec.clone(), labels: v.labels.clone() })
            .collect()
    }

    async fn start(&self, spec: &VmSpec, labels: &VmLabels) -> Result<VmInfo, BackendError> {
        if self.0.vms.lock().await.contains_key(&spec.name) {
            return Err(BackendError::Exists(spec.name.clone()));
        }
        self.insert_running(spec.clone()).await;
        if let Some(v) = self.0.vms.lock().await.get_mut(&spec.name) {
            v.labels = labels.clone();
        }
        let list = self.list().await;
        list.into_iter().find(|i| i.name == spec.name).ok_or_else(|| no_vm(&spec.name))
    }

    async fn stop(&self, vm: &VmName) -> Result<(), BackendError> {
        let mut vms = self.0.vms.lock().await;
        let v = vms.get(vm).ok_or_else(|| no_vm(vm))?;
        if let Some(id) = v.busy {
            return Err(BackendError::Busy { vm: vm.clone(), id });
        }
        vms.remove(vm);
        Ok(())
    }

    async fn adopt(&self) -> Result<usize, BackendError> {
        Ok(self.count().await)
    }

    async fn facts(&self, vm: &VmName) -> VmFacts {
        match self.0.vms.lock().await.get(vm) {
            None => VmFacts::Gone,
            Some(v) => {
                let loaded =
                    v.incoming.as_ref().is_some_and(|(bufs, done, _)| *done.borrow() == bufs.len());
                VmFacts::Alive {
                    running: v.running,
                    migration_completed: v.outgoing == MigrationState::Completed || loaded,
                }
            }
        }
    }

    async fn hold(&self, vm: &VmName, id: MigrationId) -> Result<VmDescription, BackendError> {
        let mut vms = self.0.vms.lock().await;
        let v = vms.get_mut(vm).ok_or_else(|| no_vm(vm))?;
        if let Some(other) = v.busy {
            return Err(BackendError::Busy { vm: vm.clone(), id: other });
        }
        v.busy = Some(id);
        Ok(VmDescription { spec: v.spec.clone(), labels: v.labels.clone() })
    }

    async fn claim(&self, vm: &VmName, id: MigrationId) {
        if let Some(v) = self.0.vms.lock().await.get_mut(vm) {
            v.busy = Some(id);
        }
    }

    async fn release(&self, vm: &VmName, id: MigrationId) {
        if let Some(v) = self.0.vms.lock().await.get_mut(vm) {
            if v.busy == Some(id) {
                v.busy = None;
            }
        }
        if let Ok(mut r) = self.0.reserved.lock() {
            if r.get(vm) == Some(&id) {
                r.remove(vm);
            }
        }
    }

    async fn forget(&self, vm: &VmName) -> Result<(), BackendError> {
        // A pretend VM is gone once a test removed it: nothing to drop.
        let _ = vm;
        Ok(())
    }

    async fn migrate_out(&self, vm: &VmName, plan: TransferPlan) -> Result<Outgoing, BackendError> {
        let n = plan.streams().get() as usize;
        {
            let mut vms = self.0.vms.lock().await;
            let v = vms.get_mut(vm).ok_or_else(|| no_vm(vm))?;
            v.outgoing = MigrationState::Active;
        }
        let memory = Arc::new(memory_of(vm));
        let (tx, rx) = mpsc::channel(n);
        let mut writers = Vec::new();
        for i in 0..n {
            let (ours, theirs) = UnixStream::pair()
                .map_err(|source| BackendError::Io { what: "a socket pair".into(), source })?;
            let kind = if i == 0 { ChannelKind::Main } else { ChannelKind::Multifd(i as u8) };
            let _ = tx.send(Ok(Channel { kind, stream: theirs })).await;
            let memory = memory.clone();
            writers.push(tokio::spawn(async move {
                let mut ours = ours;
                let ok = ours.write_all(share(&memory, i, n)).await.is_ok();
                let _ = ours.shutdown().await;
                ok
            }));
        }
        let (backend, vm) = (self.clone(), vm.clone());
        tokio::spawn(async move {
            let mut ok = true;
            for w in writers {
                ok &= w.await.unwrap_or(false);
            }
            // The source pauses the VM for its last pass, as QEMU does.
            if let Some(v) = backend.0.vms.lock().await.get_mut(&vm) {
                v.running = false;
                if v.outgoing == MigrationState::Active {
                    v.outgoing =
                        if ok { MigrationState::Completed } else { MigrationState::Failed };
                }
            }
            if let Some(hook) = FakeBackend::hook(&backend.0.hooks.stream_done) {
                hook().await;
            }
        });
        Ok(Outgoing::new(rx))
    }

    async fn outgoing_status(&self, vm: &VmName) -> Result<MigrationStatus, BackendError> {
        let vms = self.0.vms.lock().await;
        let v = vms.get(vm).ok_or_else(|| no_vm(vm))?;
        Ok(MigrationStatus { status: v.outgoing.clone(), ..Default::default() })
    }

    async fn resume_source(&self, vm: &VmName) -> Result<(), BackendError> {
        let mut vms = self.0.vms.lock().await;
        let v = vms.get_mut(vm).ok_or_else(|| no_vm(vm))?;
        if !v.outgoing.is_terminal() && v.outgoing != MigrationState::None {
            v.outgoing = MigrationState::Cancelled;
        }
        v.running = true;
        Ok(())
    }

    async fn retire_source(&self, vm: &VmName, _id: MigrationId) -> Result<(), BackendError> {
        self.0.vms.lock().await.remove(vm);
        Ok(())
    }

    async fn reserve_incoming(&self, vm: &VmName, id: MigrationId) -> bool {
        let taken = self.0.vms.lock().await.contains_key(vm);
        match self.0.reserved.lock() {
            Ok(mut r) if !taken && !r.contains_key(vm) => {
                r.insert(vm.clone(), id);
                true
            }
            _ => false,
        }
    }

    async fn launch_incoming(&self, offer: &AdmittedOffer) -> Result<(), BackendError> {
        let o = offer.offer();
        let reserved =
            self.0.reserved.lock().map(|r| r.get(&o.vm) == Some(&o.migration_id)).unwrap_or(false);
        if !reserved {
            return Err(BackendError::Exists(o.vm.clone()));
        }
        let n = offer.plan().streams().get() as usize;
        let bufs = (0..n).map(|_| Arc::new(Mutex::new(Vec::new()))).collect();
        let (done_tx, done_rx) = watch::channel(0);
        let vm = FakeVm {
            spec: o.spec.clone(),
            labels: o.labels.clone(),
            running: false,
            busy: Some(o.migration_id),
            outgoing: MigrationState::None,
            incoming: Some((bufs, done_rx, done_tx)),
        };
        self.0.vms.lock().await.insert(o.vm.clone(), vm);
        if let Ok(mut r) = self.0.reserved.lock() {
            r.remove(&o.vm);
        }
        Ok(())
    }

    async fn connect_incoming(
        &self,
        vm: &VmName,
        kind: ChannelKind,
    ) -> Result<UnixStream, BackendError> {
        let index = match kind {
            ChannelKind::Main => 0,
            ChannelKind::Multifd(i) => i as usize,
            ChannelKind::Control => {
                return Err(BackendError::Unsupported {
                    backend: "fake",
                    what: "take libvirt's control connection",
                })
            }
        };
        let (buf, done) = {
            let vms = self.0.vms.lock().await;
            let v = vms.get(vm).ok_or_else(|| no_vm(vm))?;
            let (bufs, _, done) = v.incoming.as_ref().ok_or_else(|| no_vm(vm))?;
            (bufs.get(index).cloned().ok_or_else(|| no_vm(vm))?, done.clone())
        };
        let (ours, theirs) = UnixStream::pair()
            .map_err(|source| BackendError::Io { what: "a socket pair".into(), source })?;
        tokio::spawn(async move {
            let mut ours = ours;
            let mut got = Vec::new();
            let _ = ours.read_to_end(&mut got).await;
            *buf.lock().await = got;
            done.send_modify(|n| *n += 1);
        });
        Ok(theirs)
    }

    async fn wait_loaded(&self, vm: &VmName, timeout: Duration) -> Result<(), BackendError> {
        if let Some(hook) = FakeBackend::hook(&self.0.hooks.before_loaded) {
            hook().await;
        }
        if self.0.hooks.fail_load.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(BackendError::Migration("failed: the VM would not load".into()));
        }
        let (bufs, mut done) = {
            let vms = self.0.vms.lock().await;
            let v = vms.get(vm).ok_or_else(|| no_vm(vm))?;
            let (bufs, done, _) = v.incoming.as_ref().ok_or_else(|| no_vm(vm))?;
            (bufs.clone(), done.clone())
        };
        let all = bufs.len();
        let loaded =
            matches!(tokio::time::timeout(timeout, done.wait_for(|n| *n == all)).await, Ok(Ok(_)));
        if !loaded {
            return Err(BackendError::Migration(format!("not loaded within {timeout:?}")));
        }
        let mut stream = Vec::new();
        for b in &bufs {
            stream.extend_from_slice(&b.lock().await);
        }
        // As QEMU would: a stream that is not this VM's state does not load.
        if stream != memory_of(vm) {
            return Err(BackendError::Migration("failed: the stream does not load".into()));
        }
        Ok(())
    }

    async fn open_gate(&self, vm: &VmName, proof: DigestsMatch) -> Result<(), BackendError> {
        let _ = proof;
        if let Some(hook) = FakeBackend::hook(&self.0.hooks.before_gate) {
            hook().await;
        }
        let mut vms = self.0.vms.lock().await;
        vms.get_mut(vm).ok_or_else(|| no_vm(vm))?.running = true;
        Ok(())
    }

    async fn discard_incoming(&self, vm: &VmName, id: MigrationId) -> Result<(), BackendError> {
        let mut vms = self.0.vms.lock().await;
        if vms.get(vm).is_some_and(|v| v.busy == Some(id)) {
            vms.remove(vm);
        }
        if let Ok(mut r) = self.0.reserved.lock() {
            if r.get(vm) == Some(&id) {
                r.remove(vm);
            }
        }
        Ok(())
    }
}
