//! The destination side: QEMU is started paused (`-incoming defer -S`,
//! autostart off) and listens on a unix socket the agent feeds.

use std::path::Path;
use std::time::Duration;

use ferry_vmm::LaunchMode;
use tokio::net::UnixStream;

use super::{source, vms, QemuBackend};
use crate::backend::BackendError;
use crate::checks::AdmittedOffer;

pub(super) const INCOMING_SOCK: &str = "incoming.sock";

impl QemuBackend {
    /// Launch QEMU for an admitted offer, its name already reserved.
    pub(super) async fn launch_for(&self, admitted: &AdmittedOffer) -> Result<(), BackendError> {
        let offer = admitted.offer();
        let id = offer.migration_id;
        let reserved = self.reserved.lock().map(|r| r.get(&offer.vm) == Some(&id)).unwrap_or(false);
        if !reserved {
            return Err(BackendError::Exists(offer.vm.clone()));
        }
        let mut entry = vms::launch(&self.cfg, &offer.spec, &offer.labels, LaunchMode::Incoming)
            .await
            .map_err(BackendError::qemu("starting the destination QEMU"))?;
        entry.busy = Some(id);
        let (qmp, sock) = (entry.qmp.clone(), entry.proc.dir.join(INCOMING_SOCK));
        self.vms.lock().await.insert(offer.vm.clone(), entry);
        if let Ok(mut r) = self.reserved.lock() {
            r.remove(&offer.vm);
        }
        let mut q = qmp.lock().await;
        source::configure(&mut q, admitted.plan())
            .await
            .map_err(BackendError::qemu("configuring the incoming migration"))?;
        q.migrate_incoming(&format!("unix:{}", sock.display()))
            .await
            .map_err(BackendError::qemu("listening for the incoming stream"))
    }
}

/// QEMU listens on its socket shortly after `migrate-incoming`: retry for a second.
pub(super) async fn connect_retry(sock: &Path) -> Result<UnixStream, BackendError> {
    let mut last = None;
    for _ in 0..50 {
        match UnixStream::connect(sock).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(BackendError::Io {
        what: format!("connecting to the destination QEMU's socket {}", sock.display()),
        source: last.unwrap_or_else(|| std::io::ErrorKind::TimedOut.into()),
    })
}
