//! What the agent knows about migrations in flight, beyond their records:
//! who watches their progress, how to cancel them, which extra streams
//! they wait for, and which retry loop works on them.

use std::collections::{HashMap, HashSet};

use ferry_session::Effect;
use ferry_types::{HostName, MigrationId, VmName};
use tokio::sync::{mpsc, watch, Mutex};

use crate::net::Reader;
use crate::protocol::Progress;

/// A destination migration waiting for its extra streams.
pub struct JoinSlot {
    pub source: HostName,
    pub streams: u8,
    pub tx: mpsc::Sender<(u8, Reader)>,
}

#[derive(Default)]
pub struct Registry {
    /// Progress of migrations this host is sending, for operators watching.
    progress: Mutex<HashMap<MigrationId, watch::Receiver<Progress>>>,
    /// Cancel switches of outgoing migrations that have not committed yet.
    cancels: Mutex<HashMap<MigrationId, watch::Sender<bool>>>,
    /// Incoming migrations waiting for their extra data streams.
    joins: std::sync::Mutex<HashMap<MigrationId, JoinSlot>>,
    /// Incoming libvirt migrations waiting for their control connection:
    /// the source host it may come from and the VM it is for.
    controls: std::sync::Mutex<HashMap<MigrationId, (HostName, VmName)>>,
    /// Retry loops running, by migration and kind (resolve, recover, notify).
    looping: std::sync::Mutex<HashSet<(MigrationId, Effect)>>,
}

impl Registry {
    /// Announce an outgoing migration: its progress and its cancel switch.
    pub async fn begin(
        &self,
        id: MigrationId,
        progress: watch::Receiver<Progress>,
    ) -> watch::Receiver<bool> {
        self.progress.lock().await.insert(id, progress);
        let (tx, rx) = watch::channel(false);
        self.cancels.lock().await.insert(id, tx);
        rx
    }

    /// One attempt at a time on a migration (a manual recover while the
    /// automatic one runs): false if another is at work.
    pub async fn watch(&self, id: MigrationId, progress: watch::Receiver<Progress>) -> bool {
        let mut p = self.progress.lock().await;
        if p.contains_key(&id) {
            return false;
        }
        p.insert(id, progress);
        true
    }

    pub async fn end(&self, id: &MigrationId) {
        self.progress.lock().await.remove(id);
        self.cancels.lock().await.remove(id);
    }

    /// Past the Commit a migration can no longer be cancelled.
    pub async fn uncancellable(&self, id: &MigrationId) {
        self.cancels.lock().await.remove(id);
    }

    /// Flip the cancel switch; false if the migration cannot be cancelled.
    pub async fn cancel(&self, id: &MigrationId) -> bool {
        match self.cancels.lock().await.remove(id) {
            Some(tx) => tx.send(true).is_ok(),
            None => false,
        }
    }

    pub async fn in_flight(&self) -> usize {
        self.progress.lock().await.len()
    }

    pub fn open_joins(&self, id: MigrationId, slot: JoinSlot) {
        if let Ok(mut j) = self.joins.lock() {
            j.insert(id, slot);
        }
    }

    pub fn close_joins(&self, id: &MigrationId) {
        if let Ok(mut j) = self.joins.lock() {
            j.remove(id);
        }
    }

    /// SECURITY: only the migration's own source, authenticated on its own
    /// connection, may add a stream, and only with an index the offer has.
    pub fn join_slot(
        &self,
        id: &MigrationId,
        peer: &HostName,
        index: u8,
    ) -> Option<mpsc::Sender<(u8, Reader)>> {
        let joins = self.joins.lock().ok()?;
        let slot = joins.get(id)?;
        (&slot.source == peer && index >= 1 && index < slot.streams).then(|| slot.tx.clone())
    }

    pub fn open_control(&self, id: MigrationId, source: HostName, vm: VmName) {
        if let Ok(mut c) = self.controls.lock() {
            c.insert(id, (source, vm));
        }
    }

    pub fn close_control(&self, id: &MigrationId) {
        if let Ok(mut c) = self.controls.lock() {
            c.remove(id);
        }
    }

    /// SECURITY: a migration's control connection comes once, and only from
    /// the host its admitted Offer came from.
    pub fn take_control(&self, id: &MigrationId, peer: &HostName) -> Option<VmName> {
        let mut controls = self.controls.lock().ok()?;
        match controls.get(id) {
            Some((source, _)) if source == peer => controls.remove(id).map(|(_, vm)| vm),
            _ => None,
        }
    }

    /// Claim `id` for a retry loop of this kind; false if one already runs.
    pub fn start_loop(&self, id: MigrationId, kind: Effect) -> bool {
        self.looping.lock().map(|mut l| l.insert((id, kind))).unwrap_or(false)
    }

    pub fn end_loop(&self, id: &MigrationId, kind: Effect) {
        if let Ok(mut l) = self.looping.lock() {
            l.remove(&(*id, kind));
        }
    }
}
