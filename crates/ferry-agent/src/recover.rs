//! Post-copy recovery: after the link broke in the post-copy phase both
//! QEMUs wait in `postcopy-paused`, the VM on the destination stalled on
//! the pages it lacks. `ferry migrations recover ID` (on the source) opens a
//! new mTLS connection; the destination's QEMU listens again
//! (`migrate-recover`), the source's resumes (`migrate` with `resume`), and
//! the rest of the stream flows as before, both ways. It ends with the
//! final Commit and Receipt, bound to the new connection. The source agent
//! also tries this on its own ([`spawn_auto_recover`]) until it succeeds.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_identity::PeerAuthenticated;
use ferry_types::{Digest32, MigrationId};
use ferry_vmm::{MigrationState as QemuMigration, Qmp};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch, Mutex};

use crate::evidence::{self, Expect, StreamBody};
use crate::outgoing::{backend, finish_completed, watch_peer, AbortOnDrop, Ctx, Failure};
use crate::protocol::{offer_binding, PeerMessage, Progress};
use crate::records::{MigrationRecord, MigrationState, Role};
use crate::{client, server, Agent, ErrorKind, Fault};

/// How long a QEMU may take to notice the broken link and pause.
const PAUSE_WAIT: Duration = Duration::from_secs(15);

/// Source: resume an interrupted post-copy. Leaves the record as it was
/// (`postcopy_active`) if the attempt fails, so it can be tried again.
pub async fn recover(agent: &Arc<Agent>, id: MigrationId) -> Result<MigrationRecord, Fault> {
    let mut rec =
        agent.records.get(&id).map_err(|e| backend("reading the record", e))?.ok_or_else(|| {
            Fault::new(ErrorKind::Request, format!("no migration {id} on {}", agent.host))
        })?;
    if rec.role != Role::Source || rec.state != MigrationState::PostcopyActive {
        let why = format!(
            "migration {id} is {:?} here, not an interrupted post-copy; recover it on its source",
            rec.state
        );
        return Err(Fault::new(ErrorKind::Request, why.to_lowercase()));
    }
    let (qmp, vm_dir, spec, labels) = {
        let table = agent.vms.lock().await;
        let e = table.get(&rec.vm).ok_or_else(|| {
            Fault::new(
                ErrorKind::Backend,
                format!("VM {}'s source QEMU is gone: the pages it held are lost", rec.vm),
            )
        })?;
        (e.qmp.clone(), e.proc.dir.clone(), e.spec.clone(), e.labels.clone())
    };
    // One attempt at a time.
    let (progress, progress_rx) =
        watch::channel(Progress { id: Some(id), phase: "recover".into(), ..Default::default() });
    {
        let mut active = agent.active.lock().await;
        if active.contains_key(&id) {
            return Err(Fault::new(
                ErrorKind::Request,
                format!("migration {id} is already being worked on"),
            ));
        }
        active.insert(id, progress_rx);
    }
    let _active = ActiveGuard(agent.clone(), id);
    let to = rec.destination.clone();
    let addr =
        *agent.cfg.peers.get(&to).ok_or_else(|| {
            Fault::new(ErrorKind::Request, format!("{to} is no longer in [peers]"))
        })?;
    let ctx = Ctx {
        agent: agent.clone(),
        id,
        vm: rec.vm.clone(),
        to,
        addr,
        spec,
        labels,
        qmp,
        vm_dir,
        progress,
        cancel: watch::channel(false).1,
        operator: "recovery".into(),
        streams: 1,
        postcopy: true,
        bytes: Arc::new(AtomicU64::new(0)),
        started: Instant::now(),
    };
    match wait_paused(&ctx.qmp).await {
        Ok(true) => {}
        // Every page arrived before the link broke: nothing to resume.
        Ok(false) => {
            let digest = rec.digest.unwrap_or(Digest32([0; 32]));
            return finish_completed(agent, &mut rec, digest).await;
        }
        Err(why) => return Err(attempt_failed(&ctx, Fault::new(ErrorKind::Backend, why)).await),
    }
    match resume_stream(&ctx, &mut rec).await {
        Ok(digest) => {
            let _ = crate::outgoing::audit(
                &ctx,
                "completed",
                serde_json::json!({ "via": "postcopy_recover", "bytes": rec.bytes }),
                None,
            )
            .await;
            agent.metrics.migration_finished(
                Role::Source,
                "completed",
                rec.bytes,
                ctx.started.elapsed(),
            );
            finish_completed(agent, &mut rec, digest).await
        }
        Err(Failure::BeforeCommit(f) | Failure::InDoubt(f) | Failure::Split(f)) => {
            Err(attempt_failed(&ctx, f).await)
        }
    }
}

/// An attempt that changed nothing: logged, counted and audited, whatever
/// step it failed at, and the answer says it can be tried again.
async fn attempt_failed(ctx: &Ctx, f: Fault) -> Fault {
    tracing::warn!(error = %f, "post-copy recovery failed; both halves stay as they were");
    ctx.agent.metrics.postcopy_recovery_failure();
    let _ = crate::outgoing::audit(
        ctx,
        "postcopy_recover_failed",
        serde_json::json!({ "error": f.message }),
        None,
    )
    .await;
    Fault::new(
        ErrorKind::InDoubt,
        format!(
            "{}; the migration stays post-copy interrupted: retry `ferry migrations recover {}`",
            f.message, ctx.id
        ),
    )
}

/// Source: keep resuming an interrupted post-copy until it completes, the
/// first try after `postcopy_recover_retry_ms`, then doubling up to a
/// minute. The VM stalls on the destination meanwhile, so giving up would
/// only leave it stalled. Stops when the record leaves `postcopy_active`
/// (an operator's recover finished it) or the source QEMU is gone (its
/// pages are lost; nothing is left to resume from).
pub fn spawn_auto_recover(agent: Arc<Agent>, id: MigrationId) {
    let Some(first) = agent.cfg.migration.postcopy_recover_retry() else { return };
    let longest = Duration::from_millis(crate::config::MAX_POSTCOPY_RECOVER_RETRY_MS).max(first);
    let span = tracing::info_span!("auto_recover", migration_id = %id, role = "source");
    let task = async move {
        let mut delay = first;
        for attempt in 1u64.. {
            tokio::time::sleep(delay).await;
            let rec = match agent.records.get(&id) {
                Ok(Some(r))
                    if r.role == Role::Source && r.state == MigrationState::PostcopyActive =>
                {
                    r
                }
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %crate::chain(&e), "cannot read the record; retrying");
                    continue;
                }
            };
            if !agent.vms.lock().await.get(&rec.vm).is_some_and(|e| e.proc.is_alive()) {
                tracing::error!(vm = %rec.vm, "the source QEMU is gone, and the pages only it held with it; automatic post-copy recovery stops");
                return;
            }
            match recover(&agent, id).await {
                Ok(r) => {
                    tracing::info!(attempt, state = ?r.state, "post-copy resumed automatically");
                    return;
                }
                Err(f) => {
                    delay = (delay * 2).min(longest);
                    tracing::warn!(attempt, error = %f, retry_in_ms = delay.as_millis() as u64, "automatic post-copy recovery failed");
                }
            }
        }
    };
    tokio::spawn(tracing::Instrument::instrument(task, span));
}

struct ActiveGuard(Arc<Agent>, MigrationId);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let (agent, id) = (self.0.clone(), self.1);
        tokio::spawn(async move {
            agent.active.lock().await.remove(&id);
        });
    }
}

/// Wait until QEMU has noticed the broken link: Ok(true) when paused,
/// Ok(false) when its migration completed after all.
async fn wait_paused(qmp: &Mutex<Qmp>) -> Result<bool, String> {
    let deadline = Instant::now() + PAUSE_WAIT;
    loop {
        let s = qmp.lock().await.query_migrate().await.map_err(|e| crate::chain(&e))?;
        match s.status {
            QemuMigration::PostcopyPaused => return Ok(true),
            QemuMigration::Completed => return Ok(false),
            other if Instant::now() > deadline => {
                return Err(format!("QEMU is {other:?}, not postcopy-paused, after {PAUSE_WAIT:?}"))
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Source: reconnect, have the destination listen, resume QEMU into a new
/// socket and relay both ways until QEMU completes; then the final Commit.
async fn resume_stream(ctx: &Ctx, rec: &mut MigrationRecord) -> Result<Digest32, Failure> {
    let fail = |why: String| Failure::Split(Fault::new(ErrorKind::Peer, why));
    let agent = &ctx.agent;
    let mig = &agent.cfg.migration;
    let config = agent.tls.client().map_err(|e| Failure::Split(backend("TLS configuration", e)))?;
    let (stream, _) =
        client::connect(ctx.addr, &ctx.to, config, &agent.domain, mig.connect_timeout())
            .await
            .map_err(|e| fail(crate::chain(&e)))?;
    let exporter =
        ferry_identity::channel_binding(stream.get_ref().1, crate::protocol::BINDING_LABEL, b"")
            .map_err(|e| fail(crate::chain(&e)))?;
    let binding = offer_binding(&exporter, &ctx.id);
    let (mut reader, mut writer) = client::greet(stream, &ctx.to, ctx.addr, mig.io_timeout())
        .await
        .map_err(|e| fail(crate::chain(&e)))?;
    let _ =
        crate::outgoing::audit(ctx, "postcopy_recover_sent", serde_json::Value::Null, None).await;
    writer
        .write_control(&PeerMessage::PostcopyRecover { migration_id: ctx.id })
        .await
        .map_err(|e| fail(crate::chain(&e)))?;
    match reader.read_control::<PeerMessage>().await.map_err(|e| fail(crate::chain(&e)))? {
        PeerMessage::PostcopyRecoverReady { migration_id } if migration_id == ctx.id => {}
        PeerMessage::Refuse { reason, .. } => {
            return Err(fail(format!("{} refused the recovery: {reason}", ctx.to)))
        }
        other => {
            return Err(fail(format!("{} answered the recovery with {}", ctx.to, other.name())))
        }
    }
    let sock = ctx.vm_dir.join("recover-out.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)
        .map_err(|e| Failure::Split(backend("listening for QEMU's stream", e)))?;
    ctx.qmp
        .lock()
        .await
        .migrate_resume(&format!("unix:{}", sock.display()))
        .await
        .map_err(|e| Failure::Split(backend("resuming QEMU's post-copy", e)))?;
    let qemu = match tokio::time::timeout(Duration::from_secs(10), listener.accept()).await {
        Ok(Ok((s, _))) => s,
        _ => return Err(fail("QEMU did not connect its resumed stream within 10 s".into())),
    };
    let _ = std::fs::remove_file(&sock);
    let (mut qemu, back) = qemu.into_split();
    let (peer_tx, mut peer_rx) = mpsc::channel(4);
    let _watcher =
        AbortOnDrop(tokio::spawn(watch_peer(reader, peer_tx, Some(back), mig.io_timeout())));
    tracing::info!("post-copy resumed on a new connection");
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        tokio::select! {
            msg = peer_rx.recv() => {
                let why = match msg {
                    Some(Ok(m)) => format!("{} sent {} during the resumed stream", ctx.to, m.name()),
                    Some(Err(e)) => e,
                    None => format!("lost the connection to {}", ctx.to),
                };
                return Err(fail(why));
            }
            n = tokio::time::timeout(mig.io_timeout(), qemu.read(&mut buf)) => {
                let n = match n {
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) => return Err(fail(format!("reading QEMU's resumed stream: {e}"))),
                    Err(_) => return Err(fail(format!("source QEMU sent nothing for {:?}", mig.io_timeout()))),
                };
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                total += n as u64;
                writer.write_data(&buf[..n]).await.map_err(|e| fail(crate::chain(&e)))?;
                writer.flush().await.map_err(|e| fail(crate::chain(&e)))?;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = ctx
            .qmp
            .lock()
            .await
            .query_migrate()
            .await
            .map_err(|e| Failure::Split(backend("query-migrate", e)))?;
        match s.status {
            QemuMigration::Completed => break,
            QemuMigration::PostcopyPaused | QemuMigration::Failed => {
                return Err(fail(format!("source QEMU is {:?} after the resumed stream", s.status)))
            }
            _ if Instant::now() > deadline => {
                return Err(fail("source QEMU did not complete within 30 s".into()))
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    // QEMU completed: the destination loaded every page. The final Commit
    // covers the resumed stream; without a final Receipt the hand-over stands.
    crate::postcopy::final_commit(
        ctx,
        rec,
        writer,
        peer_rx,
        binding,
        (total, Digest32(*hasher.finalize().as_bytes())),
    )
    .await
}

/// Destination: the source asks to resume a post-copy whose link broke.
pub async fn serve(
    agent: Arc<Agent>,
    peer: PeerAuthenticated,
    exporter: [u8; 32],
    id: MigrationId,
    mut reader: server::Reader,
    mut writer: server::Writer,
) {
    let refuse = |why: String| PeerMessage::Refuse { migration_id: id, reason: why };
    let rec = match agent.records.get(&id) {
        // SECURITY: only the migration's own source may resume it.
        Ok(Some(r))
            if r.role == Role::Destination
                && &r.source == peer.host()
                && r.state == MigrationState::PostcopyActive =>
        {
            r
        }
        Ok(Some(r)) if r.role == Role::Destination && &r.source == peer.host() => {
            let _ = writer
                .write_control(&refuse(format!(
                    "migration {id} is {:?} here, not an interrupted post-copy",
                    r.state
                )))
                .await;
            return;
        }
        _ => {
            agent.metrics.refused("recover");
            tracing::warn!(%id, peer = %peer.host(), "post-copy recovery refused: no such interrupted migration from this host");
            let _ = writer
                .write_control(&refuse(format!(
                    "no interrupted post-copy {id} from {} here",
                    peer.host()
                )))
                .await;
            return;
        }
    };
    let entry = agent
        .vms
        .lock()
        .await
        .get(&rec.vm)
        .filter(|e| e.busy == Some(id))
        .map(|e| (e.qmp.clone(), e.proc.dir.clone()));
    let Some((qmp, dir)) = entry else {
        let _ = writer.write_control(&refuse(format!("VM {} is not here any more", rec.vm))).await;
        return;
    };
    let mut rec = rec;
    let started = Instant::now();
    let (vm, source) = (rec.vm.clone(), rec.source.clone());
    let ev = |kind: &str, detail: serde_json::Value, signed| {
        evidence::event(kind, &id, &vm, &source, detail, signed)
    };
    match wait_paused(&qmp).await {
        Ok(true) => {}
        Ok(false) => {
            let _ = writer
                .write_control(&refuse("this host's QEMU already completed the migration".into()))
                .await;
            return;
        }
        Err(why) => {
            let _ = writer.write_control(&refuse(why)).await;
            return;
        }
    }
    let sock = dir.join("recover.sock");
    let _ = std::fs::remove_file(&sock);
    let listening = qmp.lock().await.migrate_recover(&format!("unix:{}", sock.display())).await;
    if let Err(e) = listening {
        let _ = writer
            .write_control(&refuse(format!(
                "destination QEMU cannot listen again: {}",
                crate::chain(&e)
            )))
            .await;
        return;
    }
    let _ = agent.audit(ev("postcopy_recover_received", serde_json::Value::Null, None)).await;
    let qemu = match crate::incoming::connect_retry(&sock).await {
        Ok(s) => s,
        Err(why) => {
            let _ = writer.write_control(&refuse(why)).await;
            return;
        }
    };
    if writer.write_control(&PeerMessage::PostcopyRecoverReady { migration_id: id }).await.is_err()
    {
        return;
    }
    let io_timeout = agent.cfg.migration.io_timeout();
    let (from_qemu, to_qemu) = qemu.into_split();
    let (_back, mut back_rx) = crate::postcopy::return_path(from_qemu);
    let (stop_tx, stop_rx) = watch::channel(false);
    let pump = crate::streams::pump_frames(&mut reader, to_qemu, io_timeout, None, Some(stop_rx));
    let relay_back = async {
        while let Some(c) = back_rx.recv().await {
            let sent = async {
                writer.write_data(&c).await?;
                writer.flush().await
            };
            if let Err(e) = sent.await {
                let _ = stop_tx.send(true);
                return Err(crate::chain(&e));
            }
        }
        Ok(())
    };
    // The return path ends when QEMU closes its end, after the last page.
    let pumped = tokio::select! {
        p = pump => p,
        Err(e) = relay_back => Err(e),
    };
    let whole = match pumped {
        Ok(sum) => sum,
        Err(why) => {
            tracing::warn!(%why, "resumed post-copy interrupted again; the VM is kept");
            rec.error = Some(format!(
                "{why}; post-copy interrupted again: the VM runs here but pages are still on {}",
                rec.source
            ));
            let _ = agent.records.save(&mut rec);
            return;
        }
    };
    let expect = Expect {
        id: &id,
        source: &rec.source,
        destination: &agent.host,
        vm: &rec.vm,
        binding: Some(&offer_binding(&exporter, &id)),
    };
    let commit = match reader.read_control::<PeerMessage>().await {
        Ok(PeerMessage::Commit { signed }) => {
            match agent.verify_from::<StreamBody>(&signed, evidence::COMMIT, &rec.source, &expect) {
                Ok(b) if (b.bytes, b.digest) == whole => Ok(signed),
                Ok(b) => Err(format!(
                    "final commit is for {} bytes / {}, {} / {} arrived",
                    b.bytes, b.digest, whole.0, whole.1
                )),
                Err(e) => Err(format!("invalid final commit: {e}")),
            }
        }
        Ok(other) => Err(format!("expected the final commit, got {}", other.name())),
        Err(e) => Err(format!("no final commit: {}", crate::chain(&e))),
    };
    if let Err(why) =
        crate::incoming::wait_incoming(&qmp, agent.cfg.migration.commit_timeout()).await
    {
        rec.error = Some(format!("destination QEMU did not complete the resumed post-copy: {why}"));
        let _ = agent.records.save(&mut rec);
        return;
    }
    rec.state = MigrationState::Completed;
    rec.error = commit.as_ref().err().cloned();
    rec.total_ms = Some(crate::records::now_unix_ms().saturating_sub(rec.created_unix_ms));
    let receipt = match &commit {
        Ok(signed) => {
            let _ = agent
                .audit(ev(
                    "commit_received",
                    serde_json::json!({ "postcopy": "final", "recovered": true }),
                    Some(signed.clone()),
                ))
                .await;
            let body = StreamBody {
                migration_id: id,
                source: rec.source.clone(),
                destination: agent.host.clone(),
                vm: rec.vm.clone(),
                channel_binding: offer_binding(&exporter, &id),
                log_head: agent.log_head(),
                bytes: whole.0,
                digest: whole.1,
            };
            agent.sign(evidence::RECEIPT, &body).ok()
        }
        Err(why) => {
            tracing::error!(%why, "resumed post-copy finished without a valid final commit");
            None
        }
    };
    rec.receipt = receipt.clone().or(rec.receipt.take());
    if let Err(e) = agent.records.save(&mut rec) {
        tracing::error!(error = %crate::chain(&e), "cannot record completion");
    }
    if let Some(e) = agent.vms.lock().await.get_mut(&rec.vm) {
        e.busy = None;
    }
    agent.authz.moved(&rec.vm);
    agent.metrics.migration_finished(Role::Destination, "completed", whole.0, started.elapsed());
    if let Some(signed) = receipt {
        let _ = agent
            .audit(ev(
                "receipt_sent",
                serde_json::json!({ "postcopy": "final", "recovered": true }),
                Some(signed.clone()),
            ))
            .await;
        let _ = writer.write_control(&PeerMessage::Receipt { signed }).await;
    }
    tracing::info!(bytes = whole.0, "resumed post-copy complete");
}
