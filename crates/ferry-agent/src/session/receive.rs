//! The destination half after the Accept: feed the streams into the VM,
//! take the source's Commit, and let the VM run only with a
//! [`DigestsMatch`](crate::checks::DigestsMatch). Once this host answers
//! Abort (or reports a migration aborted), it never runs that VM.

use ferry_channel::StreamSum;
use ferry_session::{Event, MigrationState};
use tokio::sync::mpsc;

use super::inbound::Inbound;
use super::postcopy_destination::{self, Relayed};
use super::streams;
use crate::audit::{Audit, Phase};
use crate::backend::ChannelKind;
use crate::checks;
use crate::error::Error;
use crate::evidence::{self, StreamBody};
use crate::net::{Reader, Writer};
use crate::protocol::PeerMessage;
use crate::report::report;

pub async fn run(
    mut inbound: Inbound,
    mut reader: Reader,
    mut writer: Writer,
    joins: Option<mpsc::Receiver<(u8, Reader)>>,
) {
    let Err(e) = receive(&mut inbound, &mut reader, &mut writer, joins).await else { return };
    let why = report(&e);
    match inbound.session.state() {
        MigrationState::Transferring | MigrationState::Resuming => {
            tracing::warn!(reason = %why, "aborting incoming migration");
            inbound.send_abort(&mut writer, &why).await;
            let event = if e.is_peer_abort() { Event::PeerAborted } else { Event::Failed };
            let event = match (event, inbound.session.state()) {
                (Event::PeerAborted, MigrationState::Resuming) => Event::Failed,
                (event, _) => event,
            };
            let _ = inbound.session.apply(event, Some(why)).await;
        }
        state => tracing::error!(reason = %why, ?state, "incoming migration failed"),
    }
}

async fn receive(
    inbound: &mut Inbound,
    reader: &mut Reader,
    writer: &mut Writer,
    joins: Option<mpsc::Receiver<(u8, Reader)>>,
) -> Result<(), Error> {
    if inbound.agent().backend.managed() {
        return super::managed::receive(inbound, reader, writer).await;
    }
    let received = if inbound.plan.postcopy() {
        match postcopy_destination::relay(inbound, reader, writer).await? {
            Relayed::Whole(sum) => sum,
            Relayed::TookOver => return Ok(()),
        }
    } else {
        receive_streams(inbound, reader, joins).await?
    };
    let rec = inbound.session.record_mut();
    rec.bytes = received.bytes;
    rec.digest = Some(received.digest);
    let committed = read_commit(inbound, reader).await?;
    let agent = inbound.agent().clone();
    let vm = inbound.offer.vm.clone();
    let loaded = agent.backend.wait_loaded(&vm, agent.cfg.migration.commit_timeout()).await;
    let proof = checks::resume_verdict(committed, received, loaded.map_err(|e| report(&e)))
        .map_err(Error::Mismatch)?;
    inbound.session.apply(Event::DigestsMatched, None).await?;
    // Fail closed: a resume that cannot be audited does not happen.
    let audit = Audit::Resuming { bytes: received.bytes, digest: received.digest, postcopy: false };
    inbound.session.audit(audit, None).await?;
    agent.backend.open_gate(&vm, proof).await?;
    send_receipt(inbound, writer, received).await
}

/// The VM runs here: sign for what arrived and tell the source.
pub async fn send_receipt(
    inbound: &mut Inbound,
    writer: &mut Writer,
    received: StreamSum,
) -> Result<(), Error> {
    let agent = inbound.agent().clone();
    let receipt =
        agent.notary.sign(evidence::RECEIPT, &inbound.stream_body(received.bytes, received.digest));
    inbound.session.record_mut().receipt = receipt.as_ref().ok().cloned();
    inbound.session.apply(Event::Resumed, None).await?;
    match receipt {
        Ok(signed) => {
            let _ =
                inbound.session.audit(Audit::ReceiptSent(Phase::Whole), Some(signed.clone())).await;
            tracing::info!(bytes = received.bytes, "VM resumed here; sending receipt");
            let _ = writer.write_control(&PeerMessage::Receipt { signed }).await;
        }
        // The VM runs here; without a receipt the source stays in doubt and
        // resolves by query, which reports completion.
        Err(e) => tracing::error!(error = %report(&e), "cannot sign the receipt"),
    }
    Ok(())
}

/// Feed the main stream (on this connection) and any joined multifd
/// streams into QEMU, main first; return the combined count and digest.
async fn receive_streams(
    inbound: &Inbound,
    reader: &mut Reader,
    joins: Option<mpsc::Receiver<(u8, Reader)>>,
) -> Result<StreamSum, Error> {
    let agent = inbound.agent().clone();
    let (vm, n) = (inbound.offer.vm.clone(), inbound.plan.streams().get());
    let io_timeout = agent.cfg.migration.io_timeout();
    // QEMU 7.2 takes the first connection as the main channel.
    let main = agent.backend.connect_incoming(&vm, ChannelKind::Main).await?;
    let source = inbound.offer.source.clone();
    let joined = joins.map(|rx| {
        let (agent, vm, source) = (agent.clone(), vm.clone(), source.clone());
        tokio::spawn(async move { streams::receive_joined(&agent, &vm, &source, n, rx).await })
    });
    let main_sum = streams::pump_into(reader, main, io_timeout, &source).await;
    let joined = match joined {
        Some(task) => task.await.map_err(|e| Error::Mismatch(format!("stream task: {e}")))??,
        None => Vec::new(),
    };
    let sums = streams::in_order(n, main_sum?, joined)?;
    Ok(streams::combine(&sums))
}

/// The source's Commit, verified and recorded before it is acted on.
pub async fn read_commit(inbound: &Inbound, reader: &mut Reader) -> Result<StreamSum, Error> {
    let agent = inbound.agent();
    let source = inbound.offer.source.clone();
    let message = reader.read_control::<PeerMessage>().await;
    match message.map_err(|e| Error::Link { host: source.clone(), source: e })? {
        PeerMessage::Commit { signed } => {
            let body = agent
                .notary
                .verify_from::<StreamBody>(&signed, evidence::COMMIT, &source, &inbound.expect())
                .map_err(|e| Error::Evidence { host: source.clone(), kind: "commit", source: e })?;
            inbound.session.audit(Audit::CommitReceived(Phase::Whole), Some(signed)).await?;
            Ok(StreamSum { bytes: body.bytes, digest: body.digest })
        }
        PeerMessage::Abort { reason, signed, .. } => {
            let _ = inbound
                .session
                .audit(Audit::AbortReceived { reason: reason.clone() }, signed)
                .await;
            Err(Error::PeerAborted { host: source, reason })
        }
        other => Err(Error::Unexpected { host: source, step: "stream", got: other.name() }),
    }
}
