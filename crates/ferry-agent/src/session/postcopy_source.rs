//! Post-copy, source side (opt-in per migration, allowed by policy on both
//! hosts). At the switch the destination holds QEMU's switchover package;
//! the source commits to the stream so far, in-line after exactly those
//! bytes, and the destination's signed hand-over makes it the VM's runner
//! while this host's QEMU still serves the pages it lacks. The extra risk:
//! from the hand-over until the last page the VM exists only as both
//! halves together (docs/postcopy.md).

use ferry_channel::StreamSum;
use ferry_session::Event;
use ferry_types::Digest32;
use tokio::sync::mpsc;

use super::outbound::Outbound;
use super::peer_watch::{next_answer, PeerWord};
use super::verdict::Answer;
use crate::audit::{Audit, Phase};
use crate::backend::SwitchState;
use crate::error::Error;
use crate::evidence::{self, StreamBody};
use crate::net::Writer;
use crate::protocol::PeerMessage;

/// How far a post-copy migration got, seen from the source.
#[derive(Default)]
pub struct Switchover {
    /// The switchover Commit was sent, for this many bytes and this digest.
    pub committed: Option<StreamSum>,
    /// The destination signed for the VM and runs it.
    pub handed_over: bool,
}

/// A message from the destination during the transfer that post-copy
/// explains: true when handled (the transfer goes on).
pub async fn during_transfer(
    out: &mut Outbound,
    writer: &mut Writer,
    binding: &Digest32,
    switch: &mut Switchover,
    at: StreamSum,
    word: &Option<PeerWord>,
) -> Result<bool, Error> {
    if !out.plan.postcopy() {
        return Ok(false);
    }
    match word {
        Some(Ok(PeerMessage::PostcopyReady { migration_id }))
            if *migration_id == out.id() && switch.committed.is_none() =>
        {
            if switchover_commit(out, writer, binding, at).await? {
                switch.committed = Some(at);
            }
            Ok(true)
        }
        Some(Ok(PeerMessage::Receipt { signed })) if !switch.handed_over => {
            let Some(at) = switch.committed else { return Ok(false) };
            switchover_receipt(out, signed.clone(), binding, at).await?;
            switch.handed_over = true;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// The destination holds the switchover package. Check that our copy is
/// stopped, then commit to the stream so far. False, committing nothing,
/// if QEMU already sent everything: a plain final Commit follows.
async fn switchover_commit(
    out: &mut Outbound,
    writer: &mut Writer,
    binding: &Digest32,
    at: StreamSum,
) -> Result<bool, Error> {
    let agent = out.agent().clone();
    let pc = agent.backend.postcopy().ok_or(Error::Backend(
        crate::backend::BackendError::Unsupported {
            backend: agent.backend.name(),
            what: "post-copy",
        },
    ))?;
    match pc.switch_state(&out.vm).await? {
        SwitchState::Completed => {
            tracing::info!("post-copy ready, but QEMU already sent everything");
            return Ok(false);
        }
        SwitchState::Switched => {}
        // SECURITY: the destination may run the VM only once it stopped here.
        SwitchState::Not(state) => {
            let why = format!(
                "{} reported post-copy ready, but this host's QEMU has not switched ({state})",
                out.to
            );
            out.send_abort(writer, binding, why.clone()).await;
            return Err(Error::Mismatch(why));
        }
    }
    let signed = agent.notary.sign(evidence::SWITCHOVER, &out.stream_body(*binding, at))?;
    if let Err(e) =
        out.session.audit(Audit::CommitSent(Phase::Switchover), Some(signed.clone())).await
    {
        out.send_abort(writer, binding, "the source cannot write its audit log".into()).await;
        return Err(e);
    }
    agent.sessions.uncancellable(&out.id()).await;
    let rec = out.session.record_mut();
    rec.bytes = at.bytes;
    rec.digest = Some(at.digest);
    // SECURITY: durable before it is sent, as for a pre-copy commit.
    out.session.apply(Event::Committed, None).await?;
    out.set_phase("switchover");
    let host = out.to.clone();
    writer
        .write_control(&PeerMessage::Commit { signed })
        .await
        .map_err(|source| Error::Link { host, source })?;
    Ok(true)
}

/// The destination signed for the VM at the switchover.
async fn switchover_receipt(
    out: &mut Outbound,
    signed: ferry_audit::Signed,
    binding: &Digest32,
    at: StreamSum,
) -> Result<(), Error> {
    let agent = out.agent().clone();
    let host = out.to.clone();
    let body = agent
        .notary
        .verify_from::<StreamBody>(&signed, evidence::HANDOVER, &host, &out.expect(Some(binding)))
        .map_err(|source| Error::Evidence { host: host.clone(), kind: "handover", source })?;
    if (body.bytes, body.digest) != (at.bytes, at.digest) {
        let source = crate::notary::EvidenceError::WrongSum {
            bytes: body.bytes,
            digest: body.digest,
            want_bytes: at.bytes,
            want_digest: at.digest,
        };
        return Err(Error::Evidence { host, kind: "handover", source });
    }
    let audit = Audit::ReceiptReceived { phase: Phase::Switchover, via: None };
    let _ = out.session.audit(audit, Some(signed.clone())).await;
    out.session.record_mut().receipt = Some(signed);
    out.session.apply(Event::HandedOver, None).await?;
    out.set_phase("postcopy");
    tracing::info!(bytes = at.bytes, "destination runs the VM; serving its remaining pages");
    Ok(())
}

/// QEMU finished. If it finished after the switchover Commit but before
/// the hand-over arrived, the hand-over is still due. True once handed over.
pub async fn handed_over(
    out: &mut Outbound,
    binding: &Digest32,
    switch: &mut Switchover,
    peer_rx: &mut mpsc::Receiver<PeerWord>,
) -> Result<bool, Error> {
    let Some(at) = switch.committed else { return Ok(false) };
    if !switch.handed_over {
        let mig = &out.agent().cfg.migration;
        let wait = mig.commit_timeout() + mig.io_timeout();
        match next_answer(peer_rx, wait, false).await {
            Answer::Message(PeerMessage::Receipt { signed }) => {
                switchover_receipt(out, signed, binding, at).await?;
                switch.handed_over = true;
            }
            Answer::Message(PeerMessage::Abort { reason, signed: Some(signed), .. }) => {
                let audit = Audit::AbortReceived { reason: reason.clone() };
                let _ = out.session.audit(audit, Some(signed)).await;
                return Err(Error::PeerAborted { host: out.to.clone(), reason });
            }
            _ => {
                return Err(Error::Silent { host: out.to.clone(), what: "hand-over", after: wait })
            }
        }
    }
    Ok(true)
}

/// After QEMU completed a post-copy the VM is whole on the destination.
/// Commit to the whole stream and collect the final receipt; without it
/// the hand-over stands and the migration completes anyway.
pub async fn final_commit(
    out: &mut Outbound,
    mut writer: Writer,
    mut peer_rx: mpsc::Receiver<PeerWord>,
    binding: Digest32,
    whole: StreamSum,
) -> Result<(), Error> {
    let rec = out.session.record_mut();
    rec.bytes = whole.bytes;
    rec.digest = Some(whole.digest);
    match final_exchange(out, &mut writer, &mut peer_rx, binding, whole).await {
        Ok(signed) => out.session.record_mut().receipt = Some(signed),
        Err(e) => {
            // QEMU completes a post-copy only after the destination loaded
            // every page, so the hand-over settles it.
            let why = crate::report::report(&e);
            tracing::warn!(%why, "no final receipt; the hand-over stands");
            let _ = out.session.audit(Audit::FinalReceiptMissing { why }, None).await;
        }
    }
    out.session.apply(Event::PostcopyDone, None).await?;
    Ok(())
}

async fn final_exchange(
    out: &Outbound,
    writer: &mut Writer,
    peer_rx: &mut mpsc::Receiver<PeerWord>,
    binding: Digest32,
    whole: StreamSum,
) -> Result<ferry_audit::Signed, Error> {
    let agent = out.agent();
    let host = out.to.clone();
    let link = |source| Error::Link { host: host.clone(), source };
    writer.write_data_end().await.map_err(link)?;
    let signed = agent.notary.sign(evidence::COMMIT, &out.stream_body(binding, whole))?;
    out.session.audit(Audit::CommitSent(Phase::Final), Some(signed.clone())).await?;
    writer.write_control(&PeerMessage::Commit { signed }).await.map_err(link)?;
    let wait = agent.cfg.migration.commit_timeout() + agent.cfg.migration.io_timeout();
    let signed = match next_answer(peer_rx, wait, false).await {
        Answer::Message(PeerMessage::Receipt { signed }) => signed,
        Answer::Message(m) => {
            return Err(Error::Unexpected { host, step: "final commit", got: m.name() })
        }
        Answer::Broken(why) => return Err(Error::Lost { host, why }),
        Answer::Closed => return Err(Error::Lost { host, why: "it closed".into() }),
        Answer::Timeout(after) => return Err(Error::Silent { host, what: "final receipt", after }),
    };
    let body = agent
        .notary
        .verify_from::<StreamBody>(&signed, evidence::RECEIPT, &host, &out.expect(Some(&binding)))
        .map_err(|source| Error::Evidence { host: host.clone(), kind: "final receipt", source })?;
    if (body.bytes, body.digest) != (whole.bytes, whole.digest) {
        let source = crate::notary::EvidenceError::WrongSum {
            bytes: body.bytes,
            digest: body.digest,
            want_bytes: whole.bytes,
            want_digest: whole.digest,
        };
        return Err(Error::Evidence { host, kind: "final receipt", source });
    }
    let audit = Audit::ReceiptReceived { phase: Phase::Final, via: None };
    let _ = out.session.audit(audit, Some(signed.clone())).await;
    Ok(signed)
}
