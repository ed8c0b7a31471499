//! Post-copy (QEMU `postcopy-ram`), opt-in per migration and allowed by
//! policy on both hosts (Cedar context `postcopy`).
//!
//! Migrations start in pre-copy and switch only once pre-copy shows it will
//! not converge ([`switch_reason`]). At the switch the source stops the VM
//! and sends the device state, the destination may run the VM and fetches
//! the pages it still lacks over QEMU's return path, which Ferry carries as
//! data frames from destination to source. The destination runs the VM only
//! after the source's signed Commit for exactly the bytes that came before
//! it; its Receipt hands the VM over.
//!
//! The extra risk, which is why it is opt-in: after the hand-over the VM
//! exists only as both halves together. If the link or either host fails
//! before the last page arrives, the VM stalls on the destination until the
//! link comes back; if the source host is lost, so is the VM. Ferry then
//! keeps both QEMUs (state `postcopy_active`) and never stops or resumes
//! either on its own.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_audit::Signed;
use ferry_types::Digest32;
use ferry_vmm::{MigrationState as QemuMigration, QemuProcess, Qmp, RunState};
use tokio::io::AsyncReadExt;
use tokio::net::unix::OwnedReadHalf;
use tokio::sync::{mpsc, oneshot, watch, Mutex};

use crate::evidence::{self, StreamBody};
use crate::incoming::{self, Receiving};
use crate::outgoing::{
    audit, backend, peer_fault, send_abort, set_phase, AbortOnDrop, Ctx, Failure,
};
use crate::protocol::PeerMessage;
use crate::records::{MigrationRecord, MigrationState, Role};
use crate::streams::StreamSum;
use crate::{client, server, ErrorKind, Fault};

/// Why post-copy and multifd are never combined.
pub const WITH_MULTIFD: &str =
    "post-copy cannot be combined with several streams (QEMU multifd): QEMU 7.2 destinations crash on it; use --streams 1 with --postcopy";

/// Return-path bytes read from the destination QEMU at a time: its messages are small.
const RETURN_CHUNK: usize = 64 * 1024;

/// How far a post-copy migration got, seen from the source.
#[derive(Default)]
pub(crate) struct Switch {
    /// The switchover Commit was sent, for this many bytes and this digest.
    pub committed: Option<StreamSum>,
    /// The destination signed for the VM and runs it.
    pub handed_over: bool,
}

impl Switch {
    /// Sort a failure by what the source may still do with its copy.
    pub(crate) fn fail(&self, fault: Fault) -> Failure {
        if self.handed_over {
            Failure::Split(fault)
        } else if self.committed.is_some() {
            Failure::InDoubt(fault)
        } else {
            Failure::BeforeCommit(fault)
        }
    }
}

/// Pre-copy passes after which the switch happens whatever the rates say:
/// a guest that needs more has kept its migration running for long enough.
const MAX_PRECOPY_PASSES: u64 = 8;

/// Source: switch QEMU to post-copy only once pre-copy shows it will not
/// converge soon. A guest that converges never takes post-copy's risk.
pub(crate) async fn trigger(qmp: Arc<Mutex<Qmp>>) {
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Ok(s) = qmp.lock().await.query_migrate().await else { return };
        match s.status {
            QemuMigration::Setup => {}
            QemuMigration::Active => {
                let Some(why) = s.ram.as_ref().and_then(switch_reason) else { continue };
                match qmp.lock().await.execute("migrate-start-postcopy", None).await {
                    Ok(_) => tracing::info!(reason = %why, "switching to post-copy"),
                    Err(e) => {
                        tracing::warn!(error = %crate::chain(&e), "QEMU refused to start post-copy")
                    }
                }
                return;
            }
            _ => return,
        }
    }
}

/// Why pre-copy should give way to post-copy now, if it should. Only after
/// the first pass (QEMU knows the dirty rate from its second bitmap sync
/// on): when the guest dirties memory at least half as fast as the link
/// carries it, pre-copy's remaining work shrinks too slowly to converge.
fn switch_reason(ram: &ferry_vmm::RamStats) -> Option<String> {
    if ram.dirty_sync_count < 2 {
        return None;
    }
    let page = if ram.page_size == 0 { 4096 } else { ram.page_size };
    let dirty = ram.dirty_pages_rate.saturating_mul(page) as f64;
    let link = ram.mbps * 1e6 / 8.0;
    if link > 0.0 && dirty * 2.0 >= link {
        return Some(format!(
            "the guest dirties {:.0} MB/s; the link carries {:.0} MB/s",
            dirty / 1e6,
            link / 1e6
        ));
    }
    if ram.dirty_sync_count > MAX_PRECOPY_PASSES {
        return Some(format!(
            "pre-copy is still running after {} passes",
            ram.dirty_sync_count - 1
        ));
    }
    None
}

/// Source: the destination holds the switchover package. Check that our
/// copy is stopped, then commit to the stream so far, in-line after it.
/// Returns false, committing nothing, if QEMU already sent everything: the
/// destination is then one whole stream away from a plain final Commit.
pub(crate) async fn switchover_commit(
    ctx: &Ctx,
    rec: &mut MigrationRecord,
    writer: &mut client::Writer,
    binding: &Digest32,
    at: StreamSum,
) -> Result<bool, Failure> {
    use Failure::BeforeCommit as Before;
    let status = ctx
        .qmp
        .lock()
        .await
        .query_migrate()
        .await
        .map_err(|e| Before(backend("query-migrate", e)))?;
    if status.status == QemuMigration::Completed {
        tracing::info!("post-copy ready, but QEMU already sent everything: committing the whole stream instead");
        return Ok(false);
    }
    let run =
        ctx.qmp.lock().await.status().await.map_err(|e| Before(backend("query-status", e)))?;
    // SECURITY: the destination may run the VM only once it stopped here.
    if status.status != QemuMigration::PostcopyActive || run == RunState::Running {
        let why = format!(
            "{} reported post-copy ready, but this host's QEMU has not switched ({:?}, {:?})",
            ctx.to, status.status, run
        );
        send_abort(ctx, writer, binding, why.clone()).await;
        return Err(Before(Fault::new(ErrorKind::Peer, why)));
    }
    let body = ctx.stream_body(*binding, at);
    let signed = ctx
        .agent
        .sign(evidence::SWITCHOVER, &body)
        .map_err(|e| Before(Fault::new(ErrorKind::Backend, e)))?;
    if let Err(e) = audit(
        ctx,
        "commit_sent",
        serde_json::json!({ "postcopy": "switchover" }),
        Some(signed.clone()),
    )
    .await
    {
        send_abort(ctx, writer, binding, "source cannot write its audit log".into()).await;
        return Err(Before(e));
    }
    ctx.agent.cancels.lock().await.remove(&ctx.id);
    rec.state = MigrationState::Committed;
    rec.bytes = at.0;
    rec.digest = Some(at.1);
    // SECURITY: durable before it is sent, as for a pre-copy commit.
    ctx.agent.records.save(rec).map_err(|e| Before(backend("recording the commit", e)))?;
    set_phase(ctx, "switchover");
    writer
        .write_control(&PeerMessage::Commit { signed })
        .await
        .map_err(|e| Failure::InDoubt(peer_fault(ctx, e)))?;
    Ok(true)
}

/// The destination's next word after a Commit. With post-copy allowed, a
/// PostcopyReady may still be on its way from before QEMU finished: it is
/// stale once the whole stream is committed, and skipped.
pub(crate) async fn answer(
    peer_rx: &mut mpsc::Receiver<Result<PeerMessage, String>>,
    wait: Duration,
    postcopy: bool,
) -> Result<Option<Result<PeerMessage, String>>, tokio::time::error::Elapsed> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, peer_rx.recv()).await? {
            Some(Ok(PeerMessage::PostcopyReady { .. })) if postcopy => continue,
            other => return Ok(other),
        }
    }
}

/// Source: the destination signed for the VM at the switchover.
pub(crate) async fn switchover_receipt(
    ctx: &Ctx,
    rec: &mut MigrationRecord,
    signed: Signed,
    binding: &Digest32,
    at: StreamSum,
) -> Result<(), Failure> {
    let body = ctx
        .agent
        .verify_from::<StreamBody>(&signed, evidence::HANDOVER, &ctx.to, &ctx.expect(Some(binding)))
        .map_err(|e| {
            Failure::InDoubt(Fault::new(
                ErrorKind::Peer,
                format!("invalid switchover receipt: {e}"),
            ))
        })?;
    if (body.bytes, body.digest) != at {
        let why = format!(
            "{} signed for {} bytes / {}, the switchover was at {} / {}",
            ctx.to, body.bytes, body.digest, at.0, at.1
        );
        return Err(Failure::InDoubt(Fault::new(ErrorKind::Peer, why)));
    }
    if let Err(e) = audit(
        ctx,
        "receipt_received",
        serde_json::json!({ "postcopy": "switchover" }),
        Some(signed.clone()),
    )
    .await
    {
        tracing::error!(error = %e, "switchover receipt not in the audit log");
    }
    rec.receipt = Some(signed);
    rec.state = MigrationState::PostcopyActive;
    crate::outgoing::save(&ctx.agent, rec);
    set_phase(ctx, "postcopy");
    tracing::info!(bytes = at.0, "destination runs the VM; serving its remaining pages");
    Ok(())
}

/// Source, after QEMU completed a post-copy: the VM is whole on the
/// destination. Commit to the whole stream and collect the final receipt;
/// without it the switchover receipt stands and the migration completes.
pub(crate) async fn final_commit(
    ctx: &Ctx,
    rec: &mut MigrationRecord,
    mut writer: client::Writer,
    mut peer_rx: mpsc::Receiver<Result<PeerMessage, String>>,
    binding: Digest32,
    whole: StreamSum,
) -> Result<Digest32, Failure> {
    rec.bytes = whole.0;
    rec.digest = Some(whole.1);
    let exchange = async {
        writer.write_data_end().await.map_err(|e| crate::chain(&e))?;
        let signed = ctx.agent.sign(evidence::COMMIT, &ctx.stream_body(binding, whole))?;
        audit(ctx, "commit_sent", serde_json::json!({ "postcopy": "final" }), Some(signed.clone()))
            .await
            .map_err(|f| f.message)?;
        writer
            .write_control(&PeerMessage::Commit { signed })
            .await
            .map_err(|e| crate::chain(&e))?;
        let wait = ctx.agent.cfg.migration.commit_timeout() + ctx.agent.cfg.migration.io_timeout();
        let signed = match tokio::time::timeout(wait, peer_rx.recv()).await {
            Ok(Some(Ok(PeerMessage::Receipt { signed }))) => signed,
            Ok(Some(Ok(m))) => {
                return Err(format!("{} answered the final commit with {}", ctx.to, m.name()))
            }
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => return Err(format!("lost the connection to {}", ctx.to)),
            Err(_) => return Err(format!("no final receipt within {wait:?}")),
        };
        let body = ctx.agent.verify_from::<StreamBody>(
            &signed,
            evidence::RECEIPT,
            &ctx.to,
            &ctx.expect(Some(&binding)),
        )?;
        if (body.bytes, body.digest) != whole {
            return Err(format!(
                "final receipt is for {} bytes / {}, not {} / {}",
                body.bytes, body.digest, whole.0, whole.1
            ));
        }
        let _ = audit(
            ctx,
            "receipt_received",
            serde_json::json!({ "postcopy": "final" }),
            Some(signed.clone()),
        )
        .await;
        Ok::<_, String>(signed)
    };
    match exchange.await {
        Ok(signed) => rec.receipt = Some(signed),
        Err(why) => {
            // QEMU completes a post-copy only after the destination loaded
            // every page, so the switchover receipt settles it.
            tracing::warn!(%why, "no final receipt; the switchover receipt stands");
            let _ =
                audit(ctx, "final_receipt_missing", serde_json::json!({ "why": why }), None).await;
        }
    }
    Ok(whole.1)
}

/// Destination: relay the stream both ways, take the VM over at the
/// switchover, and finish. Returns the stream's sum when no switchover
/// happened (QEMU converged in pre-copy): the caller then finishes as usual.
pub(crate) async fn receive(
    m: &mut Receiving<'_>,
    proc: &QemuProcess,
    qmp: &Arc<Mutex<Qmp>>,
    reader: &mut server::Reader,
    writer: &mut server::Writer,
    sock: &Path,
    started: Instant,
) -> Option<StreamSum> {
    let io_timeout = m.agent.cfg.migration.io_timeout();
    let main = match incoming::connect_retry(sock).await {
        Ok(s) => s,
        Err(why) => {
            incoming::abort(m, proc, writer, why).await;
            return None;
        }
    };
    let (from_qemu, to_qemu) = main.into_split();
    let (_back, mut back_rx) = return_path(from_qemu);
    let (ready_tx, mut ready_rx) = oneshot::channel();
    let _ready = AbortOnDrop(tokio::spawn(wait_ready(qmp.clone(), ready_tx)));
    let (commit_tx, mut commit_rx) = mpsc::channel::<(Signed, StreamSum)>(1);
    let (stop_tx, stop_rx) = watch::channel(false);
    let pump =
        crate::streams::pump_frames(reader, to_qemu, io_timeout, Some(commit_tx), Some(stop_rx));
    // Our side of the connection: return path, readiness, the take-over.
    let mut resumed = false;
    let control = async {
        let mut ready_sent = false;
        let mut back_open = true;
        loop {
            tokio::select! {
                chunk = back_rx.recv(), if back_open => match chunk {
                    Some(c) => {
                        writer.write_data(&c).await.map_err(|e| crate::chain(&e))?;
                        writer.flush().await.map_err(|e| crate::chain(&e))?;
                    }
                    None => back_open = false,
                },
                _ = &mut ready_rx, if !ready_sent => {
                    ready_sent = true;
                    writer.write_control(&PeerMessage::PostcopyReady { migration_id: m.offer.migration_id }).await.map_err(|e| crate::chain(&e))?;
                }
                c = commit_rx.recv() => match c {
                    None => return Ok(()),
                    Some((signed, at)) if !resumed => take_over(m, qmp, writer, signed, at, &mut resumed).await?,
                    Some(_) => return Err("a second commit during the stream".to_owned()),
                },
            }
        }
    };
    let control = async {
        let r = control.await;
        if r.is_err() {
            let _ = stop_tx.send(true);
        }
        r
    };
    let (pumped, controlled) = tokio::join!(pump, control);
    let failure = match (&pumped, controlled) {
        (Err(e), _) => Some(e.clone()),
        (Ok(_), Err(e)) => Some(e),
        _ => None,
    };
    match (resumed, failure) {
        (false, Some(why)) => {
            incoming::abort(m, proc, writer, why).await;
            None
        }
        (false, None) => pumped.ok(),
        (true, Some(why)) => {
            interrupted(m, why).await;
            None
        }
        (true, None) => {
            let whole = pumped.unwrap_or((0, Digest32([0; 32])));
            finish(m, qmp, reader, writer, whole, started).await;
            None
        }
    }
}

/// Destination: QEMU's return path, read in a task of its own so that page
/// requests go out while frames come in.
pub(crate) fn return_path(mut from_qemu: OwnedReadHalf) -> (AbortOnDrop, mpsc::Receiver<Vec<u8>>) {
    let (tx, rx) = mpsc::channel::<Vec<u8>>(64);
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; RETURN_CHUNK];
        while let Ok(n) = from_qemu.read(&mut buf).await {
            if n == 0 || tx.send(buf[..n].to_vec()).await.is_err() {
                return;
            }
        }
    });
    (AbortOnDrop(task), rx)
}

/// Destination: QEMU holds the switchover package once it reports
/// post-copy and is paused (it was started with -S, so it waits for us).
async fn wait_ready(qmp: Arc<Mutex<Qmp>>, ready: oneshot::Sender<()>) {
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut q = qmp.lock().await;
        let Ok(s) = q.query_migrate().await else { return };
        match s.status {
            QemuMigration::PostcopyActive => {
                if matches!(q.status().await, Ok(RunState::Paused)) {
                    let _ = ready.send(());
                    return;
                }
            }
            QemuMigration::Completed | QemuMigration::Failed | QemuMigration::Cancelled => return,
            _ => {}
        }
    }
}

/// Destination: the source's signed word that its copy is stopped, for
/// exactly what arrived before it. Only then does the VM run here.
async fn take_over(
    m: &mut Receiving<'_>,
    qmp: &Mutex<Qmp>,
    writer: &mut server::Writer,
    signed: Signed,
    at: StreamSum,
    resumed: &mut bool,
) -> Result<(), String> {
    let source = m.offer.source.clone();
    let body = m
        .agent
        .verify_from::<StreamBody>(&signed, evidence::SWITCHOVER, &source, &m.expect())
        .map_err(|e| format!("invalid switchover commit: {e}"))?;
    m.audit("commit_received", serde_json::json!({ "postcopy": "switchover" }), Some(signed))
        .await?;
    if (body.bytes, body.digest) != at {
        return Err(format!(
            "switchover commit is for {} bytes / {}, {} / {} arrived before it",
            body.bytes, body.digest, at.0, at.1
        ));
    }
    m.rec.state = MigrationState::Resuming;
    m.agent
        .records
        .save(&mut m.rec)
        .map_err(|e| format!("cannot record the resume: {}", crate::chain(&e)))?;
    m.audit(
        "resuming",
        serde_json::json!({ "bytes": at.0, "digest": at.1, "postcopy": true }),
        None,
    )
    .await?;
    qmp.lock()
        .await
        .cont()
        .await
        .map_err(|e| format!("destination QEMU refused to resume: {}", crate::chain(&e)))?;
    *resumed = true;
    let receipt = m.agent.sign(evidence::HANDOVER, &m.stream_body(at.0, at.1))?;
    m.rec.state = MigrationState::PostcopyActive;
    m.rec.receipt = Some(receipt.clone());
    if let Err(e) = m.agent.records.save(&mut m.rec) {
        tracing::error!(error = %crate::chain(&e), "cannot record the post-copy hand-over");
    }
    if let Err(e) = m
        .audit(
            "receipt_sent",
            serde_json::json!({ "postcopy": "switchover" }),
            Some(receipt.clone()),
        )
        .await
    {
        tracing::error!(error = %e, "switchover receipt not in the audit log");
    }
    tracing::info!(bytes = at.0, "VM runs here (post-copy); fetching its remaining pages");
    writer
        .write_control(&PeerMessage::Receipt { signed: receipt })
        .await
        .map_err(|e| crate::chain(&e))
}

/// Destination: the link broke after the VM started here. It stays; QEMU
/// waits in postcopy-paused for the pages it lacks.
async fn interrupted(m: &mut Receiving<'_>, why: String) {
    tracing::error!(reason = %why, "post-copy interrupted after the hand-over; the VM is kept");
    let note = format!(
        "{why}; post-copy interrupted: the VM runs here but pages are still on {}",
        m.offer.source
    );
    let _ = m.audit("postcopy_interrupted", serde_json::json!({ "reason": why }), None).await;
    m.rec.error = Some(note);
    if let Err(e) = m.agent.records.save(&mut m.rec) {
        tracing::error!(error = %crate::chain(&e), "cannot record the interruption");
    }
}

/// Destination, after the whole stream: check the final Commit, then sign
/// for the whole stream. The VM already runs here whatever they say.
async fn finish(
    m: &mut Receiving<'_>,
    qmp: &Mutex<Qmp>,
    reader: &mut server::Reader,
    writer: &mut server::Writer,
    whole: StreamSum,
    started: Instant,
) {
    let source = m.offer.source.clone();
    let commit = match reader.read_control::<PeerMessage>().await {
        Ok(PeerMessage::Commit { signed }) => {
            match m.agent.verify_from::<StreamBody>(&signed, evidence::COMMIT, &source, &m.expect())
            {
                Ok(body) if (body.bytes, body.digest) == whole => {
                    let _ = m
                        .audit(
                            "commit_received",
                            serde_json::json!({ "postcopy": "final" }),
                            Some(signed),
                        )
                        .await;
                    Ok(())
                }
                Ok(body) => Err(format!(
                    "final commit is for {} bytes / {}, {} / {} arrived",
                    body.bytes, body.digest, whole.0, whole.1
                )),
                Err(e) => Err(format!("invalid final commit: {e}")),
            }
        }
        Ok(other) => Err(format!("expected the final commit, got {}", other.name())),
        Err(e) => Err(format!("no final commit: {}", crate::chain(&e))),
    };
    let loaded = incoming::wait_incoming(qmp, m.agent.cfg.migration.commit_timeout()).await;
    if let Err(why) = loaded {
        return interrupted(m, format!("destination QEMU did not complete the post-copy: {why}"))
            .await;
    }
    m.rec.bytes = whole.0;
    m.rec.digest = Some(whole.1);
    m.rec.state = MigrationState::Completed;
    m.rec.total_ms = Some(started.elapsed().as_millis() as u64);
    if let Err(why) = &commit {
        // TLS already protected every byte; this is the evidence missing.
        tracing::error!(%why, "post-copy finished without a valid final commit");
        m.rec.error = Some(why.clone());
    }
    let receipt = commit
        .is_ok()
        .then(|| m.agent.sign(evidence::RECEIPT, &m.stream_body(whole.0, whole.1)).ok())
        .flatten();
    if let Some(r) = &receipt {
        m.rec.receipt = Some(r.clone());
    }
    if let Err(e) = m.agent.records.save(&mut m.rec) {
        tracing::error!(error = %crate::chain(&e), "cannot record completion");
    }
    let vm = m.rec.vm.clone();
    if let Some(entry) = m.agent.vms.lock().await.get_mut(&vm) {
        entry.busy = None;
    }
    m.agent.authz.moved(&vm);
    m.agent.metrics.migration_finished(Role::Destination, "completed", whole.0, started.elapsed());
    if let Some(signed) = receipt {
        let _ = m
            .audit("receipt_sent", serde_json::json!({ "postcopy": "final" }), Some(signed.clone()))
            .await;
        let _ = writer.write_control(&PeerMessage::Receipt { signed }).await;
    }
    tracing::info!(bytes = whole.0, "post-copy complete");
}

/// Recovery after an agent restart during post-copy: never stop or resume
/// a half; settle only what QEMU says is finished.
pub(crate) async fn recover(qmp: Option<Arc<Mutex<Qmp>>>, rec: &mut MigrationRecord) -> bool {
    let Some(qmp) = qmp else {
        rec.error = Some("agent restarted during post-copy and this half's QEMU is gone".into());
        tracing::error!("post-copy half lost while the agent was down");
        return false;
    };
    let done = matches!(qmp.lock().await.query_migrate().await, Ok(s) if s.status == QemuMigration::Completed);
    if done {
        rec.state = MigrationState::Completed;
    } else {
        rec.error
            .get_or_insert_with(|| "agent restarted during post-copy; both QEMUs are kept".into());
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_vmm::RamStats;

    fn ram(passes: u64, dirty_pages_per_s: u64, mbps: f64) -> RamStats {
        RamStats {
            dirty_sync_count: passes,
            dirty_pages_rate: dirty_pages_per_s,
            mbps,
            page_size: 4096,
            ..Default::default()
        }
    }

    #[test]
    fn switches_only_when_precopy_falls_behind() {
        // During the first pass nothing is known yet.
        assert_eq!(switch_reason(&ram(1, 1_000_000, 800.0)), None);
        // 256 pages/ms = 1 GB/s against a 100 MiB/s link: switch.
        let why = switch_reason(&ram(2, 256_000, 838.9)).expect("switch");
        assert!(why.contains("1049 MB/s") && why.contains("105 MB/s"), "{why}");
        // 64 pages/ms = 262 MB/s against ~800 MB/s: pre-copy converges.
        assert_eq!(switch_reason(&ram(3, 64_000, 6400.0)), None);
        // An idle guest, or a rate QEMU has not measured yet.
        assert_eq!(switch_reason(&ram(2, 0, 6400.0)), None);
        assert_eq!(switch_reason(&ram(2, 0, 0.0)), None);
        // However slow the guest, pre-copy does not run forever.
        let why = switch_reason(&ram(MAX_PRECOPY_PASSES + 1, 10, 6400.0)).expect("switch");
        assert!(why.contains("8 passes"), "{why}");
    }
}
