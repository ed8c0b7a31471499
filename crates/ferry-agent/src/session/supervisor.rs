//! The loops a source agent runs by itself after a migration stopped short:
//! asking the destination about a migration in doubt, resuming an
//! interrupted post-copy, telling the destination a post-copy's source half
//! is lost. The transition table starts them (effects `resolve`,
//! `recover_postcopy`, `notify_lost`); each stops once its migration left
//! the state it was started for, and retries with backoff meanwhile: a VM
//! paused or stalled waiting for a human is an outage.

use std::sync::Arc;
use std::time::Duration;

use ferry_session::{Effect, MigrationState};
use ferry_types::MigrationId;
use tokio::sync::mpsc;

use super::{lost, recover, resolve};
use crate::agent::Agent;
use crate::report::report;

/// Longest pause between two attempts.
pub const MAX_RETRY: Duration = Duration::from_secs(60);

pub type FollowUps = mpsc::UnboundedSender<(MigrationId, Effect)>;

/// Start the supervisor; the agent sends it the loop-starting effects.
pub fn spawn(agent: Arc<Agent>, mut rx: mpsc::UnboundedReceiver<(MigrationId, Effect)>) {
    tokio::spawn(async move {
        while let Some((id, effect)) = rx.recv().await {
            start(agent.clone(), id, effect);
        }
    });
}

fn start(agent: Arc<Agent>, id: MigrationId, effect: Effect) {
    let mig = &agent.cfg.migration;
    // The first attempt: at once for resolution (the VM is paused), after
    // the configured delay for post-copy (the link needs time to come back).
    let first = match effect {
        Effect::Resolve => mig.resolve_retry().map(|_| Duration::ZERO),
        Effect::RecoverPostcopy => mig.postcopy_recover_retry(),
        Effect::NotifyLost => Some(Duration::ZERO),
        _ => None,
    };
    let Some(first) = first else { return };
    let step = match effect {
        Effect::Resolve => mig.resolve_retry(),
        Effect::RecoverPostcopy => mig.postcopy_recover_retry(),
        _ => Some(Duration::from_secs(1)),
    }
    .unwrap_or(Duration::from_secs(1));
    if !agent.sessions.start_loop(id, effect) {
        return;
    }
    let span = tracing::info_span!("follow_up", migration_id = %id, ?effect);
    let task = async move {
        let mut delay = first;
        for attempt in 1u64.. {
            tokio::time::sleep(delay).await;
            delay = if delay.is_zero() { step } else { (delay * 2).min(MAX_RETRY.max(step)) };
            if once(&agent, id, effect, attempt).await {
                break;
            }
        }
        agent.sessions.end_loop(&id, effect);
    };
    tokio::spawn(tracing::Instrument::instrument(task, span));
}

/// One attempt; true when the loop is done.
async fn once(agent: &Arc<Agent>, id: MigrationId, effect: Effect, attempt: u64) -> bool {
    if agent.stopped() {
        return true;
    }
    let state = match agent.records.get(&id) {
        Ok(Some(r)) => r.state(),
        Ok(None) => return true,
        Err(e) => {
            tracing::warn!(error = %report(&e), "cannot read the record; retrying");
            return false;
        }
    };
    match effect {
        Effect::Resolve if state == MigrationState::InDoubt => {
            resolve::attempt_logged(agent, id, attempt).await
        }
        Effect::RecoverPostcopy if state == MigrationState::PostcopyActive => {
            match recover::attempt(agent, id).await {
                Ok(rec) => {
                    tracing::info!(attempt, state = %rec.state(), "post-copy resumed automatically");
                    true
                }
                Err(crate::error::Error::PostcopyLost { .. }) => true,
                Err(e) => {
                    tracing::warn!(attempt, error = %report(&e), "automatic post-copy recovery failed");
                    false
                }
            }
        }
        Effect::NotifyLost => match lost::notify(agent, id).await {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!(attempt, error = %report(&e), "cannot tell the destination yet");
                false
            }
        },
        // The migration left the state this loop was for.
        _ => true,
    }
}
