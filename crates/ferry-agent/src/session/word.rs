//! The destination's two signed words around the resume, shared by every
//! way a stream arrives: the source's Commit, read and verified before it is
//! acted on, and this host's Receipt once the VM runs here.

use ferry_channel::StreamSum;
use ferry_session::Event;

use super::inbound::Inbound;
use crate::audit::{Audit, Phase};
use crate::error::Error;
use crate::evidence::{self, StreamBody};
use crate::net::{Reader, Writer};
use crate::protocol::PeerMessage;
use crate::report::report;

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
