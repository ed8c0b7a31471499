//! The source side: QEMU migrates into a unix socket the agent listens on;
//! each connection QEMU opens (the main channel, then each multifd channel)
//! becomes a [`Channel`] for the session to carry.

use std::time::Duration;

use ferry_types::{MigrationId, VmName};
use ferry_vmm::{MigrationState, Qmp, RunState, VmmError};
use tokio::net::UnixListener;

use super::vms;
use super::QemuBackend;
use crate::backend::{BackendError, Channel, ChannelKind, Outgoing};
use crate::plan::{Streams, TransferPlan};

const OUT_SOCK: &str = "migrate-out.sock";
/// How long QEMU may take to open each of its migration connections.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Turn QEMU's multifd on (with `streams - 1` channels) or off, before
/// `migrate` / `migrate-incoming`. Both sides must agree: the offer says how many.
pub(super) async fn configure(q: &mut Qmp, plan: TransferPlan) -> Result<(), VmmError> {
    let streams: Streams = plan.streams();
    q.set_capabilities(&[("multifd", streams.get() > 1)]).await?;
    if streams.get() > 1 {
        let channels = serde_json::json!({ "multifd-channels": streams.multifd_channels() });
        q.execute("migrate-set-parameters", Some(channels)).await?;
    }
    q.set_capabilities(&[("postcopy-ram", plan.postcopy())]).await
}

impl QemuBackend {
    pub(super) async fn start_outgoing(
        &self,
        vm: &VmName,
        plan: TransferPlan,
    ) -> Result<Outgoing, BackendError> {
        let (qmp, dir) = (self.qmp(vm).await?, self.dir(vm).await?);
        let sock = dir.join(OUT_SOCK);
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).map_err(|source| BackendError::Io {
            what: "listening for QEMU's migration stream".into(),
            source,
        })?;
        {
            let mut q = qmp.lock().await;
            let (bw, downtime) = (self.cfg.max_bandwidth_bytes_per_s, self.cfg.downtime_limit_ms);
            let set = q.set_migration_parameters(bw, downtime).await;
            set.map_err(BackendError::qemu("setting migration parameters"))?;
            configure(&mut q, plan)
                .await
                .map_err(BackendError::qemu("configuring the migration"))?;
            let uri = format!("unix:{}", sock.display());
            q.migrate(&uri).await.map_err(BackendError::qemu("starting QEMU's migration"))?;
        }
        // QEMU connects its main channel first, then the multifd channels.
        let (tx, rx) = tokio::sync::mpsc::channel(plan.streams().get() as usize);
        tokio::spawn(async move {
            let kinds = std::iter::once(ChannelKind::Main)
                .chain(plan.streams().joined().map(ChannelKind::Multifd));
            for kind in kinds {
                let got = match tokio::time::timeout(CONNECT_WAIT, listener.accept()).await {
                    Ok(Ok((stream, _))) => Ok(Channel { kind, stream }),
                    Ok(Err(source)) => {
                        Err(BackendError::Io { what: format!("accepting QEMU's {kind:?}"), source })
                    }
                    Err(_) => Err(BackendError::NoConnection {
                        what: format!("{kind:?} channel"),
                        after: CONNECT_WAIT,
                    }),
                };
                let failed = got.is_err();
                if tx.send(got).await.is_err() || failed {
                    break;
                }
            }
            let _ = std::fs::remove_file(&sock);
        });
        Ok(Outgoing::new(rx))
    }

    /// Cancel QEMU's migration if it still runs, then `cont` if the VM is
    /// paused. Idempotent: a running VM is left running.
    pub(super) async fn roll_back(&self, vm: &VmName) -> Result<(), BackendError> {
        let qmp = self.qmp(vm).await?;
        let status = qmp.lock().await.query_migrate().await;
        let status = status.map_err(BackendError::qemu("query-migrate"))?;
        if !status.status.is_terminal() && status.status != MigrationState::None {
            let _ = qmp.lock().await.migrate_cancel().await;
            let wait = ferry_vmm::wait_migration_terminal(
                &qmp,
                Duration::from_millis(20),
                Duration::from_secs(10),
            );
            let _ = wait.await;
        }
        let mut q = qmp.lock().await;
        let run = q.status().await.map_err(BackendError::qemu("query-status"))?;
        if run != RunState::Running {
            q.cont().await.map_err(BackendError::qemu("resuming the source copy"))?;
        }
        Ok(())
    }

    /// The destination signed for the VM: quit the paused copy, keep its
    /// directory (console log) under `departed/`.
    pub(super) async fn retire(&self, vm: &VmName, id: MigrationId) -> Result<(), BackendError> {
        let entry = self.vms.lock().await.remove(vm);
        let Some(entry) = entry else { return Ok(()) };
        let _ = entry.qmp.lock().await.quit().await;
        vms::kill(&entry.proc).await.map_err(BackendError::qemu("quitting the source copy"))?;
        let _ = std::fs::create_dir_all(&self.departed);
        let _ = std::fs::rename(&entry.proc.dir, self.departed.join(id.to_string()));
        Ok(())
    }
}
