//! The source half of a migration (DESIGN.md steps 1, 2, 4–7).
//!
//! The one rule: the source copy is kept until the destination has signed
//! for it. Before Commit is sent, any failure resumes the source copy.
//! After Commit, only a Receipt lets the source quit its copy and only an
//! Abort lets it resume; anything else leaves it paused and "in doubt"
//! until [`resolve`] asks the destination.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_channel::Incoming;
use ferry_types::{Digest32, HostName, MigrationId, VmName};
use ferry_vmm::{MigrationState as QemuMigration, Qmp, RunState, VmSpec};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch, Mutex};
use tokio::task::JoinHandle;

use crate::client::{self, Reader};
use crate::evidence::{self, AbortBody, AcceptBody, Expect, OfferBody, StreamBody};
use crate::protocol::{offer_binding, PeerMessage, Progress};
use crate::records::{MigrationRecord, MigrationState, Role};
use crate::{Agent, ErrorKind, Fault};
use ferry_attest::QuoteRole;

/// How long the destination may take to launch QEMU and accept.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) struct Ctx {
    pub(crate) agent: Arc<Agent>,
    pub(crate) id: MigrationId,
    pub(crate) vm: VmName,
    pub(crate) to: HostName,
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) spec: VmSpec,
    pub(crate) labels: ferry_policy::VmLabels,
    pub(crate) qmp: Arc<Mutex<Qmp>>,
    pub(crate) vm_dir: PathBuf,
    pub(crate) progress: watch::Sender<Progress>,
    pub(crate) cancel: watch::Receiver<bool>,
    /// Who asked for this migration (for the audit log).
    pub(crate) operator: String,
    /// 1, or 1 + QEMU multifd channels carried on parallel connections.
    pub(crate) streams: u8,
    /// QEMU may switch to post-copy after its first pass over memory.
    pub(crate) postcopy: bool,
    pub(crate) bytes: Arc<AtomicU64>,
    pub(crate) started: Instant,
}

/// How a transfer ended, sorted by what the source must do with its copy.
pub(crate) enum Failure {
    /// Commit was never sent: resume the source copy.
    BeforeCommit(Fault),
    /// Commit was sent and no answer came: keep the copy paused.
    InDoubt(Fault),
    /// Post-copy after the destination signed for the VM: it runs there,
    /// and this host's QEMU holds pages it still lacks. Keep QEMU as it is.
    Split(Fault),
}

type Done = JoinHandle<Result<MigrationRecord, Fault>>;

/// Reserve the VM, write the first record and start the migration task.
pub async fn start(
    agent: Arc<Agent>,
    vm: VmName,
    to: HostName,
    operator: &ferry_types::OperatorName,
    role: &str,
    streams: u8,
    postcopy: bool,
) -> Result<(MigrationId, watch::Receiver<Progress>, Done), Fault> {
    if to == agent.host {
        return Err(Fault::new(ErrorKind::Request, format!("VM {vm} is already on {to}")));
    }
    let addr = *agent.cfg.peers.get(&to).ok_or_else(|| {
        Fault::new(
            ErrorKind::Request,
            format!("unknown destination {to}: not in this agent's [peers] table"),
        )
    })?;
    let id = MigrationId::new();
    let (spec, labels, qmp, vm_dir) = {
        let mut table = agent.vms.lock().await;
        let entry = table.get_mut(&vm).ok_or_else(|| {
            Fault::new(ErrorKind::Request, format!("no VM {vm} on {}", agent.host))
        })?;
        if let Some(other) = entry.busy {
            return Err(Fault::new(
                ErrorKind::Request,
                format!("VM {vm} is already held by migration {other}"),
            ));
        }
        // SECURITY (R3): default deny; a denial is a value with a reason,
        // audited, and nothing has been touched.
        if let Err(denied) = agent.authz.authorize_outgoing(
            operator,
            role,
            &vm,
            &entry.labels,
            &agent.host,
            &to,
            postcopy,
            agent.attestation.enabled(),
        ) {
            agent.metrics.refused("policy");
            let ev = evidence::event(
                "denied",
                &id,
                &vm,
                &to,
                serde_json::json!({ "operator": operator, "role": role, "reason": denied.message }),
                None,
            );
            let _ = agent.audit(ev).await;
            return Err(denied);
        }
        entry.busy = Some(id);
        (entry.spec.clone(), entry.labels.clone(), entry.qmp.clone(), entry.proc.dir.clone())
    };
    let mut rec =
        MigrationRecord::new(id, Role::Source, vm.clone(), agent.host.clone(), to.clone());
    rec.streams = streams;
    rec.postcopy = postcopy;
    if let Err(e) = agent.records.create(&mut rec) {
        release(&agent, &vm).await;
        // Fail closed: a migration without a durable record must not start.
        return Err(Fault::new(
            ErrorKind::Backend,
            format!("cannot record migration: {}", crate::chain(&e)),
        ));
    }
    let (tx, rx) =
        watch::channel(Progress { id: Some(id), phase: "connect".into(), ..Default::default() });
    agent.active.lock().await.insert(id, rx.clone());
    let (cancel_tx, cancel) = watch::channel(false);
    agent.cancels.lock().await.insert(id, cancel_tx);
    let ctx = Ctx {
        cancel,
        operator: format!("{operator} (role {role})"),
        streams,
        postcopy,
        agent: agent.clone(),
        id,
        vm,
        to,
        addr,
        spec,
        labels,
        qmp,
        vm_dir,
        progress: tx,
        bytes: Arc::new(AtomicU64::new(0)),
        started: Instant::now(),
    };
    let span = tracing::info_span!("migration", migration_id = %id, vm = %ctx.vm, peer = %ctx.to, role = "source");
    let done = tokio::spawn(tracing::Instrument::instrument(run(ctx, rec), span));
    Ok((id, rx, done))
}

pub(crate) async fn release(agent: &Agent, vm: &VmName) {
    if let Some(e) = agent.vms.lock().await.get_mut(vm) {
        e.busy = None;
    }
}

/// What an operator should do about an interrupted post-copy.
pub(crate) fn recover_advice(agent: &Agent, id: &MigrationId) -> String {
    match agent.cfg.migration.postcopy_recover_retry() {
        Some(d) => format!("this agent resumes it on its own once the link is back (first try in {} ms, then at most every minute), or run `ferry migrations recover {id}`", d.as_millis()),
        None => format!("once the link is back, run `ferry migrations recover {id}`"),
    }
}

async fn run(ctx: Ctx, mut rec: MigrationRecord) -> Result<MigrationRecord, Fault> {
    tracing::info!("migration started");
    let outcome = transfer(&ctx, &mut rec).await;
    let result = match outcome {
        Ok(digest) => finish_completed(&ctx.agent, &mut rec, digest).await,
        Err(Failure::BeforeCommit(fault)) => {
            tracing::warn!(error = %fault, "migration failed before commit; resuming the source copy");
            let resumed = resume_source(&ctx.qmp).await;
            rec.state = MigrationState::Aborted;
            rec.error = Some(match resumed {
                Ok(()) => format!("{fault}; the VM runs on {} again", ctx.agent.host),
                Err(e) => format!("{fault}; resuming the source copy also failed: {e}"),
            });
            save(&ctx.agent, &mut rec);
            release(&ctx.agent, &ctx.vm).await;
            Err(Fault::new(fault.kind, rec.error.clone().unwrap_or_default()))
        }
        Err(Failure::InDoubt(fault)) => {
            tracing::error!(error = %fault, "migration in doubt; the source copy stays paused");
            rec.state = MigrationState::InDoubt;
            rec.error = Some(format!(
                "{fault}; the VM is paused on {} until `ferry migrations resolve {}` asks {}",
                ctx.agent.host, ctx.id, ctx.to
            ));
            save(&ctx.agent, &mut rec);
            Err(Fault::new(ErrorKind::InDoubt, rec.error.clone().unwrap_or_default()))
        }
        Err(Failure::Split(fault)) => {
            tracing::error!(error = %fault, "post-copy interrupted; both QEMUs are kept");
            rec.state = MigrationState::PostcopyActive;
            rec.error = Some(format!(
                "{fault}; post-copy was interrupted after {} took over the VM: it runs there, and the pages it still lacks are only in {}'s QEMU, which is kept paused. Do not stop either QEMU; {}",
                ctx.to,
                ctx.agent.host,
                recover_advice(&ctx.agent, &ctx.id)
            ));
            save(&ctx.agent, &mut rec);
            crate::recover::spawn_auto_recover(ctx.agent.clone(), ctx.id);
            Err(Fault::new(ErrorKind::InDoubt, rec.error.clone().unwrap_or_default()))
        }
    };
    let (phase, event) = match rec.state {
        MigrationState::Completed => ("completed", "completed"),
        MigrationState::InDoubt => ("in_doubt", "in_doubt"),
        MigrationState::PostcopyActive => ("postcopy_interrupted", "postcopy_interrupted"),
        _ => ("aborted", "rolled_back"),
    };
    // The outcome is decided; a record that cannot be written now is logged.
    if let Err(e) =
        audit(&ctx, event, serde_json::json!({ "error": rec.error, "bytes": rec.bytes }), None)
            .await
    {
        tracing::error!(error = %e, "outcome not in the audit log");
    }
    set_phase(&ctx, phase);
    ctx.agent.active.lock().await.remove(&ctx.id);
    ctx.agent.cancels.lock().await.remove(&ctx.id);
    let outcome = match rec.state {
        MigrationState::Completed => "completed",
        MigrationState::InDoubt | MigrationState::PostcopyActive => "in_doubt",
        _ => "aborted",
    };
    ctx.agent.metrics.migration_finished(Role::Source, outcome, rec.bytes, ctx.started.elapsed());
    result
}

pub(crate) fn save(agent: &Agent, rec: &mut MigrationRecord) {
    if let Err(e) = agent.records.save(rec) {
        tracing::error!(error = %crate::chain(&e), "cannot write migration record");
    }
}

pub(crate) fn set_phase(ctx: &Ctx, phase: &str) {
    ctx.progress.send_modify(|p| {
        p.phase = phase.to_owned();
        p.elapsed_ms = ctx.started.elapsed().as_millis() as u64;
    });
}

pub(crate) fn peer_fault(ctx: &Ctx, e: impl std::error::Error) -> Fault {
    Fault::new(ErrorKind::Peer, format!("connection to {}: {}", ctx.to, crate::chain(&e)))
}

pub(crate) fn backend(what: &str, e: impl std::error::Error) -> Fault {
    Fault::new(ErrorKind::Backend, format!("{what}: {}", crate::chain(&e)))
}

/// Steps 2 to 6. Returns the stream digest once the destination signed for it.
async fn transfer(ctx: &Ctx, rec: &mut MigrationRecord) -> Result<Digest32, Failure> {
    use Failure::BeforeCommit as Before;
    let agent = &ctx.agent;
    let mig = &agent.cfg.migration;
    let config = agent.tls.client().map_err(|e| Before(backend("TLS configuration", e)))?;
    let setup_started = Instant::now();
    let (stream, _proof) =
        client::connect(ctx.addr, &ctx.to, config, &agent.domain, mig.connect_timeout())
            .await
            .map_err(|e| Before(Fault::new(ErrorKind::Peer, crate::chain(&e))))?;
    let exporter =
        ferry_identity::channel_binding(stream.get_ref().1, crate::protocol::BINDING_LABEL, b"")
            .map_err(|e| Before(backend("channel binding", e)))?;
    let (mut reader, mut writer) = client::greet(stream, &ctx.to, ctx.addr, mig.io_timeout())
        .await
        .map_err(|e| Before(Fault::new(ErrorKind::Peer, crate::chain(&e))))?;

    set_phase(ctx, "attest");
    attest(ctx, rec, &exporter, &mut reader, &mut writer, setup_started).await.map_err(Before)?;

    set_phase(ctx, "offer");
    let binding = offer_binding(&exporter, &ctx.id);
    let offer = OfferBody {
        migration_id: ctx.id,
        source: agent.host.clone(),
        destination: ctx.to.clone(),
        vm: ctx.vm.clone(),
        channel_binding: binding,
        log_head: agent.log_head(),
        spec: ctx.spec.clone(),
        labels: ctx.labels.clone(),
        not_after_unix_ms: ctx.id.created_unix_ms() + mig.offer_validity_ms,
        streams: ctx.streams,
        postcopy: ctx.postcopy,
    };
    let signed = agent
        .sign(evidence::OFFER, &offer)
        .map_err(|e| Before(Fault::new(ErrorKind::Backend, e)))?;
    // SECURITY (R6): logged before it is sent; no record, no offer.
    audit(
        ctx,
        "offer_sent",
        serde_json::json!({ "operator": ctx.operator, "attestation": rec.attestation }),
        Some(signed.clone()),
    )
    .await
    .map_err(Before)?;
    writer
        .write_control(&PeerMessage::Offer { signed })
        .await
        .map_err(|e| Before(peer_fault(ctx, e)))?;
    reader.set_timeout(ACCEPT_TIMEOUT);
    let expect = ctx.expect(Some(&binding));
    match reader.read_control::<PeerMessage>().await.map_err(|e| Before(peer_fault(ctx, e)))? {
        PeerMessage::Accept { signed } => {
            agent
                .verify_from::<AcceptBody>(&signed, evidence::ACCEPT, &ctx.to, &expect)
                .map_err(|e| Before(Fault::new(ErrorKind::Peer, e)))?;
            audit(ctx, "accept_received", serde_json::Value::Null, Some(signed))
                .await
                .map_err(Before)?;
        }
        PeerMessage::Refuse { reason, .. } => {
            let _ =
                audit(ctx, "refused_by_peer", serde_json::json!({ "reason": reason }), None).await;
            return Err(Before(Fault::new(
                ErrorKind::Peer,
                format!("{} refused the migration: {reason}", ctx.to),
            )));
        }
        // The destination failed after starting to accept (its QEMU, its
        // audit log): same outcome as a refusal, and its signed word is kept.
        PeerMessage::Abort { reason, signed, .. } => {
            let _ =
                audit(ctx, "abort_received", serde_json::json!({ "reason": reason }), signed).await;
            return Err(Before(Fault::new(
                ErrorKind::Peer,
                format!("{} aborted the migration: {reason}", ctx.to),
            )));
        }
        other => {
            return Err(Before(Fault::new(
                ErrorKind::Peer,
                format!("{} answered the offer with {}", ctx.to, other.name()),
            )))
        }
    }
    reader.set_timeout(mig.io_timeout());

    if *ctx.cancel.borrow() {
        send_abort(ctx, &mut writer, &binding, "cancelled by the operator".into()).await;
        return Err(Before(Fault::new(
            ErrorKind::Request,
            "cancelled by the operator before the transfer",
        )));
    }
    set_phase(ctx, "transfer");
    rec.state = MigrationState::Transferring;
    ctx.agent.records.save(rec).map_err(|e| Before(backend("recording the transfer", e)))?;

    let sock = ctx.vm_dir.join("migrate-out.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)
        .map_err(|e| Before(backend("listening for QEMU's stream", e)))?;
    {
        let mut q = ctx.qmp.lock().await;
        q.set_migration_parameters(
            agent.qemu.max_bandwidth_bytes_per_s,
            agent.qemu.downtime_limit_ms,
        )
        .await
        .map_err(|e| Before(backend("setting migration parameters", e)))?;
        configure_multifd(&mut q, ctx.streams)
            .await
            .map_err(|e| Before(backend("configuring multifd", e)))?;
        q.set_capabilities(&[("postcopy-ram", ctx.postcopy)])
            .await
            .map_err(|e| Before(backend("configuring post-copy", e)))?;
        q.migrate(&format!("unix:{}", sock.display()))
            .await
            .map_err(|e| Before(backend("starting QEMU's migration", e)))?;
    }
    // QEMU connects its main channel first, then the multifd channels.
    let qemu = match tokio::time::timeout(Duration::from_secs(10), listener.accept()).await {
        Ok(Ok((s, _))) => s,
        Ok(Err(e)) => return Err(Before(backend("accepting QEMU's stream", e))),
        Err(_) => {
            return Err(Before(Fault::new(
                ErrorKind::Backend,
                "QEMU did not connect its migration stream within 10 s",
            )))
        }
    };
    let (qemu, qemu_back) = qemu.into_split();
    // Only post-copy uses QEMU's return path; otherwise the half is just held open.
    let (return_path, _held_open) =
        if ctx.postcopy { (Some(qemu_back), None) } else { (None, Some(qemu_back)) };
    // From here the peer may send Abort at any time: a task watches for it.
    let (peer_tx, mut peer_rx) = mpsc::channel::<Result<PeerMessage, String>>(4);
    let watcher = tokio::spawn(watch_peer(reader, peer_tx, return_path, mig.io_timeout()));
    let _watcher_guard = AbortOnDrop(watcher);
    let _trigger =
        ctx.postcopy.then(|| AbortOnDrop(tokio::spawn(crate::postcopy::trigger(ctx.qmp.clone()))));
    let (extra_tx, mut extra_rx) = mpsc::channel::<(u8, Result<crate::streams::StreamSum, String>)>(
        crate::streams::MAX_STREAMS as usize,
    );
    let mut extra_tasks = Vec::new();
    for index in 1..ctx.streams {
        let conn = match tokio::time::timeout(Duration::from_secs(10), listener.accept()).await {
            Ok(Ok((s, _))) => s,
            Ok(Err(e)) => return Err(Before(backend("accepting a multifd channel", e))),
            Err(_) => {
                return Err(Before(Fault::new(
                    ErrorKind::Backend,
                    format!("QEMU did not open multifd channel {index} within 10 s"),
                )))
            }
        };
        let (agent, to, addr, id, tx) =
            (ctx.agent.clone(), ctx.to.clone(), ctx.addr, ctx.id, extra_tx.clone());
        extra_tasks.push(AbortOnDrop(tokio::spawn(async move {
            let r = crate::streams::send_stream(&agent, &to, addr, id, index, conn).await;
            let _ = tx.send((index, r)).await;
        })));
    }
    drop(extra_tx);
    let _ = std::fs::remove_file(&sock);
    let mut extra_sums: Vec<Option<crate::streams::StreamSum>> = vec![None; ctx.streams as usize];
    let ticker = tokio::spawn(progress_ticker(
        ctx.qmp.clone(),
        ctx.progress.clone(),
        ctx.bytes.clone(),
        ctx.started,
    ));
    let _ticker_guard = AbortOnDrop(ticker);

    let mut pump = ferry_channel::SendPump::new(qemu, mig.io_timeout());
    let mut cancel = ctx.cancel.clone();
    // A guest that dirties memory faster than it can be sent never
    // converges: give up in time and resume it here.
    let transfer_deadline = tokio::time::Instant::now() + mig.max_transfer();
    let mut pc = crate::postcopy::Switch::default();
    loop {
        if pc.committed.is_none() && *cancel.borrow_and_update() {
            send_abort(ctx, &mut writer, &binding, "cancelled by the operator".into()).await;
            return Err(Before(Fault::new(
                ErrorKind::Request,
                "cancelled by the operator before commit",
            )));
        }
        tokio::select! {
            _ = cancel.changed(), if pc.committed.is_none() => continue,
            Some((index, r)) = extra_rx.recv() => match r {
                Ok(sum) => extra_sums[index as usize] = Some(sum),
                Err(e) => {
                    send_abort(ctx, &mut writer, &binding, e.clone()).await;
                    return Err(Before(Fault::new(ErrorKind::Peer, e)));
                }
            },
            msg = peer_rx.recv() => {
                match msg {
                    Some(Ok(PeerMessage::PostcopyReady { migration_id })) if ctx.postcopy && migration_id == ctx.id && pc.committed.is_none() => {
                        let at = (pump.bytes(), pump.sum().digest);
                        if crate::postcopy::switchover_commit(ctx, rec, &mut writer, &binding, at).await? {
                            pc.committed = Some(at);
                        }
                        continue;
                    }
                    Some(Ok(PeerMessage::Receipt { signed })) if pc.committed.is_some() && !pc.handed_over => {
                        crate::postcopy::switchover_receipt(ctx, rec, signed, &binding, pc.committed.unwrap_or((0, Digest32([0; 32])))).await?;
                        pc.handed_over = true;
                        continue;
                    }
                    _ => {}
                }
                // An Abort before the destination signed for the VM promises
                // it never runs there: resuming here is safe.
                let aborted = matches!(msg, Some(Ok(PeerMessage::Abort { .. })));
                let why = match msg {
                    Some(Ok(PeerMessage::Abort { reason, .. })) => format!("{} aborted: {reason}", ctx.to),
                    Some(Ok(m)) => format!("{} sent {} during the transfer", ctx.to, m.name()),
                    Some(Err(e)) => e,
                    None => format!("lost the connection to {}", ctx.to),
                };
                let fault = Fault::new(ErrorKind::Peer, why);
                return Err(if aborted && !pc.handed_over { Before(fault) } else { pc.fail(fault) });
            }
            _ = tokio::time::sleep_until(transfer_deadline), if pc.committed.is_none() => {
                let why = format!("the migration did not converge within {:?}", mig.max_transfer());
                send_abort(ctx, &mut writer, &binding, why.clone()).await;
                return Err(Before(Fault::new(ErrorKind::Backend, format!("{why}; raise [migration] max_transfer_ms or lower the guest's dirty rate"))));
            }
            n = pump.read() => {
                let n = match n {
                    Ok(n) => n,
                    Err(ferry_channel::RelayError::QemuSilent(t)) => return Err(pc.fail(Fault::new(ErrorKind::Backend, format!("source QEMU sent nothing for {t:?}")))),
                    Err(e) => return Err(pc.fail(backend("reading QEMU's stream", e))),
                };
                if n == 0 { break; }
                // Written through at once: post-copy's pages never wait in a buffer.
                pump.forward(n, &mut writer).await.map_err(|e| match e {
                    ferry_channel::RelayError::Peer(e) => pc.fail(peer_fault(ctx, e)),
                    e => pc.fail(backend("forwarding QEMU's stream", e)),
                })?;
                ctx.bytes.store(pump.bytes(), Ordering::Relaxed);
            }
        }
    }
    // QEMU closed its stream: it must also say the migration completed,
    // otherwise the stream is incomplete and the destination must not run it.
    let status =
        wait_qemu_terminal(&ctx.qmp, Duration::from_secs(30)).await.map_err(|f| pc.fail(f))?;
    if status.status != QemuMigration::Completed {
        let why = status.error_desc.unwrap_or_else(|| format!("{:?}", status.status));
        let fault =
            Fault::new(ErrorKind::Backend, format!("source QEMU's migration failed: {why}"));
        if pc.committed.is_some() {
            return Err(pc.fail(fault));
        }
        send_abort(ctx, &mut writer, &binding, format!("source QEMU: {why}")).await;
        return Err(Before(fault));
    }
    rec.qemu_downtime_ms = status.downtime;
    if let (Some(at), false) = (pc.committed, pc.handed_over) {
        // QEMU finished before the switchover receipt arrived: it is still due.
        let wait = mig.commit_timeout() + mig.io_timeout();
        match tokio::time::timeout(wait, peer_rx.recv()).await {
            Ok(Some(Ok(PeerMessage::Receipt { signed }))) => {
                crate::postcopy::switchover_receipt(ctx, rec, signed, &binding, at).await?;
                pc.handed_over = true;
            }
            Ok(Some(Ok(PeerMessage::Abort { reason, .. }))) => {
                return Err(Before(Fault::new(
                    ErrorKind::Peer,
                    format!("{} aborted at the switchover: {reason}", ctx.to),
                )))
            }
            _ => {
                return Err(Failure::InDoubt(Fault::new(
                    ErrorKind::Peer,
                    format!("no switchover receipt from {} within {wait:?}", ctx.to),
                )))
            }
        }
    }
    if pc.handed_over {
        // QEMU completes a post-copy only after the destination closed its
        // return path, i.e. loaded every page: the VM is whole there now.
        return crate::postcopy::final_commit(
            ctx,
            rec,
            writer,
            peer_rx,
            binding,
            (pump.bytes(), pump.sum().digest),
        )
        .await;
    }
    writer.write_data_end().await.map_err(|e| pc.fail(peer_fault(ctx, e)))?;

    // The multifd channels end with the main one; collect what is left.
    extra_sums[0] = Some((pump.bytes(), pump.sum().digest));
    while extra_sums.iter().any(Option::is_none) {
        match tokio::time::timeout(mig.io_timeout(), extra_rx.recv()).await {
            Ok(Some((index, Ok(sum)))) => extra_sums[index as usize] = Some(sum),
            Ok(Some((_, Err(e)))) => {
                send_abort(ctx, &mut writer, &binding, e.clone()).await;
                return Err(Before(Fault::new(ErrorKind::Peer, e)));
            }
            Ok(None) | Err(_) => {
                let why = "a multifd stream did not finish".to_owned();
                send_abort(ctx, &mut writer, &binding, why.clone()).await;
                return Err(Before(Fault::new(ErrorKind::Backend, why)));
            }
        }
    }
    drop(extra_tasks);
    let sums: Vec<_> = extra_sums.into_iter().flatten().collect();
    let (total, digest) = crate::streams::combine(&sums);
    rec.bytes = total;
    rec.digest = Some(digest);
    let commit = StreamBody {
        migration_id: ctx.id,
        source: agent.host.clone(),
        destination: ctx.to.clone(),
        vm: ctx.vm.clone(),
        channel_binding: binding,
        log_head: agent.log_head(),
        bytes: total,
        digest,
    };
    let signed = agent
        .sign(evidence::COMMIT, &commit)
        .map_err(|e| Before(Fault::new(ErrorKind::Backend, e)))?;
    // SECURITY (R6): the commit is in the audit log before it leaves; if it
    // cannot be written, the migration is aborted and the source resumes.
    if let Err(e) = audit(ctx, "commit_sent", serde_json::Value::Null, Some(signed.clone())).await {
        send_abort(ctx, &mut writer, &binding, "source cannot write its audit log".into()).await;
        return Err(Before(e));
    }
    // Past this point the migration cannot be cancelled, only settled.
    ctx.agent.cancels.lock().await.remove(&ctx.id);
    rec.state = MigrationState::Committed;
    // SECURITY: the commit is recorded durably before it is sent, so after
    // a crash this host knows it may no longer resume its copy on its own.
    ctx.agent.records.save(rec).map_err(|e| Before(backend("recording the commit", e)))?;
    set_phase(ctx, "commit");
    if let Err(e) = writer.write_control(&PeerMessage::Commit { signed }).await {
        return Err(Failure::InDoubt(peer_fault(ctx, e)));
    }
    let wait = mig.commit_timeout() + mig.io_timeout();
    let expect = ctx.expect(Some(&binding));
    match crate::postcopy::answer(&mut peer_rx, wait, ctx.postcopy).await {
        Ok(Some(Ok(PeerMessage::Receipt { signed }))) => {
            let receipt = agent
                .verify_from::<StreamBody>(&signed, evidence::RECEIPT, &ctx.to, &expect)
                .map_err(|e| {
                    Failure::InDoubt(Fault::new(ErrorKind::Peer, format!("invalid receipt: {e}")))
                })?;
            if receipt.bytes != total || receipt.digest != digest {
                return Err(Failure::InDoubt(Fault::new(
                    ErrorKind::Peer,
                    format!(
                        "{} signed for {} bytes / {}, we sent {total} / {digest}",
                        ctx.to, receipt.bytes, receipt.digest
                    ),
                )));
            }
            if let Err(e) =
                audit(ctx, "receipt_received", serde_json::Value::Null, Some(signed.clone())).await
            {
                // The destination runs the VM; the record file keeps the receipt.
                tracing::error!(error = %e, "receipt not in the audit log");
            }
            rec.receipt = Some(signed);
            Ok(digest)
        }
        Ok(Some(Ok(PeerMessage::Abort { reason, signed, .. }))) => {
            // The destination promises never to run this VM: resuming is safe.
            let _ =
                audit(ctx, "abort_received", serde_json::json!({ "reason": reason }), signed).await;
            Err(Before(Fault::new(
                ErrorKind::Peer,
                format!("{} aborted at commit: {reason}", ctx.to),
            )))
        }
        Ok(Some(Ok(m))) => Err(Failure::InDoubt(Fault::new(
            ErrorKind::Peer,
            format!("{} answered the commit with {}", ctx.to, m.name()),
        ))),
        Ok(Some(Err(e))) => Err(Failure::InDoubt(Fault::new(ErrorKind::Peer, e))),
        Ok(None) => Err(Failure::InDoubt(Fault::new(
            ErrorKind::Peer,
            format!("lost the connection to {} after commit", ctx.to),
        ))),
        Err(_) => Err(Failure::InDoubt(Fault::new(
            ErrorKind::Peer,
            format!("no receipt from {} within {wait:?}", ctx.to),
        ))),
    }
}

impl Ctx {
    pub(crate) fn stream_body(
        &self,
        binding: Digest32,
        (bytes, digest): crate::streams::StreamSum,
    ) -> StreamBody {
        StreamBody {
            migration_id: self.id,
            source: self.agent.host.clone(),
            destination: self.to.clone(),
            vm: self.vm.clone(),
            channel_binding: binding,
            log_head: self.agent.log_head(),
            bytes,
            digest,
        }
    }

    pub(crate) fn expect<'a>(&'a self, binding: Option<&'a Digest32>) -> Expect<'a> {
        Expect {
            id: &self.id,
            source: &self.agent.host,
            destination: &self.to,
            vm: &self.vm,
            binding,
        }
    }
}

/// Append an audit record about this migration; Err fails the step closed.
pub(crate) async fn audit(
    ctx: &Ctx,
    kind: &str,
    detail: serde_json::Value,
    signed: Option<ferry_audit::Signed>,
) -> Result<u64, Fault> {
    ctx.agent.audit(evidence::event(kind, &ctx.id, &ctx.vm, &ctx.to, detail, signed)).await.map_err(
        |e| {
            Fault::new(
                ErrorKind::Backend,
                format!("{e}; migration refused, the VM stays on {}", ctx.agent.host),
            )
        },
    )
}

/// Tell the destination to abort, signed when possible.
pub(crate) async fn send_abort(
    ctx: &Ctx,
    writer: &mut client::Writer,
    binding: &Digest32,
    reason: String,
) {
    let body = AbortBody {
        migration_id: ctx.id,
        source: ctx.agent.host.clone(),
        destination: ctx.to.clone(),
        vm: ctx.vm.clone(),
        channel_binding: *binding,
        log_head: ctx.agent.log_head(),
        reason: reason.clone(),
    };
    let signed = ctx.agent.sign(evidence::ABORT, &body).ok();
    let _ = audit(ctx, "abort_sent", serde_json::json!({ "reason": reason }), signed.clone()).await;
    let _ =
        writer.write_control(&PeerMessage::Abort { migration_id: ctx.id, reason, signed }).await;
}

/// Step 3, source side: send our quote, verify the destination's. Nothing
/// about the VM has been sent yet, so a refusal here moves no VM byte.
async fn attest(
    ctx: &Ctx,
    rec: &mut MigrationRecord,
    exporter: &[u8; 32],
    reader: &mut Reader,
    writer: &mut client::Writer,
    setup_started: Instant,
) -> Result<(), Fault> {
    let agent = &ctx.agent;
    let started = Instant::now();
    let evidence = agent
        .attestation
        .quote(exporter, &ctx.id, QuoteRole::Source)
        .await
        .map_err(|e| Fault::new(ErrorKind::Backend, e))?;
    let quoted = evidence.is_some();
    writer
        .write_control(&PeerMessage::Attest { migration_id: ctx.id, evidence })
        .await
        .map_err(|e| peer_fault(ctx, e))?;
    let theirs = match reader.read_control::<PeerMessage>().await.map_err(|e| peer_fault(ctx, e))? {
        PeerMessage::Attest { migration_id, evidence } if migration_id == ctx.id => evidence,
        PeerMessage::Refuse { reason, .. } => {
            return Err(Fault::new(
                ErrorKind::Peer,
                format!("{} refused the migration: {reason}", ctx.to),
            ))
        }
        other => {
            return Err(Fault::new(
                ErrorKind::Peer,
                format!("{} answered our quote with {}", ctx.to, other.name()),
            ))
        }
    };
    match agent.attestation.verify_peer(
        &ctx.to,
        theirs.as_ref(),
        exporter,
        &ctx.id,
        QuoteRole::Destination,
        started,
    ) {
        Ok(mut outcome) => {
            outcome.quoted = quoted;
            if !outcome.peer_verified {
                rec.insecure.push(format!(
                    "attestation disabled on {}: {} not verified",
                    agent.host, ctx.to
                ));
            }
            if !quoted {
                rec.insecure.push(format!("{} sent no quote", agent.host));
            }
            rec.attestation = Some(outcome);
            rec.setup_ms = Some(setup_started.elapsed().as_millis() as u64);
            Ok(())
        }
        Err(why) => {
            agent.metrics.attestation_failure();
            let reason = format!("destination {} failed attestation: {why}", ctx.to);
            let _ = audit(
                ctx,
                "attestation_refused",
                serde_json::json!({ "peer": ctx.to, "why": why }),
                None,
            )
            .await;
            let binding = offer_binding(exporter, &ctx.id);
            send_abort(ctx, writer, &binding, reason.clone()).await;
            Err(Fault::new(ErrorKind::Peer, reason))
        }
    }
}

/// Turn QEMU's multifd on (with `streams - 1` channels) or off, before
/// `migrate` / `migrate-incoming`. Both sides must agree: the offer says how many.
pub async fn configure_multifd(q: &mut Qmp, streams: u8) -> Result<(), ferry_vmm::VmmError> {
    q.set_capabilities(&[("multifd", streams > 1)]).await?;
    if streams > 1 {
        q.execute(
            "migrate-set-parameters",
            Some(serde_json::json!({ "multifd-channels": streams - 1 })),
        )
        .await?;
    }
    Ok(())
}

pub(crate) struct AbortOnDrop(pub(crate) JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(crate) async fn watch_peer(
    mut reader: Reader,
    tx: mpsc::Sender<Result<PeerMessage, String>>,
    mut return_path: Option<tokio::net::unix::OwnedWriteHalf>,
    io_timeout: Duration,
) {
    // The destination may stay silent for the whole transfer.
    reader.set_timeout(Duration::from_secs(24 * 3600));
    loop {
        let msg = match reader.read_frame().await {
            Ok(Incoming::Control(bytes)) => serde_json::from_slice::<PeerMessage>(bytes)
                .map_err(|e| format!("malformed control message: {e}")),
            // SECURITY: bytes from the destination reach this QEMU only as
            // its post-copy return path, and only when post-copy was offered.
            Ok(Incoming::Data(d)) => match return_path.as_mut() {
                Some(w) => match tokio::time::timeout(io_timeout, w.write_all(d)).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => Err(format!("source QEMU's return path: {e}")),
                    Err(_) => {
                        Err(format!("source QEMU did not read its return path for {io_timeout:?}"))
                    }
                },
                None => Err("the destination sent VM data without post-copy".to_owned()),
            },
            Ok(Incoming::DataEnd) => Err("the destination sent an end of data".to_owned()),
            Err(e) => Err(crate::chain(&e)),
        };
        let stop = msg.is_err();
        if tx.send(msg).await.is_err() || stop {
            return;
        }
    }
}

async fn progress_ticker(
    qmp: Arc<Mutex<Qmp>>,
    tx: watch::Sender<Progress>,
    bytes: Arc<AtomicU64>,
    started: Instant,
) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let status = qmp.lock().await.query_migrate().await;
        tx.send_modify(|p| {
            p.bytes = bytes.load(Ordering::Relaxed);
            p.elapsed_ms = started.elapsed().as_millis() as u64;
            if let Ok(s) = &status {
                if let Some(ram) = &s.ram {
                    p.ram_total = ram.total;
                    p.ram_remaining = ram.remaining;
                    p.dirty_pages_rate = ram.dirty_pages_rate;
                    p.iterations = ram.dirty_sync_count;
                }
            }
        });
    }
}

async fn wait_qemu_terminal(
    qmp: &Mutex<Qmp>,
    timeout: Duration,
) -> Result<ferry_vmm::MigrationStatus, Fault> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = qmp.lock().await.query_migrate().await.map_err(|e| backend("query-migrate", e))?;
        if s.status.is_terminal() {
            return Ok(s);
        }
        if Instant::now() > deadline {
            return Err(Fault::new(
                ErrorKind::Backend,
                format!("QEMU's migration did not finish within {timeout:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Make the source copy run again: cancel QEMU's migration if it is still
/// going, then `cont` if the VM is paused.
pub(crate) async fn resume_source(qmp: &Mutex<Qmp>) -> Result<(), String> {
    let status = qmp.lock().await.query_migrate().await.map_err(|e| crate::chain(&e))?;
    if !status.status.is_terminal() && status.status != QemuMigration::None {
        let _ = qmp.lock().await.migrate_cancel().await;
        let _ = wait_qemu_terminal(qmp, Duration::from_secs(10)).await;
    }
    let mut q = qmp.lock().await;
    let run = q.status().await.map_err(|e| crate::chain(&e))?;
    if run != RunState::Running {
        q.cont().await.map_err(|e| crate::chain(&e))?;
    }
    Ok(())
}

/// The destination signed for the VM: quit the paused source copy and keep
/// its directory (console log) under `departed/`.
pub(crate) async fn finish_completed(
    agent: &Arc<Agent>,
    rec: &mut MigrationRecord,
    digest: Digest32,
) -> Result<MigrationRecord, Fault> {
    let entry = agent.vms.lock().await.remove(&rec.vm);
    agent.authz.moved(&rec.vm);
    if let Some(entry) = entry {
        let _ = entry.qmp.lock().await.quit().await;
        let _ = crate::vms::kill(&entry.proc).await;
        let departed = agent.cfg.departed_dir();
        let _ = std::fs::create_dir_all(&departed);
        let _ = std::fs::rename(&entry.proc.dir, departed.join(rec.id.to_string()));
    }
    rec.state = MigrationState::Completed;
    rec.digest = Some(digest);
    rec.error = None;
    rec.total_ms = Some(crate::records::now_unix_ms().saturating_sub(rec.created_unix_ms));
    save(agent, rec);
    tracing::info!(bytes = rec.bytes, total_ms = rec.total_ms, "migration completed");
    Ok(rec.clone())
}
