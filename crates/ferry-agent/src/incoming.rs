//! The destination half of a migration, and answers to in-doubt queries.
//!
//! The one rule: the VM is resumed here only after QEMU reports the incoming
//! migration complete AND the byte count and digest the source committed to
//! equal what arrived. Once this host answers Abort (or reports a migration
//! aborted), it never resumes that VM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_identity::PeerAuthenticated;
use ferry_types::{Digest32, MigrationId};
use ferry_vmm::{LaunchMode, MigrationState as QemuMigration, QemuProcess};

use crate::evidence::{self, AbortBody, AcceptBody, Expect, OfferBody, StreamBody};
use crate::protocol::{offer_binding, DestinationOutcome, PeerMessage};
use crate::records::{now_unix_ms, MigrationRecord, MigrationState, Role};
use crate::server::{Reader, Writer};
use crate::{vms, Agent};
use ferry_attest::QuoteRole;
use ferry_audit::Signed;

/// Allowed clock skew between hosts when checking an offer's window.
const CLOCK_SKEW_MS: u64 = 30_000;

pub async fn handle(
    agent: Arc<Agent>,
    peer: PeerAuthenticated,
    exporter: [u8; 32],
    mut reader: Reader,
    mut writer: Writer,
) {
    let first = match read_first(&mut reader).await {
        Ok(m) => m,
        Err((e, named)) => {
            tracing::info!(peer = %peer.host(), error = %crate::chain(&e), "peer sent no valid message");
            // A peer on another protocol version learns why, if its message
            // named a migration (the id is only echoed, never acted on).
            if let Some(id) = named {
                refuse_first(
                    &mut writer,
                    id,
                    format!("{} could not read the message: {}", agent.host, crate::chain(&e)),
                )
                .await;
            }
            return;
        }
    };
    match first {
        PeerMessage::Attest { migration_id, evidence } => {
            let span = tracing::info_span!("migration", migration_id = %migration_id, peer = %peer.host(), role = "destination");
            tracing::Instrument::instrument(
                attest_then_receive(agent, peer, exporter, migration_id, evidence, reader, writer),
                span,
            )
            .await
        }
        PeerMessage::Offer { .. } => {
            // SECURITY: no offer is considered before both platforms attested.
            agent.metrics.refused("protocol");
            tracing::warn!(peer = %peer.host(), "offer without attestation refused");
            if let Some(id) = first.migration_id() {
                refuse_first(
                    &mut writer,
                    id,
                    "an offer must follow a verified attestation on the same connection".into(),
                )
                .await;
            }
        }
        PeerMessage::StreamJoin { migration_id, index } => {
            // SECURITY: only the migration's own source, authenticated on this
            // connection, may add a stream, and only with a fresh index.
            let slot = agent.joins.lock().ok().and_then(|j| {
                j.get(&migration_id)
                    .filter(|s| &s.source == peer.host() && index >= 1 && index < s.streams)
                    .map(|s| s.tx.clone())
            });
            match slot {
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
        PeerMessage::PostcopyRecover { migration_id } => {
            let span = tracing::info_span!("recovery", %migration_id, peer = %peer.host(), role = "destination");
            tracing::Instrument::instrument(
                crate::recover::serve(agent, peer, exporter, migration_id, reader, writer),
                span,
            )
            .await
        }
        PeerMessage::Query { migration_id } => {
            let (outcome, receipt) = query_outcome(&agent, &peer, &migration_id);
            let _ = writer
                .write_control(&PeerMessage::QueryReply { migration_id, outcome, receipt })
                .await;
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
) -> Result<PeerMessage, (ferry_channel::ChannelError, Option<MigrationId>)> {
    use ferry_channel::{ChannelError, FrameKind, Incoming};
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

/// The `migration_id` a control message that failed to decode names at
/// its top level, if any (serde_json's recursion limit bounds the parse).
fn named_migration(bytes: &[u8]) -> Option<MigrationId> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    v.get("migration_id")?.as_str()?.parse().ok()
}

async fn refuse_first(writer: &mut Writer, migration_id: MigrationId, reason: String) {
    let _ = writer.write_control(&PeerMessage::Refuse { migration_id, reason }).await;
}

/// Step 3, destination side: verify the source's quote first (an
/// unattested source learns nothing but the refusal), then quote back, then
/// take the offer, which must name the attested migration.
async fn attest_then_receive(
    agent: Arc<Agent>,
    peer: PeerAuthenticated,
    exporter: [u8; 32],
    id: MigrationId,
    evidence: Option<ferry_attest::Evidence>,
    mut reader: Reader,
    mut writer: Writer,
) {
    let started = Instant::now();
    let quoting = agent.attestation.enabled();
    let outcome = match agent.attestation.verify_peer(
        peer.host(),
        evidence.as_ref(),
        &exporter,
        &id,
        QuoteRole::Source,
        started,
    ) {
        Ok(mut o) => {
            o.quoted = quoting;
            o
        }
        Err(why) => {
            agent.metrics.attestation_failure();
            return refuse(
                &agent,
                &mut writer,
                id,
                "attestation",
                format!("source {} failed attestation: {why}", peer.host()),
            )
            .await;
        }
    };
    let ours = match agent.attestation.quote(&exporter, &id, QuoteRole::Destination).await {
        Ok(e) => e,
        Err(why) => return refuse(&agent, &mut writer, id, "tpm", why).await,
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
            let body = match signed.verify::<OfferBody>(evidence::OFFER, &agent.ca_trust) {
                Ok((body, signer))
                    if signer == format!("spiffe://{}/host/{}", agent.domain, peer.host()) =>
                {
                    body
                }
                Ok((_, signer)) => {
                    return refuse(
                        &agent,
                        &mut writer,
                        id,
                        "signature",
                        format!("offer signed by {signer}, not by {}", peer.host()),
                    )
                    .await
                }
                Err(e) => {
                    return refuse(
                        &agent,
                        &mut writer,
                        id,
                        "signature",
                        format!("offer signature: {}", crate::chain(&e)),
                    )
                    .await
                }
            };
            if body.migration_id != id {
                let why =
                    format!("offer for {} on a connection attested for {id}", body.migration_id);
                return refuse(&agent, &mut writer, id, "binding", why).await;
            }
            receive(agent, peer, exporter, body, signed, outcome, reader, writer).await
        }
        Ok(PeerMessage::Abort { reason, .. }) => {
            tracing::warn!(%reason, "source aborted after attestation")
        }
        Ok(other) => {
            refuse(
                &agent,
                &mut writer,
                id,
                "protocol",
                format!("expected an offer, got {}", other.name()),
            )
            .await
        }
        Err(e) => tracing::info!(error = %crate::chain(&e), "no offer after attestation"),
    }
}

fn query_outcome(
    agent: &Agent,
    peer: &PeerAuthenticated,
    id: &MigrationId,
) -> (DestinationOutcome, Option<Signed>) {
    match agent.records.get(id) {
        // Only the migration's own source may learn its outcome.
        Ok(Some(r)) if r.role == Role::Destination && &r.source == peer.host() => match r.state {
            MigrationState::Completed => (DestinationOutcome::Completed, r.receipt),
            MigrationState::Aborted => (DestinationOutcome::Aborted, None),
            MigrationState::PostcopyActive => (DestinationOutcome::PostcopyActive, r.receipt),
            _ => (DestinationOutcome::InProgress, None),
        },
        _ => (DestinationOutcome::Unknown, None),
    }
}

/// Why an offer is refused, checked before anything is launched.
fn check_offer(
    agent: &Agent,
    peer: &PeerAuthenticated,
    exporter: &[u8; 32],
    offer: &OfferBody,
) -> Result<(), (&'static str, String)> {
    if offer.destination != agent.host {
        return Err((
            "misaddressed",
            format!("offer is addressed to {}, this is {}", offer.destination, agent.host),
        ));
    }
    if &offer.source != peer.host() {
        return Err((
            "source_mismatch",
            format!(
                "offer claims source {} but the connection is from {}",
                offer.source,
                peer.host()
            ),
        ));
    }
    // SECURITY: the binding ties the offer to this TLS connection; a
    // recorded offer replayed on another connection cannot match.
    if offer.channel_binding != offer_binding(exporter, &offer.migration_id) {
        return Err((
            "binding",
            "offer is not bound to this connection (replayed or relayed)".into(),
        ));
    }
    let now = now_unix_ms();
    let created = offer.migration_id.created_unix_ms();
    if created > now + CLOCK_SKEW_MS {
        return Err(("window", "migration id is from the future".into()));
    }
    let not_after = offer.not_after_unix_ms.min(created + agent.cfg.migration.offer_validity_ms);
    if now > not_after + CLOCK_SKEW_MS {
        return Err(("window", format!("offer expired {} ms ago", now - not_after)));
    }
    offer.spec.validate().map_err(|e| ("spec", format!("invalid VM spec: {e}")))?;
    if offer.spec.name != offer.vm {
        return Err((
            "spec",
            format!("offer is for VM {} but carries the spec of {}", offer.vm, offer.spec.name),
        ));
    }
    if offer.streams == 0 || offer.streams > crate::streams::MAX_STREAMS {
        return Err((
            "streams",
            format!(
                "offer asks for {} streams; 1..={} allowed",
                offer.streams,
                crate::streams::MAX_STREAMS
            ),
        ));
    }
    if offer.postcopy && offer.streams > 1 {
        return Err(("streams", crate::postcopy::WITH_MULTIFD.to_owned()));
    }
    if let Some(problem) = offer.labels.problem() {
        return Err(("labels", format!("VM labels: {problem}")));
    }
    Ok(())
}

async fn refuse(agent: &Agent, writer: &mut Writer, id: MigrationId, code: &str, reason: String) {
    tracing::warn!(%reason, code, "refusing migration");
    agent.metrics.refused(code);
    let _ = writer.write_control(&PeerMessage::Refuse { migration_id: id, reason }).await;
}

/// One incoming migration after a verified, attested offer.
pub(crate) struct Receiving<'a> {
    pub(crate) agent: &'a Agent,
    pub(crate) offer: &'a OfferBody,
    pub(crate) rec: MigrationRecord,
}

impl Receiving<'_> {
    pub(crate) fn expect(&self) -> Expect<'_> {
        let o = self.offer;
        Expect {
            id: &o.migration_id,
            source: &o.source,
            destination: &o.destination,
            vm: &o.vm,
            binding: Some(&o.channel_binding),
        }
    }

    pub(crate) async fn audit(
        &self,
        kind: &str,
        detail: serde_json::Value,
        signed: Option<Signed>,
    ) -> Result<u64, String> {
        let o = self.offer;
        self.agent
            .audit(evidence::event(kind, &o.migration_id, &o.vm, &o.source, detail, signed))
            .await
    }

    pub(crate) fn stream_body(&self, bytes: u64, digest: Digest32) -> StreamBody {
        let o = self.offer;
        StreamBody {
            migration_id: o.migration_id,
            source: o.source.clone(),
            destination: o.destination.clone(),
            vm: o.vm.clone(),
            channel_binding: o.channel_binding,
            log_head: self.agent.log_head(),
            bytes,
            digest,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn receive(
    agent: Arc<Agent>,
    peer: PeerAuthenticated,
    exporter: [u8; 32],
    offer: OfferBody,
    signed_offer: Signed,
    attestation: crate::attestation::AttestationOutcome,
    mut reader: Reader,
    mut writer: Writer,
) {
    let id = offer.migration_id;
    if let Err((code, reason)) = check_offer(&agent, &peer, &exporter, &offer) {
        return refuse(&agent, &mut writer, id, code, reason).await;
    }
    let mut rec = MigrationRecord::new(
        id,
        Role::Destination,
        offer.vm.clone(),
        offer.source.clone(),
        agent.host.clone(),
    );
    if !attestation.peer_verified {
        rec.insecure
            .push(format!("attestation disabled on {}: {} not verified", agent.host, offer.source));
    }
    if !attestation.quoted {
        rec.insecure.push(format!("{} sent no quote", agent.host));
    }
    rec.setup_ms = Some(attestation.ms);
    // What policy may rely on: the source's quote verified here, and ours sent.
    let attested = (attestation.peer_verified, attestation.quoted);
    rec.streams = offer.streams;
    rec.postcopy = offer.postcopy;
    rec.attestation = Some(attestation);
    // SECURITY (R5): the record doubles as the seen-set; create() fails if
    // this id was ever offered before, across restarts.
    match agent.records.create(&mut rec) {
        Ok(true) => {}
        Ok(false) => {
            return refuse(
                &agent,
                &mut writer,
                id,
                "replay",
                format!("migration id {id} was already used (replay)"),
            )
            .await
        }
        Err(e) => {
            return refuse(
                &agent,
                &mut writer,
                id,
                "record",
                format!("cannot record the migration: {}", crate::chain(&e)),
            )
            .await
        }
    }
    let mut m = Receiving { agent: &agent, offer: &offer, rec };
    // SECURITY (R6): what was received is logged before it is acted on.
    if let Err(e) = m
        .audit(
            "offer_received",
            serde_json::json!({ "attestation": m.rec.attestation }),
            Some(signed_offer),
        )
        .await
    {
        abort_record(&agent, &mut m.rec, e.clone());
        return refuse(&agent, &mut writer, id, "audit", format!("{e}; migration refused")).await;
    }
    let started = Instant::now();
    let vm = offer.vm.clone();
    // Reserve the name and launch under the table lock: two offers for one
    // VM name cannot both launch, and admission sees a stable picture.
    // Decide under the table lock (a stable picture of residents and usage),
    // reserve the name, then launch QEMU outside the lock so a slow launch
    // does not hold up other offers' refusals.
    let ticket = {
        let table = agent.vms.lock().await;
        // SECURITY (R3): policy and admission before any VM byte moves; what
        // the source believed about our capacity is checked here, again.
        let residents = agent.authz.residents(&table);
        let used = table
            .values()
            .fold((0u64, 0u32), |(m, c), e| (m + u64::from(e.spec.memory_mib), c + e.spec.vcpus));
        let decision = agent.authz.authorize_incoming(
            &offer.source,
            &agent.host,
            &vm,
            &offer.labels,
            u64::from(offer.spec.memory_mib),
            offer.spec.vcpus,
            residents,
            used,
            offer.postcopy,
            attested,
        );
        let name_taken = table.contains_key(&vm) || !agent.reserve_incoming_name(&vm);
        drop(table);
        match decision {
            Err((code, why)) => {
                if !name_taken {
                    agent.release_incoming_name(&vm);
                }
                let _ = m
                    .audit("refused", serde_json::json!({ "code": code, "reason": why }), None)
                    .await;
                abort_record(&agent, &mut m.rec, why.clone());
                return refuse(&agent, &mut writer, id, code, why).await;
            }
            Ok(_) if name_taken => {
                abort_record(&agent, &mut m.rec, format!("a VM named {vm} already exists here"));
                return refuse(
                    &agent,
                    &mut writer,
                    id,
                    "name_conflict",
                    format!("a VM named {vm} already exists on {}", agent.host),
                )
                .await;
            }
            Ok(t) => t,
        }
    };
    let launched = vms::launch(&agent.qemu, &offer.spec, &offer.labels, LaunchMode::Incoming).await;
    let (proc, qmp, _ticket) = match launched {
        Ok(mut entry) => {
            entry.busy = Some(id);
            let out = (entry.proc.clone(), entry.qmp.clone(), ticket);
            agent.vms.lock().await.insert(vm.clone(), entry);
            agent.release_incoming_name(&vm);
            out
        }
        Err(e) => {
            agent.release_incoming_name(&vm);
            let why = format!("cannot start the destination QEMU: {}", crate::chain(&e));
            abort_record(&agent, &mut m.rec, why.clone());
            return refuse(&agent, &mut writer, id, "launch", why).await;
        }
    };
    let sock = proc.dir.join("incoming.sock");
    // Extra streams join by migration id, from the same source host only.
    let joins = (offer.streams > 1).then(|| {
        let (tx, rx) = tokio::sync::mpsc::channel(crate::streams::MAX_STREAMS as usize);
        if let Ok(mut j) = agent.joins.lock() {
            j.insert(
                id,
                crate::streams::JoinSlot {
                    source: offer.source.clone(),
                    streams: offer.streams,
                    tx,
                },
            );
        }
        (offer.streams, rx)
    });
    let _joins_guard = JoinsGuard(&agent, id);
    let result = async {
        {
            let mut q = qmp.lock().await;
            crate::outgoing::configure_multifd(&mut q, offer.streams)
                .await
                .map_err(|e| crate::chain(&e))?;
            q.set_capabilities(&[("postcopy-ram", offer.postcopy)])
                .await
                .map_err(|e| crate::chain(&e))?;
            q.migrate_incoming(&format!("unix:{}", sock.display()))
                .await
                .map_err(|e| crate::chain(&e))?;
        }
        m.rec.state = MigrationState::Transferring;
        agent.records.save(&mut m.rec).map_err(|e| crate::chain(&e))?;
        let accept = AcceptBody {
            migration_id: id,
            source: offer.source.clone(),
            destination: offer.destination.clone(),
            vm: vm.clone(),
            channel_binding: offer.channel_binding,
            log_head: agent.log_head(),
        };
        let signed = agent.sign(evidence::ACCEPT, &accept)?;
        m.audit("accept_sent", serde_json::Value::Null, Some(signed.clone())).await?;
        writer
            .write_control(&PeerMessage::Accept { signed })
            .await
            .map_err(|e| crate::chain(&e))?;
        tracing::info!("accepted; receiving VM state");
        Ok(())
    }
    .await;
    if let Err(why) = result {
        return abort(&mut m, &proc, &mut writer, why).await;
    }
    let received = if offer.postcopy {
        match crate::postcopy::receive(
            &mut m,
            &proc,
            &qmp,
            &mut reader,
            &mut writer,
            &sock,
            started,
        )
        .await
        {
            Some(sum) => Ok(sum),
            // Settled there: taken over, interrupted or aborted.
            None => return,
        }
    } else {
        receive_streams(&agent, &mut reader, &sock, joins).await
    };
    let (bytes, digest) = match received {
        Ok(v) => v,
        Err(why) => return abort(&mut m, &proc, &mut writer, why).await,
    };
    m.rec.bytes = bytes;
    m.rec.digest = Some(digest);
    // Wait for the source's commit, then for our QEMU to finish loading.
    let commit = match reader.read_control::<PeerMessage>().await {
        Ok(PeerMessage::Commit { signed }) => match agent.verify_from::<StreamBody>(
            &signed,
            evidence::COMMIT,
            &offer.source,
            &m.expect(),
        ) {
            Ok(body) => {
                match m.audit("commit_received", serde_json::Value::Null, Some(signed)).await {
                    Ok(_) => body,
                    Err(e) => return abort(&mut m, &proc, &mut writer, e).await,
                }
            }
            Err(e) => {
                return abort(&mut m, &proc, &mut writer, format!("invalid commit: {e}")).await
            }
        },
        Ok(PeerMessage::Abort { reason, signed, .. }) => {
            let _ =
                m.audit("abort_received", serde_json::json!({ "reason": reason }), signed).await;
            return abort(&mut m, &proc, &mut writer, format!("source aborted: {reason}")).await;
        }
        Ok(other) => {
            return abort(
                &mut m,
                &proc,
                &mut writer,
                format!("expected commit, got {}", other.name()),
            )
            .await
        }
        Err(e) => {
            return abort(&mut m, &proc, &mut writer, format!("no commit: {}", crate::chain(&e)))
                .await
        }
    };
    let loaded = wait_incoming(&qmp, agent.cfg.migration.commit_timeout()).await;
    // SECURITY: all three must agree before the VM may run here.
    let verdict = match loaded {
        Err(why) => Err(format!("destination QEMU did not complete the incoming migration: {why}")),
        Ok(()) if commit.bytes != bytes => Err(format!(
            "byte count mismatch: source sent {} bytes, {} arrived",
            commit.bytes, bytes
        )),
        Ok(()) if commit.digest != digest => Err(format!(
            "digest mismatch: source committed to {}, received stream hashes to {}",
            commit.digest, digest
        )),
        Ok(()) => Ok(()),
    };
    if let Err(why) = verdict {
        return abort(&mut m, &proc, &mut writer, why).await;
    }
    m.rec.state = MigrationState::Resuming;
    if let Err(e) = agent.records.save(&mut m.rec) {
        return abort(
            &mut m,
            &proc,
            &mut writer,
            format!("cannot record the resume: {}", crate::chain(&e)),
        )
        .await;
    }
    // Fail closed: a resume that cannot be audited does not happen.
    if let Err(e) =
        m.audit("resuming", serde_json::json!({ "bytes": bytes, "digest": digest }), None).await
    {
        return abort(&mut m, &proc, &mut writer, e).await;
    }
    if let Err(e) = qmp.lock().await.cont().await {
        return abort(
            &mut m,
            &proc,
            &mut writer,
            format!("destination QEMU refused to resume: {}", crate::chain(&e)),
        )
        .await;
    }
    let receipt = agent.sign(evidence::RECEIPT, &m.stream_body(bytes, digest));
    m.rec.state = MigrationState::Completed;
    m.rec.total_ms = Some(started.elapsed().as_millis() as u64);
    m.rec.receipt = receipt.as_ref().ok().cloned();
    if let Err(e) = agent.records.save(&mut m.rec) {
        tracing::error!(error = %crate::chain(&e), "cannot record completion (recovery will find the VM running)");
    }
    if let Some(entry) = agent.vms.lock().await.get_mut(&vm) {
        entry.busy = None;
    }
    agent.authz.moved(&vm);
    agent.metrics.migration_finished(Role::Destination, "completed", bytes, started.elapsed());
    match receipt {
        Ok(signed) => {
            if let Err(e) =
                m.audit("receipt_sent", serde_json::Value::Null, Some(signed.clone())).await
            {
                tracing::error!(error = %e, "receipt not in the audit log");
            }
            tracing::info!(bytes, "VM resumed here; sending receipt");
            let _ = writer.write_control(&PeerMessage::Receipt { signed }).await;
        }
        // The VM runs here; without a receipt the source stays in doubt
        // and resolves by query, which reports completion.
        Err(e) => tracing::error!(error = %e, "cannot sign the receipt"),
    }
}

/// Removes a migration's join slot however it ends.
struct JoinsGuard<'a>(&'a Agent, MigrationId);

impl Drop for JoinsGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut j) = self.0.joins.lock() {
            j.remove(&self.1);
        }
    }
}

/// Feed the main stream (on this connection) and any joined multifd streams
/// into QEMU's incoming socket, main first; return the combined count and digest.
async fn receive_streams(
    agent: &Agent,
    reader: &mut Reader,
    sock: &std::path::Path,
    joins: Option<(u8, tokio::sync::mpsc::Receiver<(u8, Reader)>)>,
) -> Result<(u64, Digest32), String> {
    let io_timeout = agent.cfg.migration.io_timeout();
    // QEMU 7.2 takes the first connection as the main channel.
    let mut main = connect_retry(sock).await?;
    let mut extra = tokio::task::JoinSet::new();
    let streams = joins.as_ref().map(|j| j.0).unwrap_or(1);
    if let Some((n, mut rx)) = joins {
        let sock = sock.to_owned();
        extra.spawn(async move {
            let mut pumps = tokio::task::JoinSet::new();
            for _ in 1..n {
                let Some((index, mut r)) =
                    tokio::time::timeout(io_timeout, rx.recv()).await.ok().flatten()
                else {
                    return Err(format!("only some of {n} streams joined within {io_timeout:?}"));
                };
                let mut q = connect_retry(&sock).await?;
                pumps.spawn(async move {
                    crate::streams::pump_into_qemu(&mut r, &mut q, io_timeout)
                        .await
                        .map(|s| (index, s))
                });
            }
            let mut sums = Vec::new();
            while let Some(r) = pumps.join_next().await {
                sums.push(r.map_err(|e| format!("stream task: {e}"))??);
            }
            Ok(sums)
        });
    }
    let main_sum = crate::streams::pump_into_qemu(reader, &mut main, io_timeout).await?;
    let mut sums = vec![None; streams as usize];
    sums[0] = Some(main_sum);
    if let Some(r) = extra.join_next().await {
        for (index, sum) in r.map_err(|e| format!("stream task: {e}"))?? {
            sums[index as usize] = Some(sum);
        }
    }
    let sums: Vec<_> = sums
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or("a stream index was missing or repeated")?;
    Ok(crate::streams::combine(&sums))
}

pub(crate) async fn connect_retry(
    sock: &std::path::Path,
) -> Result<tokio::net::UnixStream, String> {
    let mut last = String::new();
    for _ in 0..50 {
        match tokio::net::UnixStream::connect(sock).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("cannot connect to destination QEMU's incoming socket {}: {last}", sock.display()))
}

pub(crate) async fn wait_incoming(
    qmp: &tokio::sync::Mutex<ferry_vmm::Qmp>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = qmp.lock().await.query_migrate().await.map_err(|e| crate::chain(&e))?;
        match s.status {
            QemuMigration::Completed => return Ok(()),
            QemuMigration::Failed | QemuMigration::Cancelled => {
                return Err(s.error_desc.unwrap_or_else(|| String::from(s.status)))
            }
            _ if Instant::now() > deadline => {
                return Err(format!("still {:?} after {timeout:?}", s.status))
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

fn abort_record(agent: &Agent, rec: &mut MigrationRecord, why: String) {
    rec.state = MigrationState::Aborted;
    rec.error = Some(why);
    if let Err(e) = agent.records.save(rec) {
        tracing::error!(error = %crate::chain(&e), "cannot record the abort");
    }
}

/// Kill the incoming QEMU, record the abort, tell the source (signed). From
/// here on this host never runs the VM for this migration.
pub(crate) async fn abort(
    m: &mut Receiving<'_>,
    proc: &QemuProcess,
    writer: &mut Writer,
    why: String,
) {
    let agent = m.agent;
    tracing::warn!(reason = %why, "aborting incoming migration");
    let entry = agent.vms.lock().await.remove(&m.rec.vm);
    if let Err(e) = vms::kill(proc).await {
        tracing::error!(error = %crate::chain(&e), "cannot kill the incoming QEMU");
    }
    drop(entry);
    let _ = std::fs::remove_dir_all(&proc.dir);
    abort_record(agent, &mut m.rec, why.clone());
    let since = Duration::from_millis(now_unix_ms().saturating_sub(m.rec.created_unix_ms));
    agent.metrics.migration_finished(Role::Destination, "aborted", m.rec.bytes, since);
    let o = m.offer;
    let body = AbortBody {
        migration_id: o.migration_id,
        source: o.source.clone(),
        destination: o.destination.clone(),
        vm: o.vm.clone(),
        channel_binding: o.channel_binding,
        log_head: agent.log_head(),
        reason: why.clone(),
    };
    let signed = agent.sign(evidence::ABORT, &body).ok();
    let _ = m.audit("abort_sent", serde_json::json!({ "reason": why }), signed.clone()).await;
    let _ = writer
        .write_control(&PeerMessage::Abort { migration_id: m.rec.id, reason: why, signed })
        .await;
}
