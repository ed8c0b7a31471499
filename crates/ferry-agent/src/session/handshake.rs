//! The source's steps before any VM byte moves: connect and check the
//! destination's name (R2), attest both platforms on this connection (R1),
//! send the signed Offer built from that proof and take the signed Accept.

use std::time::{Duration, Instant};

use ferry_attest::QuoteRole;
use ferry_session::Event;
use ferry_types::Digest32;

use super::link::{self, Link};
use super::outbound::Outbound;
use crate::attestation::PeerAttested;
use crate::audit::Audit;
use crate::error::Error;
use crate::evidence::{self, AcceptBody, OfferBody};
use crate::net::{Reader, Writer};
use crate::protocol::{offer_binding, PeerMessage};

/// How long the destination may take to launch its VM and accept.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);

/// An accepted migration's connection and the Offer's channel binding.
pub struct Accepted {
    pub reader: Reader,
    pub writer: Writer,
    pub binding: Digest32,
}

pub async fn offer(out: &mut Outbound) -> Result<Accepted, Error> {
    let setup = Instant::now();
    out.set_phase("connect");
    let Link { peer, mut reader, mut writer } = link::open(out.agent(), &out.to).await?;
    out.set_phase("attest");
    let attested = attest(out, peer, &mut reader, &mut writer).await?;
    let rec = out.session.record_mut();
    rec.setup_ms = Some(setup.elapsed().as_millis() as u64);
    out.set_phase("offer");
    let binding = send_offer(out, attested, &mut writer).await?;
    reader.set_timeout(ACCEPT_TIMEOUT);
    let answer = reader.read_control::<PeerMessage>().await;
    let host = out.to.clone();
    let answer = answer.map_err(|source| Error::Link { host: host.clone(), source })?;
    match answer {
        PeerMessage::Accept { signed } => {
            let expect = out.expect(Some(&binding));
            out.agent()
                .notary
                .verify_from::<AcceptBody>(&signed, evidence::ACCEPT, &host, &expect)
                .map_err(|source| Error::Evidence { host: host.clone(), kind: "accept", source })?;
            // SECURITY (R6): what was received is logged before it is acted on.
            out.session.audit(Audit::AcceptReceived, Some(signed)).await?;
        }
        PeerMessage::Refuse { reason, .. } => {
            let _ = out.session.audit(Audit::RefusedByPeer { reason: reason.clone() }, None).await;
            return Err(Error::Refused { host, reason });
        }
        // The destination failed after starting to accept (its QEMU, its
        // audit log): same outcome as a refusal, and its signed word is kept.
        PeerMessage::Abort { reason, signed, .. } => {
            let _ =
                out.session.audit(Audit::AbortReceived { reason: reason.clone() }, signed).await;
            return Err(Error::PeerAborted { host, reason });
        }
        other => return Err(Error::Unexpected { host, step: "offer", got: other.name() }),
    }
    reader.set_timeout(out.agent().cfg.migration.io_timeout());
    out.session.apply(Event::Accepted, None).await?;
    Ok(Accepted { reader, writer, binding })
}

/// Send our quote, verify the destination's. Nothing about the VM has been
/// sent yet, so a refusal here moves no VM byte.
async fn attest(
    out: &mut Outbound,
    peer: ferry_identity::PeerAuthenticated,
    reader: &mut Reader,
    writer: &mut Writer,
) -> Result<PeerAttested, Error> {
    let started = Instant::now();
    let (id, host) = (out.id(), out.to.clone());
    let agent = out.agent().clone();
    let ours = agent.attestation.quote(peer.binding(), &id, QuoteRole::Source).await;
    let evidence = ours.map_err(Error::Quote)?;
    let quoted = evidence.is_some();
    let link = |source| Error::Link { host: host.clone(), source };
    writer
        .write_control(&PeerMessage::Attest { migration_id: id, evidence })
        .await
        .map_err(link)?;
    let theirs = match reader.read_control::<PeerMessage>().await.map_err(link)? {
        PeerMessage::Attest { migration_id, evidence } if migration_id == id => evidence,
        PeerMessage::Refuse { reason, .. } => return Err(Error::Refused { host, reason }),
        other => return Err(Error::Unexpected { host, step: "quote", got: other.name() }),
    };
    let binding = offer_binding(peer.binding().as_bytes(), &id);
    let verified =
        agent.attestation.verify_peer(peer, theirs.as_ref(), id, QuoteRole::Destination, started);
    match verified {
        Ok(attested) => {
            let rec = out.session.record_mut();
            if !attested.outcome().peer_verified {
                rec.insecure
                    .push(format!("attestation disabled on {}: {} not verified", agent.host, host));
            }
            if !quoted {
                rec.insecure.push(format!("{} sent no quote", agent.host));
            }
            rec.attestation = Some(attested.outcome().clone());
            Ok(attested)
        }
        Err(why) => {
            agent.metrics.attestation_failure();
            let audit = Audit::AttestationRefused { peer: host.to_string(), why: why.clone() };
            let _ = out.session.audit(audit, None).await;
            let reason = format!("destination {host} failed attestation: {why}");
            out.send_abort(writer, &binding, reason).await;
            Err(Error::Attestation { host, why })
        }
    }
}

/// SECURITY: the Offer is built only from a [`PeerAttested`] for this
/// connection (consumed here: one offer per attestation), so it carries
/// this connection's binding and goes only to the platform just verified.
async fn send_offer(
    out: &Outbound,
    attested: PeerAttested,
    writer: &mut Writer,
) -> Result<Digest32, Error> {
    let agent = out.agent();
    let rec = out.session.record();
    let binding = offer_binding(attested.binding().as_bytes(), &rec.id);
    let offer = OfferBody {
        migration_id: rec.id,
        source: agent.host.clone(),
        destination: attested.host().clone(),
        vm: rec.vm.clone(),
        channel_binding: binding,
        log_head: agent.notary.log_head(),
        spec: out.desc.spec.clone(),
        labels: out.desc.labels.clone(),
        not_after_unix_ms: rec.id.created_unix_ms() + agent.cfg.migration.offer_validity_ms,
        streams: out.plan.streams().get(),
        postcopy: out.plan.postcopy(),
    };
    let signed = agent.notary.sign(evidence::OFFER, &offer)?;
    // SECURITY (R6): logged before it is sent; no record, no offer.
    let audit =
        Audit::OfferSent { operator: out.operator.clone(), attestation: rec.attestation.clone() };
    out.session.audit(audit, Some(signed.clone())).await?;
    let host = out.to.clone();
    writer
        .write_control(&PeerMessage::Offer { signed })
        .await
        .map_err(|source| Error::Link { host, source })?;
    Ok(binding)
}
