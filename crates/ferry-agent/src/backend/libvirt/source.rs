//! The source side: libvirt migrates the domain peer-to-peer to a daemon
//! URI and a stream URI that are this migration's own local sockets. Its
//! daemon connects the control socket, then the stream socket (or, with
//! multifd, the domain's QEMU opens its channels itself); each admitted
//! connection becomes a [`Channel`] for the session to carry.

use std::path::Path;
use std::time::Duration;

use ferry_libvirt::client::{MigrateRequest, State};
use ferry_libvirt::local::{self, LocalPeer};
use ferry_types::{MigrationId, VmName};
use ferry_vmm::{MigrationState, MigrationStatus, RamStats};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use super::{restrict, LibvirtBackend, RefusalKind, NAME};
use crate::backend::{BackendError, Channel, ChannelKind, Outgoing};
use crate::plan::TransferPlan;

const CONTROL_SOCK: &str = "ctl.sock";
const STREAM_SOCK: &str = "mig.sock";
/// How long libvirt may take to open each of its connections.
const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// libvirt's migrate call's outcome: `None` while it runs.
type Outcome = Option<Result<(), String>>;

/// One outgoing migration libvirt runs.
pub(super) struct Migrating {
    id: MigrationId,
    done: watch::Receiver<Outcome>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Drop for Migrating {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

/// The daemon URI and stream URI libvirt is given for a migration whose
/// sockets are in `dir`. The destination derives the same stream URI from
/// the migration id and checks the Prepare against it.
pub fn stream_uri(dir: &Path) -> String {
    format!("unix://{}", dir.join(STREAM_SOCK).display())
}

fn control_uri(dir: &Path) -> String {
    format!("qemu+unix:///system?socket={}", dir.join(CONTROL_SOCK).display())
}

impl LibvirtBackend {
    pub(super) async fn start_outgoing(
        &self,
        vm: &VmName,
        plan: TransferPlan,
    ) -> Result<Outgoing, BackendError> {
        if plan.streams().get() > 1 || plan.postcopy() {
            return Err(BackendError::Unsupported {
                backend: NAME,
                what: "carry more than one stream or post-copy yet (use --streams 1)",
            });
        }
        let id = self.held_by(vm).ok_or_else(|| BackendError::NoSuchVm(vm.clone()))?;
        let dir = self.migration_dir(id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| BackendError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        restrict(&dir)?;
        let bind = |name: &str| {
            UnixListener::bind(dir.join(name)).map_err(|source| BackendError::Io {
                what: format!("listening on {}", dir.join(name).display()),
                source,
            })
        };
        let (control, stream) = (bind(CONTROL_SOCK)?, bind(STREAM_SOCK)?);
        let name = vm.to_string();
        let persistent = self.call(move |lv| lv.is_persistent(&name)).await?;
        let request = MigrateRequest {
            dconnuri: control_uri(&dir),
            migrate_uri: stream_uri(&dir),
            parallel_connections: None,
            persistent,
        };
        let (done_tx, done) = watch::channel::<Outcome>(None);
        let (lv, name) = (self.lv.clone(), vm.to_string());
        tokio::task::spawn_blocking(move || {
            let r = lv.migrate(&name, &request).map_err(|e| crate::report::report(&e));
            let _ = done_tx.send(Some(r));
        });
        let (tx, rx) = mpsc::channel(2);
        let pid_file = self.pid_file(vm);
        let (refusals, name) = (self.cfg.refusals.clone(), vm.clone());
        let refused = move |why| refusals.report(id, &name, RefusalKind::LocalConnection, why);
        let acceptor =
            tokio::spawn(accept_all(control, stream, pid_file, done.clone(), tx, refused));
        self.outgoing.lock().await.insert(vm.clone(), Migrating { id, done, acceptor });
        Ok(Outgoing::new(rx))
    }

    async fn outcome(&self, vm: &VmName) -> Option<watch::Receiver<Outcome>> {
        self.outgoing.lock().await.get(vm).map(|m| m.done.clone())
    }

    pub(super) async fn outgoing_progress(
        &self,
        vm: &VmName,
    ) -> Result<MigrationStatus, BackendError> {
        let outcome = self.outcome(vm).await.and_then(|d| d.borrow().clone());
        let status = match outcome {
            Some(Ok(())) => MigrationState::Completed,
            Some(Err(e)) => {
                return Ok(MigrationStatus {
                    status: MigrationState::Failed,
                    error_desc: Some(e),
                    ..Default::default()
                })
            }
            None => MigrationState::Active,
        };
        let name = vm.to_string();
        let job = self.call(move |lv| lv.job(&name)).await.unwrap_or_default();
        let ram = RamStats {
            transferred: job.data_processed,
            remaining: job.data_remaining,
            total: job.data_total,
            dirty_pages_rate: job.dirty_rate,
            dirty_sync_count: job.iterations,
            ..Default::default()
        };
        Ok(MigrationStatus {
            status,
            ram: Some(ram),
            downtime: job.downtime_ms,
            ..Default::default()
        })
    }

    /// Undo before the Commit: abort libvirt's job (it resumes the domain
    /// here) and make sure the domain runs.
    pub(super) async fn roll_back(&self, vm: &VmName) -> Result<(), BackendError> {
        if let Some(mut done) = self.outcome(vm).await {
            if done.borrow().is_none() {
                let name = vm.to_string();
                let _ = self.call(move |lv| lv.abort_job(&name)).await;
                let _ = tokio::time::timeout(CONNECT_WAIT, done.wait_for(|o| o.is_some())).await;
            }
        }
        self.outgoing.lock().await.remove(vm);
        match self.state(vm).await? {
            Some(State::Running) => Ok(()),
            Some(State::Paused) => {
                let name = vm.to_string();
                self.call(move |lv| lv.resume(&name)).await
            }
            _ => Err(BackendError::Migration(format!(
                "domain {vm} is gone from this host after the rollback"
            ))),
        }
    }

    /// After the Receipt: libvirt finishes on its own (Finish on the
    /// destination, Confirm here); wait for it. SECURITY: the destination
    /// signed that it runs the VM, so a copy libvirt resumed here anyway
    /// (a lost Finish reply) is stopped: never two running copies.
    pub(super) async fn retire(&self, vm: &VmName, id: MigrationId) -> Result<(), BackendError> {
        if let Ok(mut held) = self.held.lock() {
            if held.get(vm) == Some(&id) {
                held.remove(vm);
            }
        }
        let migrating = self.outgoing.lock().await.remove(vm);
        let _ = std::fs::remove_dir_all(self.migration_dir(id));
        let outcome = match migrating {
            Some(m) if m.id == id => {
                let mut done = m.done.clone();
                let waited = tokio::time::timeout(CONNECT_WAIT, done.wait_for(|o| o.is_some()));
                let outcome = match waited.await {
                    Ok(Ok(o)) => o.clone(),
                    _ => None,
                };
                outcome
            }
            _ => None,
        };
        if let Some(Ok(())) = outcome {
            return Ok(());
        }
        let name = vm.to_string();
        match self.state(vm).await? {
            Some(State::Running) | Some(State::Paused) => {
                tracing::error!(%vm, ?outcome, "libvirt kept the domain here after the receipt; stopping it");
                self.call(move |lv| lv.destroy(&name)).await
            }
            _ => Ok(()),
        }
    }
}

/// Accept libvirt's control connection, then the stream; refuse anyone
/// else (logged) and keep waiting for the real ones.
async fn accept_all(
    control: UnixListener,
    stream: UnixListener,
    pid_file: std::path::PathBuf,
    mut done: watch::Receiver<Outcome>,
    tx: mpsc::Sender<Result<Channel, BackendError>>,
    refused: impl Fn(String) + Send + Sync,
) {
    for (listener, kind) in [(&control, ChannelKind::Control), (&stream, ChannelKind::Main)] {
        let accepted = tokio::select! {
            a = accept_admitted(listener, &pid_file, kind, &refused) => a,
            _ = tokio::time::sleep(CONNECT_WAIT) => Err(BackendError::NoConnection {
                what: format!("{kind:?} connection"),
                after: CONNECT_WAIT,
            }),
            o = done.wait_for(|o| o.is_some()) => {
                let why = o.ok().and_then(|o| o.clone()).and_then(|o| o.err());
                Err(BackendError::Migration(why.unwrap_or_else(|| "before connecting".into())))
            }
        };
        let failed = accepted.is_err();
        if tx.send(accepted.map(|stream| Channel { kind, stream })).await.is_err() || failed {
            return;
        }
    }
}

async fn accept_admitted(
    listener: &UnixListener,
    pid_file: &Path,
    kind: ChannelKind,
    refused: &(impl Fn(String) + Sync),
) -> Result<UnixStream, BackendError> {
    loop {
        let (s, _) = listener.accept().await.map_err(|source| BackendError::Io {
            what: format!("accepting libvirt's {kind:?} connection"),
            source,
        })?;
        let Ok(cred) = s.peer_cred() else { continue };
        let pid = cred.pid().unwrap_or(-1);
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let qemu = std::fs::read_to_string(pid_file).ok().and_then(|p| p.trim().parse().ok());
        let peer = LocalPeer { pid, uid: cred.uid(), exe: exe.as_deref() };
        match local::admit(&peer, qemu) {
            Ok(_) => return Ok(s),
            // SECURITY: a refused process's bytes are never read.
            Err(why) => refused(format!("{kind:?} socket: {why}")),
        }
    }
}
