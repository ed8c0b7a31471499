//! Settling a migration in doubt: the source asks its destination, on a new
//! connection with the same identity checks, what became of it, and moves
//! its paused copy only on the destination's signed word (see
//! [`verdict::after_query`]). The source agent does this by itself, at once
//! and then with backoff (the supervisor); `ferry migrations resolve` is
//! one attempt on demand.

use std::sync::Arc;

use ferry_audit::Signed;
use ferry_channel::StreamSum;
use ferry_identity::PeerAuthenticated;
use ferry_session::{DestinationOutcome, Event, MigrationState};
use ferry_types::{Digest32, MigrationId, VmName};
use tokio::sync::watch;

use super::link;
use super::machine::Session;
use super::verdict::{self, ReplyChecks};
use crate::agent::Agent;
use crate::audit::{Audit, Phase};
use crate::error::Error;
use crate::evidence::{self, AbortBody, Expect, StreamBody};
use crate::net::Writer;
use crate::protocol::{offer_binding, PeerMessage, Progress};
use crate::records::{MigrationRecord, Role};
use crate::report::report;

/// Source: ask the destination once. Ok with the record as it stands
/// after (settled, or still in doubt if the destination is still deciding).
pub async fn attempt(agent: &Arc<Agent>, id: MigrationId) -> Result<MigrationRecord, Error> {
    let rec = agent
        .records
        .get(&id)?
        .ok_or_else(|| Error::NoSuchMigration { id, host: agent.host.clone() })?;
    if rec.role != Role::Source || rec.state() != MigrationState::InDoubt {
        let hint = "only a migration in doubt is resolved, on its source";
        return Err(Error::WrongState { id, state: rec.state(), hint });
    }
    let (_progress, watcher) =
        watch::channel(Progress { id: Some(id), phase: "resolve".into(), ..Default::default() });
    if !agent.sessions.watch(id, watcher).await {
        return Err(Error::Busy(id));
    }
    let mut session = Session::new(agent.clone(), rec);
    let result = ask(&mut session).await;
    agent.sessions.end(&id).await;
    match result {
        Ok(()) => Ok(session.into_record()),
        Err(e) => Err(Error::Unsettled {
            id,
            state: MigrationState::InDoubt,
            note: format!("{}; the VM stays paused and this agent keeps asking", report(&e)),
        }),
    }
}

async fn ask(session: &mut Session) -> Result<(), Error> {
    let agent = session.agent.clone();
    let rec = session.record().clone();
    let to = rec.destination.clone();
    let link::Link { peer, mut reader, mut writer } = link::open(&agent, &to).await?;
    let query_binding = offer_binding(peer.binding().as_bytes(), &rec.id);
    let link_err = |source| Error::Link { host: to.clone(), source };
    let query = PeerMessage::Query { migration_id: rec.id, vm: rec.vm.clone() };
    writer.write_control(&query).await.map_err(link_err)?;
    let (outcome, signed) = match reader.read_control::<PeerMessage>().await.map_err(link_err)? {
        PeerMessage::QueryReply { migration_id, outcome, signed } if migration_id == rec.id => {
            (outcome, signed)
        }
        other => return Err(Error::Unexpected { host: to, step: "query", got: other.name() }),
    };
    tracing::info!(migration_id = %rec.id, outcome = outcome.name(), "the destination answered");
    let committed = StreamSum { bytes: rec.bytes, digest: rec.digest.unwrap_or(Digest32([0; 32])) };
    let any_connection =
        Expect { id: &rec.id, source: &agent.host, destination: &to, vm: &rec.vm, binding: None };
    let this_query = Expect { binding: Some(&query_binding), ..any_connection };
    let notary = &agent.notary;
    // What a verified Receipt says of the downtime (libvirt's source has none).
    let downtime = std::cell::Cell::new(None);
    let checks = ReplyChecks {
        receipt: |s: &Signed| {
            let body = notary.verify_from::<StreamBody>(s, evidence::RECEIPT, &to, &any_connection);
            downtime.set(body.as_ref().ok().and_then(|b| b.qemu_downtime_ms));
            body
        },
        handover: |s: &Signed| {
            notary.verify_from::<StreamBody>(s, evidence::HANDOVER, &to, &any_connection)
        },
        abort: |s: &Signed| notary.verify_from::<AbortBody>(s, evidence::ABORT, &to, &this_query),
    };
    let (event, signed) = verdict::after_query(&to, outcome, signed, committed, checks)?;
    match (outcome, signed) {
        (DestinationOutcome::Completed, Some(s)) => {
            let audit = Audit::ReceiptReceived { phase: Phase::Whole, via: Some("resolve") };
            let _ = session.audit(audit, Some(s.clone())).await;
            let rec = session.record_mut();
            rec.receipt = Some(s);
            if rec.qemu_downtime_ms.is_none() {
                rec.qemu_downtime_ms = downtime.get();
            }
        }
        (DestinationOutcome::PostcopyActive, Some(s)) => {
            let audit = Audit::ReceiptReceived { phase: Phase::Switchover, via: Some("resolve") };
            let _ = session.audit(audit, Some(s.clone())).await;
            session.record_mut().receipt = Some(s);
        }
        (DestinationOutcome::Aborted | DestinationOutcome::Unknown, Some(s)) => {
            let audit = Audit::AbortReceived { reason: format!("resolve: {}", outcome.name()) };
            let _ = session.audit(audit, Some(s)).await;
        }
        _ => {}
    }
    let note = match outcome {
        DestinationOutcome::InProgress => None,
        DestinationOutcome::Completed => None,
        o => Some(format!("{to} reports the migration {}", o.name())),
    };
    session.apply(event, note).await?;
    Ok(())
}

/// One attempt of the supervisor's loop: audited and counted. True when
/// the migration left doubt (or no longer needs this loop).
pub async fn attempt_logged(agent: &Arc<Agent>, id: MigrationId, n: u64) -> bool {
    let result = attempt(agent, id).await;
    let outcome = match &result {
        Ok(rec) => rec.state().name().to_owned(),
        Err(Error::Busy(_)) => return false,
        Err(e) => report(e),
    };
    let settled = matches!(&result, Ok(rec) if rec.state() != MigrationState::InDoubt)
        || matches!(&result, Err(Error::WrongState { .. } | Error::NoSuchMigration { .. }));
    agent.metrics.resolve_attempt(settled);
    if let Ok(Some(rec)) = agent.records.get(&id) {
        let session = Session::new(agent.clone(), rec);
        let _ = session
            .audit(Audit::ResolveAttempt { attempt: n, result: outcome.clone() }, None)
            .await;
    }
    tracing::info!(attempt = n, result = %outcome, "resolving an in-doubt migration");
    settled
}

/// Destination: what became of migration `id`, in a signed word only the
/// migration's own source may read.
pub async fn answer(
    agent: &Arc<Agent>,
    peer: &PeerAuthenticated,
    id: MigrationId,
    vm: VmName,
    writer: &mut Writer,
) {
    let rec = match agent.records.get(&id) {
        Ok(Some(r)) if r.role == Role::Destination && &r.source == peer.host() => Some(r),
        Ok(Some(_)) => None,
        Ok(None) => tombstone(agent, peer, id, vm),
        Err(e) => {
            tracing::error!(error = %report(&e), "cannot read the record for a query");
            return;
        }
    };
    let (outcome, signed) = match rec.as_ref().map(|r| (r.state(), r)) {
        Some((MigrationState::Completed, r)) => (DestinationOutcome::Completed, r.receipt.clone()),
        Some((MigrationState::PostcopyActive | MigrationState::PostcopyLost, r)) => {
            (DestinationOutcome::PostcopyActive, r.receipt.clone())
        }
        Some((MigrationState::Aborted, r)) => {
            let why = r.error.clone().unwrap_or_else(|| "aborted".into());
            (DestinationOutcome::Aborted, sign_abort(agent, peer, r, why))
        }
        Some(_) => (DestinationOutcome::InProgress, None),
        None => (DestinationOutcome::Unknown, None),
    };
    let _ =
        writer.write_control(&PeerMessage::QueryReply { migration_id: id, outcome, signed }).await;
}

/// SECURITY: "aborted" lets the source resume its copy, so it is signed and
/// bound to the query's own connection: it cannot be replayed later.
fn sign_abort(
    agent: &Agent,
    peer: &PeerAuthenticated,
    r: &MigrationRecord,
    reason: String,
) -> Option<Signed> {
    let body = AbortBody {
        migration_id: r.id,
        source: r.source.clone(),
        destination: r.destination.clone(),
        vm: r.vm.clone(),
        channel_binding: offer_binding(peer.binding().as_bytes(), &r.id),
        log_head: agent.notary.log_head(),
        reason,
    };
    agent.notary.sign(evidence::ABORT, &body).ok()
}

/// A migration this host never saw: record it as aborted before saying so,
/// so that the promise never to run it outlives any later offer of its id.
fn tombstone(
    agent: &Agent,
    peer: &PeerAuthenticated,
    id: MigrationId,
    vm: VmName,
) -> Option<MigrationRecord> {
    let mut rec =
        MigrationRecord::new(id, Role::Destination, vm, peer.host().clone(), agent.host.clone());
    let never =
        ferry_session::next(Role::Destination, MigrationState::Preparing, Event::Failed).ok()?;
    rec.enter(&never);
    rec.error = Some("never offered here".into());
    match agent.records.create(&mut rec) {
        Ok(true) => Some(rec),
        // Created meanwhile by an offer: answer from it.
        Ok(false) => agent.records.get(&id).ok().flatten(),
        Err(e) => {
            tracing::error!(error = %report(&e), "cannot record an unknown migration's id");
            None
        }
    }
}
