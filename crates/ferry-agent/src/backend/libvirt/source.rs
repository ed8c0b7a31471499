//! The source side: libvirt migrates the domain peer-to-peer to a daemon
//! URI and a stream URI that are this migration's own local sockets. Its
//! daemon connects the control socket, then the stream socket (or, with
//! multifd, the domain's QEMU opens its channels itself); each admitted
//! connection becomes a [`Channel`] for the session to carry.

use std::path::Path;
use std::time::Duration;

use ferry_libvirt::client::{MigrateRequest, State};
use ferry_libvirt::local::{self, LocalPeer};
use ferry_libvirt::vtpm::{self, Leftover};
use ferry_types::{MigrationId, VmName};
use ferry_vmm::{Boot, Erased, MigrationState, MigrationStatus, RamStats};
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
    /// The domain's vTPM state left here once the destination runs it.
    leftover: Leftover,
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
        if plan.postcopy() {
            return Err(BackendError::Unsupported {
                backend: NAME,
                what: "carry a post-copy migration yet (leave out --postcopy)",
            });
        }
        let streams = plan.streams().get();
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
        let (facts, description) = self.describe(vm).await?;
        let leftover = match &description.spec.boot {
            Boot::Domain { uuid } => vtpm::leftover(&facts, uuid, &self.cfg.swtpm_state_root),
            _ => Leftover::None,
        };
        let name = vm.to_string();
        let persistent = self.call(move |lv| lv.is_persistent(&name)).await?;
        let request = MigrateRequest {
            dconnuri: control_uri(&dir),
            migrate_uri: stream_uri(&dir),
            parallel_connections: multifd_channels(streams),
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
            tokio::spawn(accept_all(control, stream, streams, pid_file, done.clone(), tx, refused));
        self.outgoing.lock().await.insert(vm.clone(), Migrating { id, done, acceptor, leftover });
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
    /// (a lost Finish reply) is stopped: never two running copies. Then
    /// the vTPM state libvirt left here is erased, unless kept on purpose.
    pub(super) async fn retire(
        &self,
        vm: &VmName,
        id: MigrationId,
    ) -> Result<Option<Erased>, BackendError> {
        if let Ok(mut held) = self.held.lock() {
            if held.get(vm) == Some(&id) {
                held.remove(vm);
            }
        }
        let migrating = self.outgoing.lock().await.remove(vm);
        let _ = std::fs::remove_dir_all(self.migration_dir(id));
        let mut leftover = Leftover::None;
        let outcome = match migrating {
            Some(m) if m.id == id => {
                leftover = m.leftover.clone();
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
        if !matches!(outcome, Some(Ok(()))) {
            let name = vm.to_string();
            if let Some(State::Running) | Some(State::Paused) = self.state(vm).await? {
                tracing::error!(%vm, ?outcome, "libvirt kept the domain here after the receipt; stopping it");
                self.call(move |lv| lv.destroy(&name)).await?;
            }
        }
        erase_leftover(vm, leftover).await
    }
}

/// SECURITY: the source's vTPM state is a clone of the TPM that now runs on
/// the destination; erased (overwritten, then removed) so it can never be
/// started beside it. libvirt stopped this host's swtpm before its migrate
/// call returned (Confirm), or with the domain destroyed just above. It may
/// also have unlinked the state itself (an undefined domain without
/// `persistent_state`): then there is nothing left to erase.
async fn erase_leftover(vm: &VmName, leftover: Leftover) -> Result<Option<Erased>, BackendError> {
    let state = match leftover {
        Leftover::None => return Ok(None),
        Leftover::Keep(dir) => {
            tracing::warn!(%vm, dir = %dir.display(), "vTPM state kept here: persistent_state='yes'");
            return Ok(None);
        }
        Leftover::Erase(dir) => dir,
    };
    let parent = state.parent().map(Path::to_owned).unwrap_or_default();
    tokio::task::spawn_blocking(move || ferry_vmm::swtpm::erase_state(&state, &parent))
        .await
        .map_err(|e| BackendError::Io {
            what: "joining the erase task".into(),
            source: std::io::Error::other(e),
        })?
        .map_err(|e| {
            let why = crate::report::report(&e);
            BackendError::Libvirt(format!("erasing the source's vTPM state: {why}"))
        })
}

/// libvirt's `parallel.connections` (QEMU's multifd channels) for a
/// migration of `streams` streams: the main channel is one of them.
pub fn multifd_channels(streams: u8) -> Option<u32> {
    (streams > 1).then(|| u32::from(streams) - 1)
}

/// Accept libvirt's control connection, then the stream, then (multifd)
/// the rest of the `streams` the domain's QEMU opens on the same socket,
/// main first (QEMU 7.2 connects its multifd channels only once the main
/// one is up; the destination QEMU takes them in that order too). Anyone
/// else is refused (logged) and the real ones are still awaited.
async fn accept_all(
    control: UnixListener,
    stream: UnixListener,
    streams: u8,
    pid_file: std::path::PathBuf,
    mut done: watch::Receiver<Outcome>,
    tx: mpsc::Sender<Result<Channel, BackendError>>,
    refused: impl Fn(String) + Send + Sync,
) {
    let multifd = (1..streams).map(|i| (&stream, ChannelKind::Multifd(i)));
    let all = [(&control, ChannelKind::Control), (&stream, ChannelKind::Main)];
    for (listener, kind) in all.into_iter().chain(multifd) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn n_streams_are_the_main_channel_and_n_minus_one_parallel_connections() {
        assert_eq!(multifd_channels(1), None, "one stream: no VIR_MIGRATE_PARALLEL");
        assert_eq!(multifd_channels(3), Some(2));
        assert_eq!(multifd_channels(u8::MAX), Some(254));
    }

    #[test]
    fn each_migration_has_its_own_socket_uris() {
        let dir = Path::new("/run/ferry/01a22e0d");
        assert_eq!(stream_uri(dir), "unix:///run/ferry/01a22e0d/mig.sock");
        assert_eq!(control_uri(dir), "qemu+unix:///system?socket=/run/ferry/01a22e0d/ctl.sock");
    }
}
