//! The destination half of a migration, and answers to in-doubt queries.
//!
//! The one rule: the VM is resumed here only after QEMU reports the incoming
//! migration complete AND the byte count and digest the source committed to
//! equal what arrived. Once this host answers Abort (or reports a migration
//! aborted), it never resumes that VM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_channel::Incoming;
use ferry_identity::PeerAuthenticated;
use ferry_types::{Digest32, MigrationId};
use ferry_vmm::{LaunchMode, MigrationState as QemuMigration, QemuProcess};
use tokio::io::AsyncWriteExt;

use crate::protocol::{offer_binding, DestinationOutcome, Offer, PeerMessage};
use ferry_attest::QuoteRole;
use crate::records::{now_unix_ms, MigrationRecord, MigrationState, Role};
use crate::server::{Reader, Writer};
use crate::{vms, Agent};

/// Allowed clock skew between hosts when checking an offer's window.
const CLOCK_SKEW_MS: u64 = 30_000;

pub async fn handle(agent: Arc<Agent>, peer: PeerAuthenticated, exporter: [u8; 32], mut reader: Reader, mut writer: Writer) {
    let first = match reader.read_control::<PeerMessage>().await {
        Ok(m) => m,
        Err(e) => {
            tracing::info!(peer = %peer.host(), error = %crate::chain(&e), "peer sent no valid message");
            return;
        }
    };
    match first {
        PeerMessage::Attest { migration_id, evidence } => {
            let span = tracing::info_span!("migration", migration_id = %migration_id, peer = %peer.host(), role = "destination");
            tracing::Instrument::instrument(attest_then_receive(agent, peer, exporter, migration_id, evidence, reader, writer), span).await
        }
        PeerMessage::Offer(offer) => {
            // SECURITY: no offer is considered before both platforms attested.
            let why = "an offer must follow mutual attestation".to_owned();
            refuse(&agent, &mut writer, offer.migration_id, "protocol", why).await
        }
        PeerMessage::Query { migration_id } => {
            let outcome = query_outcome(&agent, &peer, &migration_id);
            let _ = writer.write_control(&PeerMessage::QueryReply { migration_id, outcome }).await;
        }
        other => tracing::info!(peer = %peer.host(), message = other.name(), "unexpected first message"),
    }
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
    let outcome = match agent.attestation.verify_peer(peer.host(), evidence.as_ref(), &exporter, &id, QuoteRole::Source, started, quoting) {
        Ok(o) => o,
        Err(why) => {
            agent.metrics.attestation_failure();
            return refuse(&agent, &mut writer, id, "attestation", format!("source {} failed attestation: {why}", peer.host())).await;
        }
    };
    let ours = match agent.attestation.quote(&exporter, &id, QuoteRole::Destination).await {
        Ok(e) => e,
        Err(why) => return refuse(&agent, &mut writer, id, "tpm", why).await,
    };
    if writer.write_control(&PeerMessage::Attest { migration_id: id, evidence: ours }).await.is_err() {
        return;
    }
    match reader.read_control::<PeerMessage>().await {
        Ok(PeerMessage::Offer(offer)) if offer.migration_id == id => receive(agent, peer, exporter, offer, outcome, reader, writer).await,
        Ok(PeerMessage::Offer(offer)) => {
            let why = format!("offer for {} on a connection attested for {id}", offer.migration_id);
            refuse(&agent, &mut writer, id, "binding", why).await
        }
        Ok(PeerMessage::Abort { reason, .. }) => tracing::warn!(%reason, "source aborted after attestation"),
        Ok(other) => refuse(&agent, &mut writer, id, "protocol", format!("expected an offer, got {}", other.name())).await,
        Err(e) => tracing::info!(error = %crate::chain(&e), "no offer after attestation"),
    }
}

fn query_outcome(agent: &Agent, peer: &PeerAuthenticated, id: &MigrationId) -> DestinationOutcome {
    match agent.records.get(id) {
        // Only the migration's own source may learn its outcome.
        Ok(Some(r)) if r.role == Role::Destination && &r.source == peer.host() => match r.state {
            MigrationState::Completed => DestinationOutcome::Completed,
            MigrationState::Aborted => DestinationOutcome::Aborted,
            _ => DestinationOutcome::InProgress,
        },
        _ => DestinationOutcome::Unknown,
    }
}

/// Why an offer is refused, checked before anything is launched.
fn check_offer(agent: &Agent, peer: &PeerAuthenticated, exporter: &[u8; 32], offer: &Offer) -> Result<(), (&'static str, String)> {
    if offer.destination != agent.host {
        return Err(("misaddressed", format!("offer is addressed to {}, this is {}", offer.destination, agent.host)));
    }
    if &offer.source != peer.host() {
        return Err(("source_mismatch", format!("offer claims source {} but the connection is from {}", offer.source, peer.host())));
    }
    // SECURITY: the binding ties the offer to this TLS connection; a
    // recorded offer replayed on another connection cannot match.
    if offer.channel_binding != offer_binding(exporter, &offer.migration_id) {
        return Err(("binding", "offer is not bound to this connection (replayed or relayed)".into()));
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
    offer.vm.validate().map_err(|e| ("spec", format!("invalid VM spec: {e}")))?;
    Ok(())
}

async fn refuse(agent: &Agent, writer: &mut Writer, id: MigrationId, code: &str, reason: String) {
    tracing::warn!(%reason, code, "refusing migration");
    agent.metrics.refused(code);
    let _ = writer.write_control(&PeerMessage::Refuse { migration_id: id, reason }).await;
}

async fn receive(
    agent: Arc<Agent>,
    peer: PeerAuthenticated,
    exporter: [u8; 32],
    offer: Offer,
    attestation: crate::attestation::AttestationOutcome,
    mut reader: Reader,
    mut writer: Writer,
) {
    let id = offer.migration_id;
    if let Err((code, reason)) = check_offer(&agent, &peer, &exporter, &offer) {
        return refuse(&agent, &mut writer, id, code, reason).await;
    }
    let mut rec = MigrationRecord::new(id, Role::Destination, offer.vm.name.clone(), offer.source.clone(), agent.host.clone());
    if !attestation.peer_verified {
        rec.insecure.push(format!("attestation disabled on {}: {} not verified", agent.host, offer.source));
    }
    if !attestation.quoted {
        rec.insecure.push(format!("{} sent no quote", agent.host));
    }
    rec.setup_ms = Some(attestation.ms);
    rec.attestation = Some(attestation);
    // SECURITY: the record doubles as the seen-set; create() fails if this
    // id was ever offered before, across restarts.
    match agent.records.create(&mut rec) {
        Ok(true) => {}
        Ok(false) => return refuse(&agent, &mut writer, id, "replay", format!("migration id {id} was already used (replay)")).await,
        Err(e) => return refuse(&agent, &mut writer, id, "record", format!("cannot record the migration: {}", crate::chain(&e))).await,
    }
    let started = Instant::now();
    let vm = offer.vm.name.clone();
    // Reserve the name and launch under the table lock: two offers for one
    // VM name cannot both launch.
    let (proc, qmp) = {
        let mut table = agent.vms.lock().await;
        if table.contains_key(&vm) {
            drop(table);
            abort_record(&agent, &mut rec, format!("a VM named {vm} already exists here"));
            return refuse(&agent, &mut writer, id, "name_conflict", format!("a VM named {vm} already exists on {}", agent.host)).await;
        }
        match vms::launch(&agent.qemu, &offer.vm, LaunchMode::Incoming).await {
            Ok(mut entry) => {
                entry.busy = Some(id);
                let out = (entry.proc.clone(), entry.qmp.clone());
                table.insert(vm.clone(), entry);
                out
            }
            Err(e) => {
                drop(table);
                let why = format!("cannot start the destination QEMU: {}", crate::chain(&e));
                abort_record(&agent, &mut rec, why.clone());
                return refuse(&agent, &mut writer, id, "launch", why).await;
            }
        }
    };
    let sock = proc.dir.join("incoming.sock");
    let result = async {
        qmp.lock().await.migrate_incoming(&format!("unix:{}", sock.display())).await.map_err(|e| crate::chain(&e))?;
        rec.state = MigrationState::Transferring;
        agent.records.save(&mut rec).map_err(|e| crate::chain(&e))?;
        writer.write_control(&PeerMessage::Accept { migration_id: id }).await.map_err(|e| crate::chain(&e))?;
        tracing::info!("accepted; receiving VM state");
        receive_stream(&agent, &mut reader, &sock).await
    }
    .await;
    let (bytes, digest) = match result {
        Ok(v) => v,
        Err(why) => return abort(&agent, &mut rec, &proc, &mut writer, why).await,
    };
    rec.bytes = bytes;
    rec.digest = Some(digest);
    // Wait for the source's commit, then for our QEMU to finish loading.
    let commit = match reader.read_control::<PeerMessage>().await {
        Ok(PeerMessage::Commit { migration_id, bytes, digest }) if migration_id == id => (bytes, digest),
        Ok(PeerMessage::Abort { reason, .. }) => return abort(&agent, &mut rec, &proc, &mut writer, format!("source aborted: {reason}")).await,
        Ok(other) => return abort(&agent, &mut rec, &proc, &mut writer, format!("expected commit, got {}", other.name())).await,
        Err(e) => return abort(&agent, &mut rec, &proc, &mut writer, format!("no commit: {}", crate::chain(&e))).await,
    };
    let loaded = wait_incoming(&qmp, agent.cfg.migration.commit_timeout()).await;
    // SECURITY: all three must agree before the VM may run here.
    let verdict = match loaded {
        Err(why) => Err(format!("destination QEMU did not complete the incoming migration: {why}")),
        Ok(()) if commit.0 != bytes => Err(format!("byte count mismatch: source sent {} bytes, {} arrived", commit.0, bytes)),
        Ok(()) if commit.1 != digest => Err(format!("digest mismatch: source committed to {}, received stream hashes to {}", commit.1, digest)),
        Ok(()) => Ok(()),
    };
    if let Err(why) = verdict {
        return abort(&agent, &mut rec, &proc, &mut writer, why).await;
    }
    rec.state = MigrationState::Resuming;
    if let Err(e) = agent.records.save(&mut rec) {
        return abort(&agent, &mut rec, &proc, &mut writer, format!("cannot record the resume: {}", crate::chain(&e))).await;
    }
    if let Err(e) = qmp.lock().await.cont().await {
        return abort(&agent, &mut rec, &proc, &mut writer, format!("destination QEMU refused to resume: {}", crate::chain(&e))).await;
    }
    rec.state = MigrationState::Completed;
    rec.total_ms = Some(started.elapsed().as_millis() as u64);
    if let Err(e) = agent.records.save(&mut rec) {
        tracing::error!(error = %crate::chain(&e), "cannot record completion (recovery will find the VM running)");
    }
    if let Some(entry) = agent.vms.lock().await.get_mut(&vm) {
        entry.busy = None;
    }
    tracing::info!(bytes, "VM resumed here; sending receipt");
    agent.metrics.migration_finished(Role::Destination, "completed", bytes, started.elapsed());
    let _ = writer.write_control(&PeerMessage::Receipt { migration_id: id, bytes, digest }).await;
}

/// Feed the data frames to QEMU's incoming socket, hashing them.
async fn receive_stream(agent: &Agent, reader: &mut Reader, sock: &std::path::Path) -> Result<(u64, Digest32), String> {
    let mut qemu = connect_retry(sock).await?;
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    let io_timeout = agent.cfg.migration.io_timeout();
    loop {
        match reader.read_frame().await.map_err(|e| crate::chain(&e))? {
            Incoming::Data(d) => {
                hasher.update(d);
                total += d.len() as u64;
                match tokio::time::timeout(io_timeout, qemu.write_all(d)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(format!("destination QEMU stopped reading its stream: {e}")),
                    Err(_) => return Err(format!("destination QEMU stalled for {io_timeout:?}")),
                }
            }
            Incoming::DataEnd => break,
            Incoming::Control(bytes) => {
                let why = match serde_json::from_slice::<PeerMessage>(bytes) {
                    Ok(PeerMessage::Abort { reason, .. }) => format!("source aborted: {reason}"),
                    Ok(m) => format!("unexpected {} during the transfer", m.name()),
                    Err(e) => format!("malformed control message during the transfer: {e}"),
                };
                return Err(why);
            }
        }
    }
    let _ = qemu.shutdown().await;
    Ok((total, Digest32(*hasher.finalize().as_bytes())))
}

async fn connect_retry(sock: &std::path::Path) -> Result<tokio::net::UnixStream, String> {
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

async fn wait_incoming(qmp: &tokio::sync::Mutex<ferry_vmm::Qmp>, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = qmp.lock().await.query_migrate().await.map_err(|e| crate::chain(&e))?;
        match s.status {
            QemuMigration::Completed => return Ok(()),
            QemuMigration::Failed | QemuMigration::Cancelled => {
                return Err(s.error_desc.unwrap_or_else(|| String::from(s.status)))
            }
            _ if Instant::now() > deadline => return Err(format!("still {:?} after {timeout:?}", s.status)),
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

/// Kill the incoming QEMU, record the abort, tell the source. From here on
/// this host never runs the VM for this migration.
async fn abort(agent: &Agent, rec: &mut MigrationRecord, proc: &QemuProcess, writer: &mut Writer, why: String) {
    tracing::warn!(reason = %why, "aborting incoming migration");
    let entry = agent.vms.lock().await.remove(&rec.vm);
    if let Err(e) = vms::kill(proc).await {
        tracing::error!(error = %crate::chain(&e), "cannot kill the incoming QEMU");
    }
    drop(entry);
    let _ = std::fs::remove_dir_all(&proc.dir);
    abort_record(agent, rec, why.clone());
    let since = Duration::from_millis(now_unix_ms().saturating_sub(rec.created_unix_ms));
    agent.metrics.migration_finished(Role::Destination, "aborted", rec.bytes, since);
    let _ = writer.write_control(&PeerMessage::Abort { migration_id: rec.id, reason: why }).await;
}
