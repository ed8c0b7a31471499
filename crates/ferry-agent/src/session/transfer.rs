//! The source's transfer: QEMU's streams through the pumps to the
//! destination, then the signed Commit and the destination's answer.

use std::time::Duration;

use ferry_channel::{SendPump, StreamSum};
use ferry_session::Event;
use ferry_types::Digest32;
use tokio::sync::mpsc;

use super::control;
use super::handshake::{self, Accepted};
use super::outbound::Outbound;
use super::peer_watch::{next_answer, watch_peer, AbortOnDrop, PeerWord};
use super::postcopy_source::{self, Switchover};
use super::streams;
use super::verdict::{self, Answer, Verdict};
use crate::audit::{Audit, Phase};
use crate::backend::ChannelKind;
use crate::error::Error;
use crate::evidence::{self, AbortBody, StreamBody};
use crate::net::Writer;
use crate::protocol::PeerMessage;
use crate::report::report;

/// Steps 2 to 7 of the protocol; Ok once the record says Completed.
pub async fn run(out: &mut Outbound) -> Result<(), Error> {
    let Accepted { reader, mut writer, binding } = handshake::offer(out).await?;
    if out.cancelled() {
        out.send_abort(&mut writer, &binding, "cancelled by the operator".into()).await;
        return Err(Error::Cancelled);
    }
    out.set_phase("transfer");
    let agent = out.agent().clone();
    let io_timeout = agent.cfg.migration.io_timeout();
    let mut channels = agent.backend.migrate_out(&out.vm, out.plan).await?;
    let managed = agent.backend.managed();
    let mut first = channels.next().await;
    // libvirt's control connection lives until its migrate call returns,
    // which is after the Receipt: it ends with this function.
    let _control = match first {
        Some(Ok(c)) if c.kind == ChannelKind::Control => {
            let carry = control::carry(agent.clone(), out.to.clone(), out.id(), c.stream);
            let carrying = AbortOnDrop(tokio::spawn(carry));
            // libvirt opens the stream only after its Prepare went through.
            first = channels.next().await;
            Some(carrying)
        }
        _ => None,
    };
    let main = match first {
        Some(Ok(c)) if c.kind == ChannelKind::Main => c.stream,
        Some(Ok(c)) => return Err(Error::Mismatch(format!("QEMU opened {:?} first", c.kind))),
        Some(Err(e)) => return Err(e.into()),
        None => return Err(Error::Mismatch("QEMU opened no migration stream".into())),
    };
    let (qemu, qemu_back) = main.into_split();
    // Only post-copy and libvirt's migrations use QEMU's return path;
    // otherwise the half is held open.
    let (return_path, _held) = if out.plan.postcopy() || managed {
        (Some(qemu_back), None)
    } else {
        (None, Some(qemu_back))
    };
    // From here the peer may send Abort at any time: a task watches for it.
    let (peer_tx, mut peer_rx) = mpsc::channel::<PeerWord>(4);
    let _watcher = AbortOnDrop(tokio::spawn(watch_peer(reader, peer_tx, return_path, io_timeout)));
    let _switch = out.plan.postcopy().then(|| {
        let (agent, vm) = (agent.clone(), out.vm.clone());
        AbortOnDrop(tokio::spawn(async move {
            if let Some(pc) = agent.backend.postcopy() {
                pc.switch_when_behind(&vm).await;
            }
        }))
    });
    let (joined_tx, mut joined_rx) = mpsc::channel(crate::plan::MAX_STREAMS as usize);
    let (stop_joined, stop_rx) = tokio::sync::watch::channel(false);
    let _joined = AbortOnDrop(tokio::spawn({
        let (agent, to, id) = (agent.clone(), out.to.clone(), out.id());
        async move {
            let mut senders = Vec::new();
            while let Some(channel) = channels.next().await {
                let (agent, to, tx) = (agent.clone(), to.clone(), joined_tx.clone());
                let stop = stop_rx.clone();
                let sent = async move {
                    let c = channel?;
                    let ChannelKind::Multifd(index) = c.kind else {
                        return Err(Error::Mismatch(format!("QEMU opened a second {:?}", c.kind)));
                    };
                    let sent = streams::send_joined(&agent, &to, id, index, c.stream, stop).await;
                    sent.map(|s| (index, s))
                };
                senders.push(AbortOnDrop(tokio::spawn(async move {
                    let _ = tx.send(sent.await).await;
                })));
            }
            // The senders live until the transfer ends and aborts this task.
            let _keep = senders;
            std::future::pending::<()>().await
        }
    }));
    let _ticker = AbortOnDrop(tokio::spawn(progress_ticker(
        agent.clone(),
        out.vm.clone(),
        out.progress.clone(),
        out.bytes.clone(),
        out.started,
    )));

    // Each forward is written through at once: post-copy's pages never wait.
    let mut pump = SendPump::new(qemu, io_timeout);
    let mut joined = Vec::new();
    let mut cancel = out.cancel.clone();
    // A guest that dirties memory faster than it can be sent never
    // converges: give up in time and resume it here.
    let deadline = tokio::time::Instant::now() + agent.cfg.migration.max_transfer();
    let mut switch = Switchover::default();
    let mut loaded = false;
    loop {
        let committed = switch.committed.is_some();
        if !committed && *cancel.borrow_and_update() {
            out.send_abort(&mut writer, &binding, "cancelled by the operator".into()).await;
            return Err(Error::Cancelled);
        }
        tokio::select! {
            _ = cancel.changed(), if !committed => continue,
            Some(r) = joined_rx.recv() => match r {
                Ok(indexed) => joined.push(indexed),
                Err(e) => {
                    out.send_abort(&mut writer, &binding, report(&e)).await;
                    return Err(e);
                }
            },
            word = peer_rx.recv() => {
                // libvirt's stream does not end before the gate: the
                // destination's `Loaded` marks its end instead.
                if managed && matches!(word, Some(Ok(PeerMessage::Loaded { .. }))) {
                    loaded = true;
                    break;
                }
                let at = pump.sum();
                if postcopy_source::during_transfer(out, &mut writer, &binding, &mut switch, at, &word).await? {
                    continue;
                }
                return Err(peer_failure(out, word, committed.then_some(&binding)));
            }
            _ = tokio::time::sleep_until(deadline), if !committed => {
                let e = Error::NoConvergence(agent.cfg.migration.max_transfer());
                out.send_abort(&mut writer, &binding, report(&e)).await;
                return Err(e);
            }
            n = pump.read() => {
                let n = n.map_err(|e| Error::relay(e, &out.to))?;
                if n == 0 {
                    break;
                }
                pump.forward(n, &mut writer).await.map_err(|e| Error::relay(e, &out.to))?;
                out.count(pump.bytes());
            }
        }
    }
    if loaded {
        stop_joined.send_replace(true);
        let main = pump.sum();
        return finish_managed(out, writer, peer_rx, binding, main, joined, &mut joined_rx).await;
    }
    // QEMU closed its stream: it must also say the migration completed,
    // otherwise the stream is incomplete and the destination must not run it.
    let status = agent.backend.outgoing_status(&out.vm).await;
    let status = match status {
        Ok(s) if s.status.is_terminal() => s,
        _ => wait_terminal(out).await?,
    };
    if status.status != ferry_vmm::MigrationState::Completed {
        let why = status.error_desc.unwrap_or_else(|| format!("{:?}", status.status));
        if switch.committed.is_none() {
            out.send_abort(&mut writer, &binding, format!("source QEMU: {why}")).await;
        }
        return Err(Error::SourceQemu(why));
    }
    out.session.record_mut().qemu_downtime_ms = status.downtime;
    out.session.record_mut().qemu_total_ms = status.total_time;
    if postcopy_source::handed_over(out, &binding, &mut switch, &mut peer_rx).await? {
        // QEMU completes a post-copy only after the destination closed its
        // return path, i.e. loaded every page: the VM is whole there now.
        return postcopy_source::final_commit(out, writer, peer_rx, binding, pump.sum()).await;
    }
    let host = out.to.clone();
    writer.write_data_end().await.map_err(|source| Error::Link { host, source })?;
    let sums =
        collect_joined(out, &mut writer, &binding, pump.sum(), joined, &mut joined_rx).await?;
    let total = streams::combine(&sums);
    commit(out, writer, peer_rx, binding, total).await
}

/// libvirt's migration: the destination loaded everything it was sent.
/// What this host forwarded is all there is (the source QEMU waits for
/// its return path's SHUT and sends nothing more, on any stream): sign
/// for every stream.
async fn finish_managed(
    out: &mut Outbound,
    mut writer: Writer,
    peer_rx: mpsc::Receiver<PeerWord>,
    binding: Digest32,
    main: StreamSum,
    joined: Vec<(u8, StreamSum)>,
    joined_rx: &mut mpsc::Receiver<Result<(u8, StreamSum), Error>>,
) -> Result<(), Error> {
    let host = out.to.clone();
    writer.write_data_end().await.map_err(|source| Error::Link { host, source })?;
    let sums = collect_joined(out, &mut writer, &binding, main, joined, joined_rx).await?;
    commit(out, writer, peer_rx, binding, streams::combine(&sums)).await
}

/// The multifd channels end with the main one; collect what is left.
async fn collect_joined(
    out: &Outbound,
    writer: &mut Writer,
    binding: &Digest32,
    main: StreamSum,
    mut joined: Vec<(u8, StreamSum)>,
    rx: &mut mpsc::Receiver<Result<(u8, StreamSum), Error>>,
) -> Result<Vec<StreamSum>, Error> {
    let io_timeout = out.agent().cfg.migration.io_timeout();
    while joined.len() + 1 < out.plan.streams().get() as usize {
        let got = tokio::time::timeout(io_timeout, rx.recv()).await;
        let e = match got {
            Ok(Some(Ok(indexed))) => {
                joined.push(indexed);
                continue;
            }
            Ok(Some(Err(e))) => e,
            Ok(None) | Err(_) => Error::Mismatch("a multifd stream did not finish".into()),
        };
        out.send_abort(writer, binding, report(&e)).await;
        return Err(e);
    }
    streams::in_order(out.plan.streams().get(), main, joined)
}

/// Step 6 and the answer: sign the Commit, record it durably, send it, and
/// let only the destination's signed word move the paused copy.
async fn commit(
    out: &mut Outbound,
    mut writer: Writer,
    mut peer_rx: mpsc::Receiver<PeerWord>,
    binding: Digest32,
    total: StreamSum,
) -> Result<(), Error> {
    let agent = out.agent().clone();
    let rec = out.session.record_mut();
    rec.bytes = total.bytes;
    rec.digest = Some(total.digest);
    let signed = agent.notary.sign(evidence::COMMIT, &out.stream_body(binding, total))?;
    // Past this point the migration cannot be cancelled, only settled.
    agent.sessions.uncancellable(&out.id()).await;
    // SECURITY (R6): the commit is in the audit log before it leaves, and
    // it is recorded durably (after a crash this host must know it may no
    // longer resume its copy on its own). Two files, written at once; the
    // Commit waits for both. If the audit record fails, the Commit is
    // withheld and the destination told to abort: the record already says
    // committed, so the source settles as after any failure past the
    // Commit, on the destination's word (it answers `aborted`).
    let audit =
        out.session.begin_audit(vec![(Audit::CommitSent(Phase::Whole), Some(signed.clone()))]);
    let recorded = out.session.apply(Event::Committed, None).await;
    if let Err(e) = audit.finish().await.map_err(Error::Audit) {
        out.send_abort(&mut writer, &binding, "the source cannot write its audit log".into()).await;
        return Err(e);
    }
    recorded?;
    out.set_phase("commit");
    let host = out.to.clone();
    writer
        .write_control(&PeerMessage::Commit { signed })
        .await
        .map_err(|source| Error::Link { host: host.clone(), source })?;
    let wait = agent.cfg.migration.commit_timeout() + agent.cfg.migration.io_timeout();
    let answer = next_answer(&mut peer_rx, wait, out.plan.postcopy()).await;
    settle(out, answer, &binding, total).await
}

/// Act on the destination's answer to a Commit for `total`.
pub async fn settle(
    out: &mut Outbound,
    answer: Answer,
    binding: &Digest32,
    total: StreamSum,
) -> Result<(), Error> {
    let agent = out.agent().clone();
    let host = out.to.clone();
    let expect = out.expect(Some(binding));
    let verdict = verdict::after_commit(
        &host,
        answer,
        total,
        |s| agent.notary.verify_from::<StreamBody>(s, evidence::RECEIPT, &host, &expect),
        |s| agent.notary.verify_from::<AbortBody>(s, evidence::ABORT, &host, &expect),
    );
    match verdict {
        Verdict::Completed { signed, body } => {
            let audit = Audit::ReceiptReceived { phase: Phase::Whole, via: None };
            let _ = out.session.audit(audit, Some(signed.clone())).await;
            let rec = out.session.record_mut();
            rec.receipt = Some(signed);
            // libvirt's source returns before its QEMU's downtime can be
            // read; the destination's libvirt kept it and signed for it.
            if rec.qemu_downtime_ms.is_none() {
                rec.qemu_downtime_ms = body.qemu_downtime_ms;
            }
            out.session.apply(Event::ReceiptVerified, None).await?;
            Ok(())
        }
        Verdict::Aborted { reason, signed } => {
            let _ = out
                .session
                .audit(Audit::AbortReceived { reason: reason.clone() }, Some(signed))
                .await;
            Err(Error::PeerAborted { host, reason })
        }
        Verdict::InDoubt(e) => Err(e),
    }
}

/// Why the transfer stops on the peer's word: its Abort, or a failure.
/// Before the Commit any Abort is the peer's promise never to run the VM;
/// after it (`committed`, the Offer's binding) only a signed, verified one.
fn peer_failure(out: &Outbound, word: Option<PeerWord>, committed: Option<&Digest32>) -> Error {
    let host = out.to.clone();
    match word {
        Some(Ok(PeerMessage::Abort { reason, signed, .. })) => match (committed, signed) {
            (None, _) => Error::PeerAborted { host, reason },
            (Some(binding), Some(signed)) => {
                let expect = out.expect(Some(binding));
                let checked = out.agent().notary.verify_from::<AbortBody>(
                    &signed,
                    evidence::ABORT,
                    &host,
                    &expect,
                );
                match checked {
                    Ok(_) => Error::PeerAborted { host, reason },
                    Err(source) => Error::Evidence { host, kind: "abort", source },
                }
            }
            (Some(_), None) => {
                Error::Unexpected { host, step: "switchover", got: "an unsigned abort" }
            }
        },
        Some(Ok(m)) => Error::Unexpected { host, step: "transfer", got: m.name() },
        Some(Err(why)) => Error::Lost { host, why },
        None => Error::Lost { host, why: "it closed".into() },
    }
}

async fn wait_terminal(out: &Outbound) -> Result<ferry_vmm::MigrationStatus, Error> {
    let agent = out.agent();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // The guest is paused: look again soon, then back off to 20 ms.
    let mut pause = Duration::from_millis(1);
    loop {
        let s = agent.backend.outgoing_status(&out.vm).await?;
        if s.status.is_terminal() {
            return Ok(s);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Error::SourceQemu(format!(
                "still {:?} 30 s after its stream ended",
                s.status
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

async fn progress_ticker(
    agent: std::sync::Arc<crate::agent::Agent>,
    vm: ferry_types::VmName,
    tx: tokio::sync::watch::Sender<crate::protocol::Progress>,
    bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    started: std::time::Instant,
) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let status = agent.backend.outgoing_status(&vm).await;
        tx.send_modify(|p| {
            p.bytes = bytes.load(std::sync::atomic::Ordering::Relaxed);
            p.elapsed_ms = started.elapsed().as_millis() as u64;
            if let Some(ram) = status.as_ref().ok().and_then(|s| s.ram.as_ref()) {
                p.ram_total = ram.total;
                p.ram_remaining = ram.remaining;
                p.dirty_pages_rate = ram.dirty_pages_rate;
                p.iterations = ram.dirty_sync_count;
            }
        });
    }
}
