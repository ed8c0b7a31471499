//! After a restart (or a crash): adopt the VMs that survived and settle
//! every migration that was interrupted, so that each VM runs exactly once.
//! What happens to each is a row of the transition table (the `restart`
//! arrows of docs/session.md), chosen by what the agent finds of its VM.

use std::sync::Arc;

use ferry_session::{Effect, Event, MigrationState, Role, VmFacts};

use super::machine::Session;
use crate::agent::Agent;
use crate::audit::Audit;
use crate::error::Error;
use crate::report::report;

pub async fn recover(agent: &Arc<Agent>) -> Result<(), Error> {
    use MigrationState::{Completed, Resuming};
    let records = agent.records.all()?;
    let adopted = agent.backend.adopt(&crate::vtpm::departures(&records)).await?;
    for stale in adopted.refused {
        tracing::error!(vm = %stale.vm(), "{stale}");
        let audit = Audit::VtpmRefused {
            vm: stale.vm().to_string(),
            dir: stale.dir().display().to_string(),
            migration: stale.migration().map(|id| id.to_string()),
            why: stale.to_string(),
        };
        let _ = agent.notary.record(audit, None, None).await;
    }
    for rec in records {
        let (id, state) = (rec.id, rec.state());
        if state.is_final() {
            // A lost post-copy whose destination was not told yet.
            if rec.role == Role::Source && state == MigrationState::PostcopyLost && !rec.peer_told {
                agent.follow_up(id, Effect::NotifyLost);
            }
            continue;
        }
        let span =
            tracing::info_span!("recovery", migration_id = %id, vm = %rec.vm, role = ?rec.role);
        let _g = span.enter();
        let facts = agent.backend.facts(&rec.vm).await;
        if facts != VmFacts::Gone {
            // The record says this migration holds the VM; the table's
            // effects let go of it where the migration ends.
            agent.backend.claim(&rec.vm, id).await;
        }
        let role = rec.role;
        let note = note(role, state, facts);
        let mut session = Session::new(agent.clone(), rec);
        match session.apply(Event::Restarted(facts), note).await {
            Ok(step) => {
                tracing::warn!(from = %state, to = %step.to, ?facts, "migration settled after a restart");
                let unsigned = session.record().receipt.is_none();
                if (role, state, step.to) == (Role::Destination, Resuming, Completed) && unsigned {
                    // Sent when the source asks (it is in doubt until then).
                    if let Err(e) = super::word::receipt_after_restart(&mut session).await {
                        tracing::error!(error = %report(&e), "no receipt after a restart");
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %report(&e), "cannot settle a migration after a restart")
            }
        }
    }
    Ok(())
}

/// What the record says about a restart, where it changes something.
fn note(role: Role, state: MigrationState, facts: VmFacts) -> Option<String> {
    use MigrationState::*;
    let gone = facts == VmFacts::Gone;
    let text = match (role, state) {
        (Role::Source, Preparing | Transferring) if gone => {
            "the source agent restarted before the commit, and the VM's QEMU is gone"
        }
        (Role::Source, Preparing | Transferring) => {
            "the source agent restarted before the commit; the VM runs here again"
        }
        (Role::Source, Committed) => {
            "the agent restarted after the commit; the VM stays paused until the destination answers"
        }
        (Role::Destination, Preparing | Transferring) => {
            "the destination agent restarted before the commit; the incoming VM was discarded"
        }
        (Role::Destination, Resuming) if matches!(facts, VmFacts::Alive { running: true, .. }) => {
            return None
        }
        (Role::Destination, Resuming) => {
            "the destination agent restarted before resuming; the incoming VM was discarded"
        }
        (_, PostcopyActive) if gone => {
            "the agent restarted during post-copy and this half's QEMU is gone"
        }
        _ => return None,
    };
    Some(text.to_owned())
}
