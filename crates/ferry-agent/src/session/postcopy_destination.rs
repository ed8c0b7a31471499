//! Post-copy, destination side: relay the stream both ways (QEMU's return
//! path rides data frames back to the source), take the VM over at the
//! switchover under the source's signed Commit for exactly the bytes before
//! it, and finish once the last page arrived.

use ferry_audit::Signed;
use ferry_channel::{ReceivePump, Received, StreamSum};
use ferry_session::Event;
use tokio::io::AsyncReadExt;
use tokio::net::unix::OwnedReadHalf;
use tokio::sync::{mpsc, oneshot};

use super::inbound::Inbound;
use super::peer_watch::AbortOnDrop;
use crate::audit::{Audit, Phase};
use crate::backend::ChannelKind;
use crate::checks;
use crate::error::Error;
use crate::evidence::{self, StreamBody};
use crate::net::{Reader, Writer};
use crate::protocol::PeerMessage;
use crate::report::report;

/// Return-path bytes read from the destination QEMU at a time: its
/// messages are small.
const RETURN_CHUNK: usize = 64 * 1024;

pub enum Relayed {
    /// No switchover happened (QEMU converged in pre-copy): the whole
    /// stream's sum; the caller finishes as for pre-copy.
    Whole(StreamSum),
    /// The VM was taken over here; the migration is settled (completed, or
    /// interrupted and waiting for recovery).
    TookOver,
}

pub async fn relay(
    inbound: &mut Inbound,
    reader: &mut Reader,
    writer: &mut Writer,
) -> Result<Relayed, Error> {
    let agent = inbound.agent().clone();
    let vm = inbound.offer.vm.clone();
    let io_timeout = agent.cfg.migration.io_timeout();
    let main = agent.backend.connect_incoming(&vm, ChannelKind::Main).await?;
    let (from_qemu, mut to_qemu) = main.into_split();
    let (_back, mut back_rx) = return_path(from_qemu);
    let (ready_tx, mut ready_rx) = oneshot::channel();
    let _ready = AbortOnDrop(tokio::spawn({
        let (agent, vm) = (agent.clone(), vm.clone());
        async move {
            let ready = match agent.backend.postcopy() {
                Some(pc) => pc.wait_switchover(&vm).await.unwrap_or(false),
                None => false,
            };
            if ready {
                let _ = ready_tx.send(());
            }
        }
    }));
    let (commit_tx, mut commit_rx) = mpsc::channel::<(Signed, StreamSum)>(1);
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let offer = inbound.offer.clone();
    let source = offer.source.clone();
    // The stream into QEMU; it owns `commit_tx`, so its end ends the control side.
    let stream_in = &mut *reader;
    let pump = async move {
        let mut pump = ReceivePump::new();
        loop {
            let received = tokio::select! {
                r = pump.run(stream_in, &mut to_qemu, io_timeout) => r.map_err(|e| Error::relay(e, &source))?,
                Ok(()) = &mut stop_rx => return Err(Error::Mismatch("stopped".into())),
            };
            match received {
                Received::End(sum) => return Ok(sum),
                Received::Control(bytes, at) => match serde_json::from_slice::<PeerMessage>(&bytes)
                {
                    Ok(PeerMessage::Commit { signed }) => {
                        if commit_tx.send((signed, at)).await.is_err() {
                            return Err(Error::Mismatch(
                                "a commit after the control side ended".into(),
                            ));
                        }
                    }
                    Ok(PeerMessage::Abort { reason, .. }) => {
                        return Err(Error::PeerAborted { host: source.clone(), reason })
                    }
                    Ok(m) => {
                        let why = format!("unexpected {} during the transfer", m.name());
                        return Err(Error::Mismatch(why));
                    }
                    Err(e) => {
                        return Err(Error::Mismatch(format!("malformed control message: {e}")))
                    }
                },
            }
        }
    };
    let mut resumed = false;
    let session = &mut inbound.session;
    // Our side of the connection: return path, readiness, the take-over.
    let control = async {
        let mut ready_sent = false;
        let mut back_open = true;
        let link = |source| Error::Link { host: offer.source.clone(), source };
        let result = async {
            loop {
                tokio::select! {
                    chunk = back_rx.recv(), if back_open => match chunk {
                        Some(c) => {
                            writer.write_data(&c).await.map_err(link)?;
                            writer.flush().await.map_err(link)?;
                        }
                        None => back_open = false,
                    },
                    _ = &mut ready_rx, if !ready_sent => {
                        ready_sent = true;
                        let ready = PeerMessage::PostcopyReady { migration_id: offer.migration_id };
                        writer.write_control(&ready).await.map_err(link)?;
                    }
                    c = commit_rx.recv() => match c {
                        None => return Ok::<(), Error>(()),
                        Some((signed, at)) if !resumed => {
                            take_over(session, &offer, writer, signed, at).await?;
                            resumed = true;
                        }
                        Some(_) => return Err(Error::Mismatch("a second commit during the stream".into())),
                    },
                }
            }
        }
        .await;
        if result.is_err() {
            let _ = stop_tx.send(());
        }
        result
    };
    let (pumped, controlled) = tokio::join!(pump, control);
    let failure = match (&pumped, &controlled) {
        (Err(e), _) | (Ok(_), Err(e)) => Some(report(e)),
        _ => None,
    };
    match (resumed, failure) {
        (false, Some(_)) => Err(match (pumped, controlled) {
            (_, Err(e)) | (Err(e), _) => e,
            _ => Error::Mismatch("the relay failed".into()),
        }),
        (false, None) => Ok(Relayed::Whole(pumped?)),
        (true, Some(why)) => {
            interrupted(inbound, why).await;
            Ok(Relayed::TookOver)
        }
        (true, None) => {
            finish(inbound, reader, writer, pumped?).await;
            Ok(Relayed::TookOver)
        }
    }
}

/// QEMU's return path, read in a task of its own so that page requests go
/// out while frames come in.
pub fn return_path(mut from_qemu: OwnedReadHalf) -> (AbortOnDrop<()>, mpsc::Receiver<Vec<u8>>) {
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

/// The source's signed word that its copy is stopped, for exactly what
/// arrived before it. Only then does the VM run here.
async fn take_over(
    session: &mut super::machine::Session,
    offer: &crate::evidence::OfferBody,
    writer: &mut Writer,
    signed: Signed,
    at: StreamSum,
) -> Result<(), Error> {
    let agent = session.agent.clone();
    let source = offer.source.clone();
    let expect = crate::evidence::Expect {
        id: &offer.migration_id,
        source: &offer.source,
        destination: &offer.destination,
        vm: &offer.vm,
        binding: Some(&offer.channel_binding),
    };
    let body = agent
        .notary
        .verify_from::<StreamBody>(&signed, evidence::SWITCHOVER, &source, &expect)
        .map_err(|e| Error::Evidence {
            host: source.clone(),
            kind: "switchover commit",
            source: e,
        })?;
    session.audit(Audit::CommitReceived(Phase::Switchover), Some(signed)).await?;
    let committed = StreamSum { bytes: body.bytes, digest: body.digest };
    // QEMU holds the switchover package (it said so before we sent Ready).
    let proof = checks::resume_verdict(committed, at, Ok(())).map_err(Error::Mismatch)?;
    session.apply(Event::DigestsMatched, None).await?;
    let audit = Audit::Resuming { bytes: at.bytes, digest: at.digest, postcopy: true };
    session.audit(audit, None).await?;
    agent.backend.open_gate(&offer.vm, proof).await?;
    let body = StreamBody {
        log_head: agent.notary.log_head(),
        bytes: at.bytes,
        digest: at.digest,
        ..handover_body(offer)
    };
    let receipt = agent.notary.sign(evidence::HANDOVER, &body)?;
    session.record_mut().receipt = Some(receipt.clone());
    session.apply(Event::HandedOver, None).await?;
    let _ = session.audit(Audit::ReceiptSent(Phase::Switchover), Some(receipt.clone())).await;
    tracing::info!(bytes = at.bytes, "VM runs here (post-copy); fetching its remaining pages");
    writer
        .write_control(&PeerMessage::Receipt { signed: receipt })
        .await
        .map_err(|e| Error::Link { host: source, source: e })
}

fn handover_body(offer: &crate::evidence::OfferBody) -> StreamBody {
    StreamBody {
        migration_id: offer.migration_id,
        source: offer.source.clone(),
        destination: offer.destination.clone(),
        vm: offer.vm.clone(),
        channel_binding: offer.channel_binding,
        log_head: ferry_audit::LogHead { seq: 0, hash: String::new() },
        bytes: 0,
        digest: ferry_types::Digest32([0; 32]),
        qemu_downtime_ms: None,
    }
}

/// The link broke after the VM started here. It stays; QEMU waits in
/// postcopy-paused for the pages it lacks, until the source recovers.
async fn interrupted(inbound: &mut Inbound, why: String) {
    tracing::error!(reason = %why, "post-copy interrupted after the hand-over; the VM is kept");
    let note = format!(
        "{why}; post-copy interrupted: the VM runs here but pages are still on {}",
        inbound.offer.source
    );
    if let Err(e) = inbound.session.apply(Event::Failed, Some(note)).await {
        tracing::error!(error = %report(&e), "cannot record the interruption");
    }
}

/// After the whole stream: check the final Commit, then sign for the whole
/// stream. The VM already runs here whatever it says.
async fn finish(inbound: &mut Inbound, reader: &mut Reader, writer: &mut Writer, whole: StreamSum) {
    let agent = inbound.agent().clone();
    let source = inbound.offer.source.clone();
    let commit = match reader.read_control::<PeerMessage>().await {
        Ok(PeerMessage::Commit { signed }) => {
            match agent.notary.verify_from::<StreamBody>(
                &signed,
                evidence::COMMIT,
                &source,
                &inbound.expect(),
            ) {
                Ok(b) if (b.bytes, b.digest) == (whole.bytes, whole.digest) => {
                    let _ = inbound
                        .session
                        .audit(Audit::CommitReceived(Phase::Final), Some(signed))
                        .await;
                    Ok(())
                }
                Ok(b) => Err(format!(
                    "final commit is for {} bytes / {}, {} / {} arrived",
                    b.bytes, b.digest, whole.bytes, whole.digest
                )),
                Err(e) => Err(format!("invalid final commit: {}", report(&e))),
            }
        }
        Ok(other) => Err(format!("expected the final commit, got {}", other.name())),
        Err(e) => Err(format!("no final commit: {}", report(&e))),
    };
    let vm = inbound.offer.vm.clone();
    if let Err(e) = agent.backend.wait_loaded(&vm, agent.cfg.migration.commit_timeout()).await {
        let why = format!("the destination QEMU did not complete the post-copy: {}", report(&e));
        return interrupted(inbound, why).await;
    }
    let rec = inbound.session.record_mut();
    rec.bytes = whole.bytes;
    rec.digest = Some(whole.digest);
    if let Err(why) = &commit {
        // TLS already protected every byte; this is the evidence missing.
        tracing::error!(%why, "post-copy finished without a valid final commit");
    }
    let receipt = match &commit {
        Ok(()) => agent
            .notary
            .sign(evidence::RECEIPT, &inbound.stream_body(whole.bytes, whole.digest))
            .ok(),
        Err(_) => None,
    };
    if let Some(r) = &receipt {
        inbound.session.record_mut().receipt = Some(r.clone());
    }
    if let Err(e) = inbound.session.apply(Event::PostcopyDone, commit.err()).await {
        tracing::error!(error = %report(&e), "cannot record completion");
    }
    if let Some(signed) = receipt {
        let _ = inbound.session.audit(Audit::ReceiptSent(Phase::Final), Some(signed.clone())).await;
        let _ = writer.write_control(&PeerMessage::Receipt { signed }).await;
    }
    tracing::info!(bytes = whole.bytes, "post-copy complete");
}
