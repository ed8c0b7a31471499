//! Post-copy recovery: after the link broke in the post-copy phase both
//! QEMUs wait in `postcopy-paused`, the VM on the destination stalled on the
//! pages it lacks. The source opens a new mTLS connection; the destination's
//! QEMU listens again, the source's resumes, and the rest of the stream
//! flows as before, both ways, ending with a final Commit and Receipt bound
//! to the new connection. If the source's QEMU is gone, so are the pages
//! only it held: the migration ends `postcopy_lost`.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_channel::{ReceivePump, Received, SendPump, StreamSum};
use ferry_identity::PeerAuthenticated;
use ferry_session::{Event, MigrationState};
use ferry_types::MigrationId;
use tokio::sync::{mpsc, oneshot, watch};

use super::link;
use super::machine::Session;
use super::outbound::Outbound;
use super::peer_watch::{watch_peer, AbortOnDrop, PeerWord};
use super::postcopy_destination::return_path;
use super::postcopy_source::final_commit;
use crate::agent::Agent;
use crate::audit::{Audit, Phase};
use crate::backend::{BackendError, PostcopyBackend, VmDescription};
use crate::error::Error;
use crate::evidence::{self, Expect, StreamBody};
use crate::net::{Reader, Writer};
use crate::plan::TransferPlan;
use crate::protocol::{offer_binding, PeerMessage, Progress};
use crate::records::{MigrationRecord, Role};
use crate::report::report;

fn postcopy(agent: &Agent) -> Result<&dyn PostcopyBackend, Error> {
    agent.backend.postcopy().ok_or(Error::Backend(BackendError::Unsupported {
        backend: agent.backend.name(),
        what: "post-copy",
    }))
}

/// Source: one attempt to resume an interrupted post-copy. A failed attempt
/// changes nothing (counted and audited); the source half being gone ends
/// the migration `postcopy_lost`.
pub async fn attempt(agent: &Arc<Agent>, id: MigrationId) -> Result<MigrationRecord, Error> {
    let rec = agent
        .records
        .get(&id)?
        .ok_or_else(|| Error::NoSuchMigration { id, host: agent.host.clone() })?;
    if rec.role != Role::Source || rec.state() != MigrationState::PostcopyActive {
        let hint = "only an interrupted post-copy can be recovered, on its source";
        return Err(Error::WrongState { id, state: rec.state(), hint });
    }
    let pc = postcopy(agent)?;
    let session = Session::new(agent.clone(), rec);
    if !pc.alive(&session.record().vm).await {
        return lost(session).await;
    }
    // One attempt at a time.
    let (progress, watcher) =
        watch::channel(Progress { id: Some(id), phase: "recover".into(), ..Default::default() });
    if !agent.sessions.watch(id, watcher).await {
        return Err(Error::Busy(id));
    }
    let (session, result) = run_attempt(agent, session, pc, progress).await;
    agent.sessions.end(&id).await;
    match result {
        Ok(()) => Ok(session.into_record()),
        Err(e) => {
            // The source QEMU may have died during the attempt.
            if !pc.alive(&session.record().vm).await {
                return lost(session).await;
            }
            tracing::warn!(error = %report(&e), "post-copy recovery failed; both halves stay as they were");
            agent.metrics.postcopy_recovery_failure();
            let _ = session.audit(Audit::PostcopyRecoverFailed { error: report(&e) }, None).await;
            Err(Error::Unsettled {
                id,
                state: MigrationState::PostcopyActive,
                note: format!("{}; retry `ferry migrations recover {id}`", report(&e)),
            })
        }
    }
}

async fn run_attempt(
    agent: &Arc<Agent>,
    mut session: Session,
    pc: &dyn PostcopyBackend,
    progress: watch::Sender<Progress>,
) -> (Session, Result<(), Error>) {
    let vm = session.record().vm.clone();
    match pc.wait_paused(&vm).await {
        Ok(true) => {}
        // Every page arrived before the link broke: nothing to resume.
        Ok(false) => {
            let done = session.apply(Event::PostcopyDone, None).await.map(drop);
            return (session, done);
        }
        Err(e) => return (session, Err(e.into())),
    }
    let desc = match describe(agent, &vm).await {
        Ok(d) => d,
        Err(e) => return (session, Err(e)),
    };
    let plan = match TransferPlan::new(1, true) {
        Ok(p) => p,
        Err(e) => return (session, Err(e.into())),
    };
    let mut out = Outbound {
        to: session.record().destination.clone(),
        vm,
        session,
        desc,
        plan,
        operator: "recovery".into(),
        progress,
        cancel: watch::channel(false).1,
        bytes: Arc::new(AtomicU64::new(0)),
        started: Instant::now(),
    };
    let r = resume_stream(&mut out).await;
    (out.session, r)
}

/// The source half is gone: record it (the table releases the VM and tells
/// the destination), and say so.
async fn lost(mut session: Session) -> Result<MigrationRecord, Error> {
    let rec = session.record();
    let (id, vm, host) = (rec.id, rec.vm.clone(), session.agent.host.clone());
    let e = Error::PostcopyLost { id, vm, host };
    tracing::error!(error = %report(&e), "post-copy source half lost");
    session.apply(Event::SourceLost, Some(report(&e))).await?;
    Err(e)
}

async fn describe(agent: &Agent, vm: &ferry_types::VmName) -> Result<VmDescription, Error> {
    let residents = agent.backend.residents().await;
    residents
        .into_iter()
        .find(|d| &d.spec.name == vm)
        .ok_or_else(|| Error::NoSuchVm { vm: vm.clone(), host: agent.host.clone() })
}

/// Reconnect, have the destination listen, resume QEMU into a new socket
/// and relay both ways until QEMU completes; then the final Commit.
async fn resume_stream(out: &mut Outbound) -> Result<(), Error> {
    let agent = out.agent().clone();
    let (id, to) = (out.id(), out.to.clone());
    let link::Link { peer, mut reader, mut writer } = link::open(&agent, &to).await?;
    let binding = offer_binding(peer.binding().as_bytes(), &id);
    let _ = out.session.audit(Audit::PostcopyRecoverSent, None).await;
    let link = |source| Error::Link { host: to.clone(), source };
    writer.write_control(&PeerMessage::PostcopyRecover { migration_id: id }).await.map_err(link)?;
    match reader.read_control::<PeerMessage>().await.map_err(link)? {
        PeerMessage::PostcopyRecoverReady { migration_id } if migration_id == id => {}
        PeerMessage::Refuse { reason, .. } => return Err(Error::Refused { host: to, reason }),
        other => return Err(Error::Unexpected { host: to, step: "recovery", got: other.name() }),
    }
    let qemu = postcopy(&agent)?.resume_out(&out.vm).await?;
    let (qemu, back) = qemu.into_split();
    let io_timeout = agent.cfg.migration.io_timeout();
    let (peer_tx, mut peer_rx) = mpsc::channel::<PeerWord>(4);
    let _watcher = AbortOnDrop(tokio::spawn(watch_peer(reader, peer_tx, Some(back), io_timeout)));
    tracing::info!("post-copy resumed on a new connection");
    let mut pump = SendPump::new(qemu, io_timeout);
    loop {
        tokio::select! {
            word = peer_rx.recv() => {
                return Err(match word {
                    Some(Ok(m)) => Error::Unexpected { host: to, step: "resumed stream", got: m.name() },
                    Some(Err(why)) => Error::Lost { host: to, why },
                    None => Error::Lost { host: to, why: "it closed".into() },
                });
            }
            n = pump.read() => {
                let n = n.map_err(|e| Error::relay(e, &to))?;
                if n == 0 {
                    break;
                }
                pump.forward(n, &mut writer).await.map_err(|e| Error::relay(e, &to))?;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = agent.backend.outgoing_status(&out.vm).await?;
        match s.status {
            ferry_vmm::MigrationState::Completed => break,
            ferry_vmm::MigrationState::PostcopyPaused | ferry_vmm::MigrationState::Failed => {
                return Err(Error::SourceQemu(format!("{:?} after the resumed stream", s.status)))
            }
            _ if Instant::now() > deadline => {
                return Err(Error::SourceQemu("no completion 30 s after the resumed stream".into()))
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    // QEMU completed: the destination loaded every page. The final Commit
    // covers the resumed stream; without a final Receipt the hand-over stands.
    final_commit(out, writer, peer_rx, binding, pump.sum()).await
}

/// Destination: the source asks to resume a post-copy whose link broke.
pub async fn serve(
    agent: Arc<Agent>,
    peer: PeerAuthenticated,
    id: MigrationId,
    mut reader: Reader,
    mut writer: Writer,
) {
    let refuse = |why: String| PeerMessage::Refuse { migration_id: id, reason: why };
    let rec = match agent.records.get(&id) {
        // SECURITY: only the migration's own source may resume it.
        Ok(Some(r)) if r.role == Role::Destination && &r.source == peer.host() => r,
        _ => {
            agent.metrics.refused("recover");
            tracing::warn!(%id, peer = %peer.host(), "post-copy recovery refused: no such migration from this host");
            let _ = writer
                .write_control(&refuse(format!(
                    "no interrupted post-copy {id} from {} here",
                    peer.host()
                )))
                .await;
            return;
        }
    };
    if rec.state() != MigrationState::PostcopyActive {
        let why = format!("migration {id} is {} here, not an interrupted post-copy", rec.state());
        let _ = writer.write_control(&refuse(why)).await;
        return;
    }
    let mut session = Session::new(agent.clone(), rec);
    let Ok(pc) = postcopy(&agent) else { return };
    let vm = session.record().vm.clone();
    match pc.wait_paused(&vm).await {
        Ok(true) => {}
        Ok(false) => {
            let _ = writer
                .write_control(&refuse("this host's QEMU already completed the migration".into()))
                .await;
            return;
        }
        Err(e) => {
            let _ = writer.write_control(&refuse(report(&e))).await;
            return;
        }
    }
    let qemu = match pc.listen_again(&vm).await {
        Ok(q) => q,
        Err(e) => {
            let _ = writer.write_control(&refuse(report(&e))).await;
            return;
        }
    };
    let _ = session.audit(Audit::PostcopyRecoverReceived, None).await;
    if writer.write_control(&PeerMessage::PostcopyRecoverReady { migration_id: id }).await.is_err()
    {
        return;
    }
    let binding = offer_binding(peer.binding().as_bytes(), &id);
    let whole = match relay_back(&agent, qemu, &mut reader, &mut writer).await {
        Ok(sum) => sum,
        Err(e) => {
            let why = format!(
                "{}; post-copy interrupted again: the VM runs here but pages are still on {}",
                report(&e),
                session.record().source
            );
            tracing::warn!(%why, "resumed post-copy interrupted again; the VM is kept");
            let _ = session.apply(Event::Failed, Some(why)).await;
            return;
        }
    };
    finish(&mut session, binding, whole, &mut reader, &mut writer).await
}

/// Feed the resumed stream into QEMU while its return path flows back.
async fn relay_back(
    agent: &Agent,
    qemu: tokio::net::UnixStream,
    reader: &mut Reader,
    writer: &mut Writer,
) -> Result<StreamSum, Error> {
    let io_timeout = agent.cfg.migration.io_timeout();
    let (from_qemu, mut to_qemu) = qemu.into_split();
    let (_back, mut back_rx) = return_path(from_qemu);
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let pump = async {
        let mut pump = ReceivePump::new();
        tokio::select! {
            r = pump.run(reader, &mut to_qemu, io_timeout) => match r? {
                Received::End(sum) => Ok(sum),
                Received::Control(..) => Err(Error::Mismatch("a control message inside the resumed stream".into())),
            },
            Ok(()) = &mut stop_rx => Err(Error::Mismatch("the return path failed".into())),
        }
    };
    let relay = async {
        while let Some(c) = back_rx.recv().await {
            let sent = async {
                writer.write_data(&c).await?;
                writer.flush().await
            };
            if let Err(e) = sent.await {
                let _ = stop_tx.send(());
                return Err(e);
            }
        }
        Ok(())
    };
    // The return path ends when QEMU closes its end, after the last page.
    tokio::select! {
        p = pump => p,
        Err(e) = relay => Err(Error::Mismatch(format!("the return path: {}", report(&e)))),
    }
}

async fn finish(
    session: &mut Session,
    binding: ferry_types::Digest32,
    whole: StreamSum,
    reader: &mut Reader,
    writer: &mut Writer,
) {
    let agent = session.agent.clone();
    let rec = session.record().clone();
    let expect = Expect {
        id: &rec.id,
        source: &rec.source,
        destination: &agent.host,
        vm: &rec.vm,
        binding: Some(&binding),
    };
    let commit = match reader.read_control::<PeerMessage>().await {
        Ok(PeerMessage::Commit { signed }) => match agent.notary.verify_from::<StreamBody>(
            &signed,
            evidence::COMMIT,
            &rec.source,
            &expect,
        ) {
            Ok(b) if (b.bytes, b.digest) == (whole.bytes, whole.digest) => Ok(signed),
            Ok(b) => Err(format!(
                "final commit is for {} bytes / {}, {} / {} arrived",
                b.bytes, b.digest, whole.bytes, whole.digest
            )),
            Err(e) => Err(format!("invalid final commit: {}", report(&e))),
        },
        Ok(other) => Err(format!("expected the final commit, got {}", other.name())),
        Err(e) => Err(format!("no final commit: {}", report(&e))),
    };
    if let Err(e) = agent.backend.wait_loaded(&rec.vm, agent.cfg.migration.commit_timeout()).await {
        let why =
            format!("the destination QEMU did not complete the resumed post-copy: {}", report(&e));
        let _ = session.apply(Event::Failed, Some(why)).await;
        return;
    }
    let receipt = match &commit {
        Ok(signed) => {
            let _ = session.audit(Audit::CommitReceived(Phase::Final), Some(signed.clone())).await;
            let body = StreamBody {
                migration_id: rec.id,
                source: rec.source.clone(),
                destination: agent.host.clone(),
                vm: rec.vm.clone(),
                channel_binding: binding,
                log_head: agent.notary.log_head(),
                bytes: whole.bytes,
                digest: whole.digest,
                qemu_downtime_ms: None,
            };
            agent.notary.sign(evidence::RECEIPT, &body).ok()
        }
        Err(why) => {
            tracing::error!(%why, "resumed post-copy finished without a valid final commit");
            None
        }
    };
    if let Some(r) = &receipt {
        session.record_mut().receipt = Some(r.clone());
    }
    let rec = session.record_mut();
    rec.bytes = whole.bytes;
    rec.digest = Some(whole.digest);
    let _ = session.apply(Event::PostcopyDone, commit.err()).await;
    if let Some(signed) = receipt {
        let _ = session.audit(Audit::ReceiptSent(Phase::Final), Some(signed.clone())).await;
        let _ = writer.write_control(&PeerMessage::Receipt { signed }).await;
    }
    tracing::info!(bytes = whole.bytes, "resumed post-copy complete");
}
