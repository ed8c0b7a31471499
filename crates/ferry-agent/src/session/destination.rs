//! The destination half, up to the Accept: what a peer's first message
//! opens, attestation (the source's quote is verified first: an
//! unattested source learns nothing but the refusal), and the Offer's
//! checks, each minting the proof the next step requires.

use std::sync::Arc;
use std::time::Instant;

use ferry_attest::QuoteRole;
use ferry_channel::{ChannelError, FrameKind, Incoming};
use ferry_identity::PeerAuthenticated;
use ferry_session::Event;
use ferry_types::MigrationId;

use super::inbound::Inbound;
use super::machine::Session;
use super::{control, lost, receive, recover, resolve};
use crate::agent::Agent;
use crate::attestation::PeerAttested;
use crate::audit::Audit;
use crate::checks::{self, OfferContext, Refusal};
use crate::evidence::{self, AcceptBody, OfferBody};
use crate::net::{Reader, Writer};
use crate::protocol::PeerMessage;
use crate::records::{now_unix_ms, MigrationRecord, Role};
use crate::report::report;

/// Serve one authenticated peer connection.
pub async fn handle(
    agent: Arc<Agent>,
    peer: PeerAuthenticated,
    mut reader: Reader,
    mut writer: Writer,
) {
    let first = match read_first(&mut reader).await {
        Ok(m) => m,
        Err((e, named)) => {
            tracing::info!(peer = %peer.host(), error = %report(&e), "peer sent no valid message");
            // A peer on another protocol version learns why, if its message
            // named a migration (the id is only echoed, never acted on).
            if let Some(id) = named {
                let why = format!("{} could not read the message: {}", agent.host, report(&e));
                refuse_first(&mut writer, id, why).await;
            }
            return;
        }
    };
    match first {
        PeerMessage::Attest { migration_id, evidence } => {
            let span = tracing::info_span!("migration", %migration_id, peer = %peer.host(), role = "destination");
            let work = attest_then_offer(agent, peer, migration_id, evidence, reader, writer);
            tracing::Instrument::instrument(work, span).await
        }
        PeerMessage::Offer { .. } => {
            // SECURITY: no offer is considered before both platforms attested.
            agent.metrics.refused("protocol");
            tracing::warn!(peer = %peer.host(), "offer without attestation refused");
            if let Some(id) = first.migration_id() {
                let why = "an offer must follow a verified attestation on the same connection";
                refuse_first(&mut writer, id, why.into()).await;
            }
        }
        PeerMessage::StreamJoin { migration_id, index } => {
            match agent.sessions.join_slot(&migration_id, peer.host(), index) {
                Some(tx) => {
                    if tx.send((index, reader)).await.is_err() {
                        tracing::info!(%migration_id, index, "stream joined a finished migration");
                    }
                }
                None => {
                    agent.metrics.refused("stream_join");
                    tracing::warn!(%migration_id, index, peer = %peer.host(), "stream join refused: no such migration waiting for this stream from this host");
                }
            }
        }
        PeerMessage::ControlJoin { migration_id } => {
            control::serve(agent, peer, migration_id, reader, writer).await
        }
        PeerMessage::PostcopyRecover { migration_id } => {
            let span = tracing::info_span!("recovery", %migration_id, peer = %peer.host(), role = "destination");
            let work = recover::serve(agent, peer, migration_id, reader, writer);
            tracing::Instrument::instrument(work, span).await
        }
        PeerMessage::Query { migration_id, vm } => {
            resolve::answer(&agent, &peer, migration_id, vm, &mut writer).await
        }
        PeerMessage::PostcopyLost { migration_id } => {
            lost::serve(&agent, &peer, migration_id, &mut writer).await
        }
        other => {
            tracing::info!(peer = %peer.host(), message = other.name(), "unexpected first message");
            if let Some(id) = other.migration_id() {
                refuse_first(&mut writer, id, format!("{} cannot open a connection", other.name()))
                    .await;
            }
        }
    }
}

/// The first message, or why there is none and the migration it named.
async fn read_first(
    reader: &mut Reader,
) -> Result<PeerMessage, (ChannelError, Option<MigrationId>)> {
    match reader.read_frame().await {
        Ok(Incoming::Control(bytes)) => serde_json::from_slice(bytes)
            .map_err(|e| (ChannelError::Json(e), named_migration(bytes))),
        Ok(Incoming::Data(_)) => {
            Err((ChannelError::UnexpectedFrame { expected: "control", got: FrameKind::Data }, None))
        }
        Ok(Incoming::DataEnd) => Err((
            ChannelError::UnexpectedFrame { expected: "control", got: FrameKind::DataEnd },
            None,
        )),
        Err(e) => Err((e, None)),
    }
}

/// The `migration_id` a control message that failed to decode names at its
/// top level, if any (serde_json's recursion limit bounds the parse).
fn named_migration(bytes: &[u8]) -> Option<MigrationId> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    v.get("migration_id")?.as_str()?.parse().ok()
}

async fn refuse_first(writer: &mut Writer, migration_id: MigrationId, reason: String) {
    let _ = writer.write_control(&PeerMessage::Refuse { migration_id, reason }).await;
}

/// Refuse before anything is recorded: counted and logged (rate-limited by
/// the code set), the peer told why.
async fn refuse(agent: &Agent, writer: &mut Writer, id: MigrationId, r: Refusal) {
    tracing::warn!(reason = %r.reason, code = r.code, "refusing migration");
    agent.metrics.refused(r.code);
    let _ = writer.write_control(&PeerMessage::Refuse { migration_id: id, reason: r.reason }).await;
}

async fn attest_then_offer(
    agent: Arc<Agent>,
    peer: PeerAuthenticated,
    id: MigrationId,
    evidence: Option<ferry_attest::Evidence>,
    mut reader: Reader,
    mut writer: Writer,
) {
    let started = Instant::now();
    let host = peer.host().clone();
    let binding = *peer.binding();
    let attested = match agent.attestation.verify_peer(
        peer,
        evidence.as_ref(),
        id,
        QuoteRole::Source,
        started,
    ) {
        Ok(a) => a,
        Err(why) => {
            agent.metrics.attestation_failure();
            let r = Refusal::new("attestation", format!("source {host} failed attestation: {why}"));
            return refuse(&agent, &mut writer, id, r).await;
        }
    };
    let ours = match agent.attestation.quote(&binding, &id, QuoteRole::Destination).await {
        Ok(e) => e,
        Err(why) => return refuse(&agent, &mut writer, id, Refusal::new("tpm", why)).await,
    };
    if writer
        .write_control(&PeerMessage::Attest { migration_id: id, evidence: ours })
        .await
        .is_err()
    {
        return;
    }
    match reader.read_control::<PeerMessage>().await {
        Ok(PeerMessage::Offer { signed }) => {
            // The signature is checked before any field is trusted; the
            // fields are checked against this connection in `check_offer`.
            let body =
                match agent.notary.verify_signer::<OfferBody>(&signed, evidence::OFFER, &host) {
                    Ok(body) => body,
                    Err(e) => {
                        let r =
                            Refusal::new("signature", format!("offer signature: {}", report(&e)));
                        return refuse(&agent, &mut writer, id, r).await;
                    }
                };
            offered(agent, attested, body, signed, reader, writer).await
        }
        Ok(PeerMessage::Abort { reason, .. }) => {
            tracing::warn!(%reason, "source aborted after attestation")
        }
        Ok(other) => {
            let r = Refusal::new("protocol", format!("expected an offer, got {}", other.name()));
            refuse(&agent, &mut writer, id, r).await
        }
        Err(e) => tracing::info!(error = %report(&e), "no offer after attestation"),
    }
}

/// A signed Offer from an attested source: check it, record it (the record
/// is also the seen-set), decide, launch, accept; then receive.
async fn offered(
    agent: Arc<Agent>,
    attested: PeerAttested,
    body: OfferBody,
    signed: ferry_audit::Signed,
    reader: Reader,
    mut writer: Writer,
) {
    let id = body.migration_id;
    let ctx = OfferContext {
        this_host: &agent.host,
        now_unix_ms: now_unix_ms(),
        offer_validity_ms: agent.cfg.migration.offer_validity_ms,
    };
    let checked = match checks::check_offer(&ctx, &attested, body) {
        Ok(c) => c,
        Err(r) => return refuse(&agent, &mut writer, id, r).await,
    };
    let offer = checked.offer().clone();
    let outcome = attested.outcome().clone();
    let mut rec = MigrationRecord::new(
        id,
        Role::Destination,
        offer.vm.clone(),
        offer.source.clone(),
        agent.host.clone(),
    );
    if !outcome.peer_verified {
        rec.insecure
            .push(format!("attestation disabled on {}: {} not verified", agent.host, offer.source));
    }
    if !outcome.quoted {
        rec.insecure.push(format!("{} sent no quote", agent.host));
    }
    rec.setup_ms = Some(outcome.ms);
    rec.streams = checked.plan().streams().get();
    rec.postcopy = checked.plan().postcopy();
    rec.attestation = Some(outcome.clone());
    // SECURITY (R5): the record doubles as the seen-set; create() fails if
    // this id was ever offered before, across restarts.
    match agent.records.create(&mut rec) {
        Ok(true) => {}
        Ok(false) => {
            let r = Refusal::new("replay", format!("migration id {id} was already used (replay)"));
            return refuse(&agent, &mut writer, id, r).await;
        }
        Err(e) => {
            let r = Refusal::new("record", format!("cannot record the migration: {}", report(&e)));
            return refuse(&agent, &mut writer, id, r).await;
        }
    }
    let mut inbound = Inbound {
        session: Session::new(agent.clone(), rec),
        offer,
        plan: checked.plan(),
        started: Instant::now(),
    };
    // SECURITY (R6): what was received is logged before it is acted on.
    let audit = Audit::OfferReceived { attestation: Some(outcome.clone()) };
    if let Err(e) = inbound.session.audit(audit, Some(signed)).await {
        let r = Refusal::new("audit", format!("{}; migration refused", report(&e)));
        return refuse_recorded(&mut inbound, &mut writer, r).await;
    }
    let attested_both = (outcome.peer_verified, outcome.quoted);
    let admitted = {
        // One decision at a time: admission sees a stable picture of what
        // runs here and what is reserved.
        let _decide = agent.admission_lock.lock().await;
        let residents = agent.backend.residents().await;
        let decision =
            agent.authz.authorize_incoming(&inbound.offer, residents, inbound.plan, attested_both);
        let name_free =
            decision.is_ok() && agent.backend.reserve_incoming(&inbound.offer.vm, id).await;
        checks::admit(checked, decision, name_free, &agent.host)
    };
    let admitted = match admitted {
        Ok(a) => a,
        Err(r) => return refuse_recorded(&mut inbound, &mut writer, r).await,
    };
    if let Err(e) = agent.backend.launch_incoming(&admitted).await {
        let r =
            Refusal::new("launch", format!("cannot start the destination QEMU: {}", report(&e)));
        return refuse_recorded(&mut inbound, &mut writer, r).await;
    }
    if agent.backend.managed() {
        agent.sessions.open_control(id, inbound.offer.source.clone(), inbound.offer.vm.clone());
    }
    let streams = inbound.plan.streams().get();
    let joins = (streams > 1).then(|| {
        let (tx, rx) = tokio::sync::mpsc::channel(crate::plan::MAX_STREAMS as usize);
        let slot = crate::inflight::JoinSlot { source: inbound.offer.source.clone(), streams, tx };
        agent.sessions.open_joins(id, slot);
        rx
    });
    let accepted = accept(&mut inbound, &mut writer).await;
    if let Err(e) = accepted {
        agent.sessions.close_joins(&id);
        agent.sessions.close_control(&id);
        let why = report(&e);
        inbound.send_abort(&mut writer, &why).await;
        let _ = inbound.session.apply(Event::Failed, Some(why)).await;
        return;
    }
    tracing::info!("accepted; receiving VM state");
    receive::run(inbound, reader, writer, joins).await;
    agent.sessions.close_joins(&id);
    agent.sessions.close_control(&id);
}

/// A refusal after the offer was recorded: the record and the audit log say
/// so (the table discards anything launched), and the source is told.
async fn refuse_recorded(inbound: &mut Inbound, writer: &mut Writer, r: Refusal) {
    let agent = inbound.agent().clone();
    let id = inbound.offer.migration_id;
    let _ = inbound.session.apply(Event::Failed, Some(format!("{}: {}", r.code, r.reason))).await;
    refuse(&agent, writer, id, r).await;
}

async fn accept(inbound: &mut Inbound, writer: &mut Writer) -> Result<(), crate::error::Error> {
    let agent = inbound.agent().clone();
    let o = &inbound.offer;
    let body = AcceptBody {
        migration_id: o.migration_id,
        source: o.source.clone(),
        destination: o.destination.clone(),
        vm: o.vm.clone(),
        channel_binding: o.channel_binding,
        log_head: agent.notary.log_head(),
    };
    let signed = agent.notary.sign(evidence::ACCEPT, &body)?;
    inbound.session.audit(Audit::AcceptSent, Some(signed.clone())).await?;
    inbound.session.apply(Event::Accepted, None).await?;
    let host = o.source.clone();
    writer
        .write_control(&PeerMessage::Accept { signed })
        .await
        .map_err(|source| crate::error::Error::Link { host, source })
}
