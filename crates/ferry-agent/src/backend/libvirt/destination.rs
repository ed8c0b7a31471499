//! The destination side. Nothing exists here before the Accept but a
//! reserved name; libvirt creates the domain itself in its Prepare, which
//! reaches libvirtd only through the allowlist, checked against the signed
//! Offer. QEMU's return path is read so that its final SHUT, without which
//! the source never completes and libvirt never runs the VM here, waits for
//! the gate.

use std::time::Duration;

use ferry_libvirt::client::State;
use ferry_libvirt::return_path::{ReturnEvent, ReturnPathScanner};
use ferry_libvirt::rpc::{Framer, LIBVIRT_MESSAGE_MAX};
use ferry_libvirt::{ControlFilter, Expected};
use ferry_types::{MigrationId, VmName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::{restrict, source, LibvirtBackend, RefusalKind};
use crate::backend::{BackendError, ChannelKind};
use crate::checks::{AdmittedOffer, DigestsMatch};

/// Where the destination QEMU stands, as its return path says.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Load {
    Waiting,
    Loaded,
    Failed(String),
}

/// One incoming migration.
pub(super) struct Arriving {
    id: MigrationId,
    /// What the Prepare must carry; taken by the one control connection.
    expected: Option<Expected>,
    load: watch::Sender<Load>,
    /// libvirt's Prepare passed the allowlist.
    prepared: watch::Sender<bool>,
    /// Releases the held SHUT.
    gate: Option<oneshot::Sender<()>>,
    relays: Vec<JoinHandle<()>>,
}

impl Drop for Arriving {
    fn drop(&mut self) {
        for r in &self.relays {
            r.abort();
        }
    }
}

const READ_CHUNK: usize = 256 * 1024;
/// How long the destination QEMU may take to listen after the Prepare.
const LISTEN_WAIT: Duration = Duration::from_secs(30);
/// How long libvirt may take to send its Prepare after the Accept.
const PREPARE_WAIT: Duration = Duration::from_secs(60);

impl LibvirtBackend {
    pub(super) async fn reserve(&self, vm: &VmName, id: MigrationId) -> bool {
        let mut incoming = self.incoming.lock().await;
        if incoming.contains_key(vm) || self.held_by(vm).is_some() {
            return false;
        }
        // A domain libvirt already knows by this name (running or only
        // defined) would collide with the Prepare.
        if !matches!(self.state(vm).await, Ok(None)) {
            return false;
        }
        let (load, _) = watch::channel(Load::Waiting);
        let (prepared, _) = watch::channel(false);
        let a = Arriving { id, expected: None, load, prepared, gate: None, relays: vec![] };
        incoming.insert(vm.clone(), a);
        true
    }

    pub(super) async fn prepare_arrival(
        &self,
        admitted: &AdmittedOffer,
    ) -> Result<(), BackendError> {
        let offer = admitted.offer();
        let dir = self.migration_dir(offer.migration_id);
        std::fs::create_dir_all(&dir).map_err(|source| BackendError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        restrict(&dir)?;
        let mut incoming = self.incoming.lock().await;
        let arriving = incoming
            .get_mut(&offer.vm)
            .filter(|a| a.id == offer.migration_id)
            .ok_or_else(|| BackendError::Exists(offer.vm.clone()))?;
        arriving.expected = Some(Expected {
            spec: offer.spec.clone(),
            migrate_uri: source::stream_uri(&dir),
            parallel_connections: source::multifd_channels(admitted.plan().streams().get()),
        });
        Ok(())
    }

    pub(super) async fn connect_arrival(
        &self,
        vm: &VmName,
        kind: ChannelKind,
    ) -> Result<UnixStream, BackendError> {
        // What the connection needs, taken under the lock; the slow
        // connects happen outside it.
        let (id, load, mut prepared, expected, gate) = {
            let mut incoming = self.incoming.lock().await;
            let a = incoming.get_mut(vm).ok_or_else(|| BackendError::NoSuchVm(vm.clone()))?;
            let expected = match kind {
                // SECURITY: one control connection per migration, and only
                // after the Offer was admitted (it set `expected`).
                ChannelKind::Control => {
                    Some(a.expected.take().ok_or(BackendError::Unsupported {
                        backend: super::NAME,
                        what: "take a second control connection for one migration",
                    })?)
                }
                _ => None,
            };
            let gate = match kind {
                ChannelKind::Main => {
                    let (tx, rx) = oneshot::channel();
                    a.gate = Some(tx);
                    Some(rx)
                }
                _ => None,
            };
            (a.id, a.load.clone(), a.prepared.subscribe(), expected, gate)
        };
        let (session_end, ours) = UnixStream::pair()
            .map_err(|source| BackendError::Io { what: "creating a socket pair".into(), source })?;
        let relay = match (kind, expected, gate) {
            (ChannelKind::Control, Some(expected), _) => {
                let sock = self.cfg.run_dir.join("libvirt-sock");
                let daemon = UnixStream::connect(&sock).await.map_err(|source| {
                    BackendError::Io { what: format!("connecting to {}", sock.display()), source }
                })?;
                let filter = ControlFilter::new(expected);
                let (refusals, name) = (self.cfg.refusals.clone(), vm.clone());
                let refused = move |why| refusals.report(id, &name, RefusalKind::ControlCall, why);
                let prepared = self.prepared(vm).await;
                tokio::spawn(filter_control(ours, daemon, filter, load, prepared, refused))
            }
            (ChannelKind::Main, _, Some(gate)) => {
                // libvirt's Prepare starts the QEMU that listens there.
                let mut failed = load.subscribe();
                let prepare = async {
                    let waited = tokio::time::timeout(PREPARE_WAIT, prepared.wait_for(|p| *p));
                    match waited.await {
                        Ok(Ok(_)) => Ok(()),
                        _ => Err(BackendError::NoConnection {
                            what: "libvirt Prepare".into(),
                            after: PREPARE_WAIT,
                        }),
                    }
                };
                // A refused control connection fails the migration at once.
                let refused = async {
                    let why = match failed.wait_for(|l| matches!(l, Load::Failed(_))).await {
                        Ok(l) => match &*l {
                            Load::Failed(why) => why.clone(),
                            other => format!("{other:?}"),
                        },
                        Err(_) => "the migration was discarded".into(),
                    };
                    BackendError::Migration(why)
                };
                tokio::select! {
                    r = prepare => r?,
                    e = refused => return Err(e),
                }
                let qemu = connect_retry(&self.migration_dir(id).join("mig.sock")).await?;
                tokio::spawn(hold_return_path(ours, qemu, load, gate))
            }
            (ChannelKind::Multifd(_), _, _) => {
                // The session connects these only after the main channel,
                // which QEMU 7.2 must see first; QEMU tells them apart by
                // the channel number in their own first packet.
                let qemu = connect_retry(&self.migration_dir(id).join("mig.sock")).await?;
                let (mut from_source, mut to_source) = ours.into_split();
                let (mut from_qemu, mut to_qemu) = qemu.into_split();
                // Both ways until both end, as tokio's copy_bidirectional.
                tokio::spawn(async move {
                    let forward = async {
                        pour(&mut from_source, &mut to_qemu).await;
                        let _ = to_qemu.shutdown().await;
                    };
                    let back = async {
                        let _ = tokio::io::copy(&mut from_qemu, &mut to_source).await;
                        let _ = to_source.shutdown().await;
                    };
                    tokio::join!(forward, back);
                })
            }
            _ => {
                return Err(BackendError::Unsupported {
                    backend: super::NAME,
                    what: "take a second main stream for one migration",
                })
            }
        };
        if let Some(a) = self.incoming.lock().await.get_mut(vm) {
            a.relays.push(relay);
        }
        Ok(session_end)
    }

    async fn prepared(&self, vm: &VmName) -> Option<watch::Sender<bool>> {
        self.incoming.lock().await.get(vm).map(|a| a.prepared.clone())
    }

    pub(super) async fn arrival_loaded(
        &self,
        vm: &VmName,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        let mut load = {
            let incoming = self.incoming.lock().await;
            incoming.get(vm).ok_or_else(|| BackendError::NoSuchVm(vm.clone()))?.load.subscribe()
        };
        let waited = tokio::time::timeout(timeout, load.wait_for(|l| *l != Load::Waiting)).await;
        match waited.map(|l| l.map(|l| l.clone())) {
            Ok(Ok(Load::Loaded)) => Ok(()),
            Ok(Ok(Load::Failed(why))) => Err(BackendError::Migration(why)),
            Ok(_) => Err(BackendError::Migration("the migration was discarded".into())),
            Err(_) => Err(BackendError::Migration(format!("not loaded within {timeout:?}"))),
        }
    }

    /// SECURITY: the only place the held SHUT is let go, and it takes the
    /// proof that the stream matched the signed Commit.
    pub(super) async fn release_arrival(
        &self,
        vm: &VmName,
        _proof: DigestsMatch,
    ) -> Result<(), BackendError> {
        let gate = self.incoming.lock().await.get_mut(vm).and_then(|a| a.gate.take());
        let gate = gate.ok_or_else(|| BackendError::Migration("no held return path".into()))?;
        let _ = gate.send(());
        let deadline = tokio::time::Instant::now() + self.cfg.resume_wait;
        loop {
            if let Ok(Some(State::Running)) = self.state(vm).await {
                // The domain is libvirt's now. Its connections finish on
                // their own (Finish's reply is still on its way): detach them.
                if let Some(mut a) = self.incoming.lock().await.remove(vm) {
                    a.relays.clear();
                    let _ = std::fs::remove_dir_all(self.migration_dir(a.id));
                }
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BackendError::Migration(format!(
                    "libvirt did not run the domain within {:?}",
                    self.cfg.resume_wait
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The downtime libvirt reports for the migration that just arrived.
    /// Its Finish stores the job's statistics when it ends, which may be a
    /// moment after the domain runs: asked a few times.
    pub(super) async fn arrived_downtime(&self, vm: &VmName) -> Option<u64> {
        for _ in 0..20 {
            let name = vm.to_string();
            match self.call(move |lv| lv.completed_downtime_ms(&name)).await {
                Ok(Some(ms)) => return Some(ms),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(%vm, error = %crate::report::report(&e), "no downtime from libvirt");
                    return None;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Cut every connection (libvirt then abandons the incoming domain) and
    /// stop whatever libvirt created here for it.
    pub(super) async fn discard_arrival(
        &self,
        vm: &VmName,
        id: MigrationId,
    ) -> Result<(), BackendError> {
        let arriving = {
            let mut incoming = self.incoming.lock().await;
            match incoming.get(vm) {
                Some(a) if a.id == id => incoming.remove(vm),
                _ => None,
            }
        };
        let Some(arriving) = arriving else { return Ok(()) };
        drop(arriving);
        let _ = std::fs::remove_dir_all(self.migration_dir(id));
        if let Some(State::Running | State::Paused | State::Other) = self.state(vm).await? {
            let name = vm.to_string();
            self.call(move |lv| lv.destroy(&name)).await?;
        }
        Ok(())
    }
}

async fn connect_retry(sock: &std::path::Path) -> Result<UnixStream, BackendError> {
    let deadline = tokio::time::Instant::now() + LISTEN_WAIT;
    loop {
        match UnixStream::connect(sock).await {
            Ok(s) => return Ok(s),
            Err(source) if tokio::time::Instant::now() >= deadline => {
                return Err(BackendError::Io {
                    what: format!("connecting to the destination QEMU at {}", sock.display()),
                    source,
                })
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The source libvirtd's calls, judged one whole message at a time; the
/// destination libvirtd's replies go back as they are. A refused message
/// cuts the connection and fails the migration with the reason.
async fn filter_control(
    session: UnixStream,
    daemon: UnixStream,
    mut filter: ControlFilter,
    load: watch::Sender<Load>,
    prepared: Option<watch::Sender<bool>>,
    refused: impl Fn(String) + Send + Sync,
) {
    let refuse = |why: String| {
        refused(why.clone());
        load.send_replace(Load::Failed(format!("libvirt control connection refused: {why}")));
    };
    let (mut from_source, mut to_source) = session.into_split();
    let (mut from_daemon, mut to_daemon) = daemon.into_split();
    let calls = async {
        let mut framer = Framer::new(LIBVIRT_MESSAGE_MAX);
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = from_source.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            framer.push(&buf[..n]);
            loop {
                let message = match framer.next_message() {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => return refuse(e.to_string()),
                };
                match filter.judge(&message) {
                    Ok(passed) => {
                        tracing::debug!(procedure = passed.procedure, "libvirt call passed");
                        let prepare = passed.prepared_xml.map(|xml| blake3::hash(xml.as_bytes()));
                        if to_daemon.write_all(&message).await.is_err() {
                            return;
                        }
                        if let Some(digest) = prepare {
                            tracing::info!(xml_blake3 = %digest, "libvirt's Prepare passed");
                            if let Some(p) = &prepared {
                                p.send_replace(true);
                            }
                        }
                    }
                    Err(no) => return refuse(crate::report::report(&no)),
                }
            }
        }
    };
    let replies = async {
        let _ = tokio::io::copy(&mut from_daemon, &mut to_source).await;
    };
    // Either direction ending ends both: the connection is one conversation.
    tokio::select! {
        _ = calls => {}
        _ = replies => {}
    }
}

/// The stream into QEMU as it comes; QEMU's return path back through the
/// scanner, its SHUT held until `gate` fires.
async fn hold_return_path(
    session: UnixStream,
    qemu: UnixStream,
    load: watch::Sender<Load>,
    gate: oneshot::Receiver<()>,
) {
    let (mut from_source, mut to_source) = session.into_split();
    let (mut from_qemu, mut to_qemu) = qemu.into_split();
    let forward = async {
        pour(&mut from_source, &mut to_qemu).await;
        // The source's stream ended: the whole stream reached QEMU.
        std::future::pending::<()>().await
    };
    let back = async {
        let mut scanner = ReturnPathScanner::default();
        let mut gate = Some(gate);
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = from_qemu.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            let events = match scanner.push(&buf[..n]) {
                Ok(e) => e,
                Err(e) => {
                    load.send_replace(Load::Failed(format!("destination QEMU: {e}")));
                    return;
                }
            };
            for event in events {
                let bytes = match event {
                    ReturnEvent::Pass(bytes) => bytes,
                    ReturnEvent::Shut { loaded, bytes } => {
                        load.send_replace(if loaded {
                            Load::Loaded
                        } else {
                            Load::Failed("the destination QEMU could not load the stream".into())
                        });
                        // SECURITY: the SHUT lets the source complete and
                        // libvirt run the VM here; it waits for the gate.
                        let Some(g) = gate.take().filter(|_| loaded) else { return };
                        if g.await.is_err() {
                            return;
                        }
                        bytes
                    }
                };
                if to_source.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = forward => {}
        _ = back => {}
    }
}

/// Copy a VM stream until it ends (or either side fails). Reads of up to [`READ_CHUNK`]: tokio's `copy` moves 8 KiB
/// per read and write, which cost the destination agent one pair of
/// syscalls per 8 KiB of the guest's memory.
async fn pour(from: &mut (impl AsyncRead + Unpin), to: &mut (impl AsyncWrite + Unpin)) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
