//! Settling an in-doubt migration: the source asks its destination, on a
//! new connection, what became of it, and believes "completed" only with the
//! destination's signed receipt for exactly what was committed.

use std::sync::Arc;

use ferry_types::{Digest32, MigrationId};

use crate::client;
use crate::evidence::{self, Expect, StreamBody};
use crate::outgoing::{backend, finish_completed, release, resume_source, save};
use crate::protocol::{DestinationOutcome, PeerMessage};
use crate::records::{MigrationRecord, MigrationState, Role};
use crate::{Agent, ErrorKind, Fault};

/// Settle an in-doubt migration by asking its destination what happened.
pub async fn resolve(agent: &Arc<Agent>, id: MigrationId) -> Result<MigrationRecord, Fault> {
    let mut rec =
        agent.records.get(&id).map_err(|e| backend("reading the record", e))?.ok_or_else(|| {
            Fault::new(ErrorKind::Request, format!("no migration {id} on {}", agent.host))
        })?;
    if rec.role != Role::Source
        || !matches!(rec.state, MigrationState::InDoubt | MigrationState::Committed)
    {
        return Err(Fault::new(
            ErrorKind::Request,
            format!("migration {id} is {:?}, not in doubt", rec.state),
        ));
    }
    let to = rec.destination.clone();
    let addr =
        *agent.cfg.peers.get(&to).ok_or_else(|| {
            Fault::new(ErrorKind::Request, format!("{to} is no longer in [peers]"))
        })?;
    let mig = &agent.cfg.migration;
    let config = agent.tls.client().map_err(|e| backend("TLS configuration", e))?;
    let (stream, _) =
        client::connect(addr, &to, config, &agent.domain, mig.connect_timeout()).await.map_err(
            |e| Fault::new(ErrorKind::InDoubt, format!("still in doubt: {}", crate::chain(&e))),
        )?;
    let (mut reader, mut writer) =
        client::greet(stream, &to, addr, mig.io_timeout()).await.map_err(|e| {
            Fault::new(ErrorKind::InDoubt, format!("still in doubt: {}", crate::chain(&e)))
        })?;
    writer
        .write_control(&PeerMessage::Query { migration_id: id })
        .await
        .map_err(|e| Fault::new(ErrorKind::InDoubt, crate::chain(&e)))?;
    let (outcome, receipt) = match reader
        .read_control::<PeerMessage>()
        .await
        .map_err(|e| Fault::new(ErrorKind::InDoubt, crate::chain(&e)))?
    {
        PeerMessage::QueryReply { migration_id, outcome, receipt } if migration_id == id => {
            (outcome, receipt)
        }
        other => {
            return Err(Fault::new(
                ErrorKind::Peer,
                format!("{to} answered the query with {}", other.name()),
            ))
        }
    };
    tracing::info!(migration_id = %id, ?outcome, "destination answered the in-doubt query");
    let qmp = agent.vms.lock().await.get(&rec.vm).map(|e| e.qmp.clone());
    match outcome {
        DestinationOutcome::Completed => {
            // SECURITY: "completed" is only believed with the destination's
            // signed receipt for exactly what this host committed.
            let signed = receipt.ok_or_else(|| {
                Fault::new(ErrorKind::InDoubt, format!("{to} claims completion without a receipt"))
            })?;
            let expect = Expect {
                id: &id,
                source: &agent.host,
                destination: &to,
                vm: &rec.vm,
                binding: None,
            };
            let body = agent
                .verify_from::<StreamBody>(&signed, evidence::RECEIPT, &to, &expect)
                .map_err(|e| Fault::new(ErrorKind::InDoubt, format!("invalid receipt: {e}")))?;
            let digest = rec.digest.unwrap_or(Digest32([0; 32]));
            if body.bytes != rec.bytes || body.digest != digest {
                return Err(Fault::new(
                    ErrorKind::InDoubt,
                    format!(
                        "{to}'s receipt is for {} bytes / {}, not what was committed",
                        body.bytes, body.digest
                    ),
                ));
            }
            let ev = evidence::event(
                "receipt_received",
                &id,
                &rec.vm,
                &to,
                serde_json::json!({ "via": "resolve" }),
                Some(signed.clone()),
            );
            if let Err(e) = agent.audit(ev).await {
                tracing::error!(error = %e, "resolved receipt not in the audit log");
            }
            rec.receipt = Some(signed);
            finish_completed(agent, &mut rec, digest).await
        }
        DestinationOutcome::Aborted | DestinationOutcome::Unknown => {
            let Some(qmp) = qmp else {
                return Err(Fault::new(
                    ErrorKind::Backend,
                    format!("VM {} has no QEMU on {} any more", rec.vm, agent.host),
                ));
            };
            resume_source(&qmp).await.map_err(|e| {
                Fault::new(ErrorKind::Backend, format!("resuming the source copy: {e}"))
            })?;
            rec.state = MigrationState::Aborted;
            rec.error = Some(
                format!(
                    "{to} reports the migration {outcome:?}; the VM runs on {} again",
                    agent.host
                )
                .to_lowercase(),
            );
            let ev = evidence::event(
                "rolled_back",
                &id,
                &rec.vm,
                &to,
                serde_json::json!({ "via": "resolve", "outcome": outcome }),
                None,
            );
            if let Err(e) = agent.audit(ev).await {
                tracing::error!(error = %e, "resolution not in the audit log");
            }
            save(agent, &mut rec);
            release(agent, &rec.vm).await;
            Ok(rec)
        }
        DestinationOutcome::PostcopyActive => {
            // SECURITY: believed only with the destination's signed handover
            // for exactly the switchover this host committed to.
            let signed = receipt.ok_or_else(|| {
                Fault::new(
                    ErrorKind::InDoubt,
                    format!("{to} claims the post-copy hand-over without its receipt"),
                )
            })?;
            let expect = Expect {
                id: &id,
                source: &agent.host,
                destination: &to,
                vm: &rec.vm,
                binding: None,
            };
            let body = agent
                .verify_from::<StreamBody>(&signed, evidence::HANDOVER, &to, &expect)
                .map_err(|e| {
                Fault::new(ErrorKind::InDoubt, format!("invalid handover receipt: {e}"))
            })?;
            if Some(body.digest) != rec.digest || body.bytes != rec.bytes {
                return Err(Fault::new(
                    ErrorKind::InDoubt,
                    format!(
                        "{to}'s handover is for {} bytes / {}, not the switchover committed here",
                        body.bytes, body.digest
                    ),
                ));
            }
            let ev = evidence::event(
                "receipt_received",
                &id,
                &rec.vm,
                &to,
                serde_json::json!({ "via": "resolve", "postcopy": "switchover" }),
                Some(signed.clone()),
            );
            if let Err(e) = agent.audit(ev).await {
                tracing::error!(error = %e, "resolved handover not in the audit log");
            }
            rec.receipt = Some(signed);
            rec.state = MigrationState::PostcopyActive;
            rec.error = Some(format!(
                "{to} took the VM over in post-copy; this host's QEMU holds pages it lacks: {}",
                crate::outgoing::recover_advice(agent, &id)
            ));
            save(agent, &mut rec);
            crate::recover::spawn_auto_recover(agent.clone(), id);
            Err(Fault::new(ErrorKind::InDoubt, rec.error.clone().unwrap_or_default()))
        }
        DestinationOutcome::InProgress => Err(Fault::new(
            ErrorKind::InDoubt,
            format!("{to} is still completing migration {id}; ask again"),
        )),
    }
}
