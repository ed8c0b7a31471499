//! The destination's two signed words around the resume, shared by every
//! way a stream arrives: the source's Commit, read and verified before it is
//! acted on, and this host's Receipt once the VM runs here.

use ferry_channel::StreamSum;
use ferry_session::Event;

use ferry_audit::Signed;

use super::inbound::Inbound;
use super::machine::Session;
use crate::audit::{Audit, Phase};
use crate::checks::{self, DigestsMatch};
use crate::error::Error;
use crate::evidence::{self, StreamBody};
use crate::net::{Reader, Writer};
use crate::protocol::PeerMessage;
use crate::report::report;

/// The source's Commit, its signature checked; [`pass_gate`] records it.
pub struct CommitRead {
    sum: StreamSum,
    signed: Signed,
}

/// Read the source's Commit and verify its signature and address.
pub async fn read_commit(inbound: &Inbound, reader: &mut Reader) -> Result<CommitRead, Error> {
    let agent = inbound.agent();
    let source = inbound.offer.source.clone();
    let message = reader.read_control::<PeerMessage>().await;
    match message.map_err(|e| Error::Link { host: source.clone(), source: e })? {
        PeerMessage::Commit { signed } => {
            let body = agent
                .notary
                .verify_from::<StreamBody>(&signed, evidence::COMMIT, &source, &inbound.expect())
                .map_err(|e| Error::Evidence { host: source.clone(), kind: "commit", source: e })?;
            Ok(CommitRead { sum: StreamSum { bytes: body.bytes, digest: body.digest }, signed })
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

/// The resume gate's decision on a verified Commit: the proof that lets
/// the VM run here, or why not.
///
/// SECURITY: the proof is returned only once the Commit's and the resume's
/// audit records and the `resuming` state are all durable (fail closed).
/// The audit records (one batched append) and the state record are written
/// at once: they are different files and none depends on another, and the
/// gate holds the loaded VM, paused, for as long as they take.
pub async fn pass_gate(
    inbound: &mut Inbound,
    commit: CommitRead,
    received: StreamSum,
    loaded: Result<(), String>,
) -> Result<DigestsMatch, Error> {
    let committed = Audit::CommitReceived(Phase::Whole);
    let proof = match checks::resume_verdict(commit.sum, received, loaded) {
        Ok(proof) => proof,
        Err(why) => {
            inbound.session.audit(committed, Some(commit.signed)).await?;
            return Err(Error::Mismatch(why));
        }
    };
    // Durable with `resuming`: what a Receipt needs if this agent restarts
    // after the VM runs here and before it signed one (see `receipt_after_restart`).
    let rec = inbound.session.record_mut();
    rec.bytes = received.bytes;
    rec.digest = Some(received.digest);
    rec.channel_binding = Some(inbound.offer.channel_binding);
    let resuming =
        Audit::Resuming { bytes: received.bytes, digest: received.digest, postcopy: false };
    let audits =
        inbound.session.begin_audit(vec![(committed, Some(commit.signed)), (resuming, None)]);
    let applied = inbound.session.apply(Event::DigestsMatched, None).await;
    audits.finish().await.map_err(Error::Audit)?;
    applied?;
    Ok(proof)
}

/// The VM runs here: sign for what arrived and tell the source.
pub async fn send_receipt(
    inbound: &mut Inbound,
    writer: &mut Writer,
    received: StreamSum,
) -> Result<(), Error> {
    let agent = inbound.agent().clone();
    let mut body = inbound.stream_body(received.bytes, received.digest);
    body.qemu_downtime_ms = inbound.session.record().qemu_downtime_ms;
    let receipt = agent.notary.sign(evidence::RECEIPT, &body);
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

/// A restarted destination found the VM it had let through the gate
/// running, and settled the migration completed without having signed its
/// Receipt: sign it now from the record, so the source's query gets a
/// signed answer and its paused copy can be retired.
///
/// SECURITY: the record reached `resuming` only after the source's signed
/// Commit matched every byte that arrived (the gate), and the VM runs here:
/// exactly what a Receipt attests. The binding is the original Offer's;
/// the source checks a queried Receipt's counts against its own Commit.
pub async fn receipt_after_restart(session: &mut Session) -> Result<(), Error> {
    let agent = session.agent.clone();
    let rec = session.record();
    let (Some(channel_binding), Some(digest)) = (rec.channel_binding, rec.digest) else {
        return Err(Error::Mismatch("the record has no gate facts to sign a receipt from".into()));
    };
    let vm = rec.vm.clone();
    let qemu_downtime_ms = agent.backend.arrival_downtime(&vm).await;
    let rec = session.record();
    let body = StreamBody {
        migration_id: rec.id,
        source: rec.source.clone(),
        destination: rec.destination.clone(),
        vm,
        channel_binding,
        log_head: agent.notary.log_head(),
        bytes: rec.bytes,
        digest,
        qemu_downtime_ms,
    };
    let signed = agent.notary.sign(evidence::RECEIPT, &body).map_err(Error::Sign)?;
    let rec = session.record_mut();
    rec.receipt = Some(signed.clone());
    rec.qemu_downtime_ms = rec.qemu_downtime_ms.or(qemu_downtime_ms);
    session.save()?;
    let _ = session.audit(Audit::ReceiptSent(Phase::Whole), Some(signed)).await;
    Ok(())
}
