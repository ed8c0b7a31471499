//! One migration's record and the only function that changes its state.

use std::sync::Arc;
use std::time::Duration;

use ferry_session::{Effect, Event, MigrationState, Outcome, Step};

use crate::agent::Agent;
use crate::audit::Audit;
use crate::error::Error;
use crate::notary::About;
use crate::records::{now_unix_ms, MigrationRecord};
use crate::report::report;

/// A migration this host takes part in, as its durable record says.
pub struct Session {
    pub agent: Arc<Agent>,
    rec: MigrationRecord,
}

impl Session {
    pub fn new(agent: Arc<Agent>, rec: MigrationRecord) -> Self {
        Self { agent, rec }
    }

    pub fn record(&self) -> &MigrationRecord {
        &self.rec
    }

    /// The record's other fields (counts, digests, receipts): its state
    /// changes only through [`apply`](Self::apply).
    pub fn record_mut(&mut self) -> &mut MigrationRecord {
        &mut self.rec
    }

    pub fn into_record(self) -> MigrationRecord {
        self.rec
    }

    pub fn state(&self) -> MigrationState {
        self.rec.state()
    }

    pub fn about(&self) -> About<'_> {
        About { id: &self.rec.id, vm: &self.rec.vm, peer: self.rec.peer() }
    }

    /// Write the record durably (counts, receipts: not its state).
    pub fn save(&mut self) -> Result<(), Error> {
        self.agent.records.save(&mut self.rec).map_err(Error::Record)
    }

    /// Append an audit record about this migration. Err only for a
    /// mandatory record: the step it guards must not happen.
    pub async fn audit(
        &self,
        audit: Audit,
        signed: Option<ferry_audit::Signed>,
    ) -> Result<(), Error> {
        self.agent.notary.record(audit, Some(self.about()), signed).await.map_err(Error::Audit)
    }

    /// Start appending audit records about this migration (one write, one
    /// fdatasync) while the caller does other durable work; see
    /// [`Notary::begin`](crate::notary::Notary::begin).
    pub fn begin_audit(
        &self,
        records: Vec<(Audit, Option<ferry_audit::Signed>)>,
    ) -> crate::notary::PendingAudit {
        self.agent.notary.begin(records, Some(self.about()))
    }

    /// Take `event`: the table says where it leads (or that it is a bug),
    /// undo effects run first (each is idempotent, and the old state redoes
    /// it after a crash), then the new state is recorded durably, then the
    /// rest follows. `note` says why, for the record and the audit log.
    pub async fn apply(&mut self, event: Event, note: Option<String>) -> Result<Step, Error> {
        let step = ferry_session::next(self.rec.role, self.rec.state(), event)?;
        let mut note = note;
        for effect in step.effects.iter().filter(|e| e.before_recording()) {
            if let Err(e) = self.effect(*effect).await {
                tracing::error!(?effect, error = %report(&e), "undo effect failed");
                let why = format!("{effect:?} failed: {}", report(&e));
                note = Some(match note {
                    Some(n) => format!("{n}; {why}"),
                    None => why,
                });
            }
        }
        let from = self.rec.state();
        self.rec.enter(&step);
        if note.is_some() || step.to == MigrationState::Completed {
            self.rec.error = note.clone();
        }
        if step.to.is_final() {
            self.rec.total_ms = Some(now_unix_ms().saturating_sub(self.rec.created_unix_ms));
        }
        // SECURITY: the new state is durable before anything follows from
        // it (a Commit is sent only once the record says Committed).
        self.save()?;
        tracing::info!(from = %from, to = %step.to, ?event, "migration state");
        for effect in step.effects.iter().filter(|e| !e.before_recording()) {
            if let Err(e) = self.effect(*effect).await {
                tracing::error!(?effect, error = %report(&e), "follow-up effect failed");
            }
        }
        if let Some(outcome) = step.outcome {
            let audit = Audit::Outcome {
                outcome,
                state: step.to,
                reason: self.rec.error.clone(),
                bytes: self.rec.bytes,
            };
            self.audit(audit, None).await?;
            self.count(outcome);
        }
        Ok(step)
    }

    async fn effect(&self, effect: Effect) -> Result<(), Error> {
        let (agent, rec) = (&self.agent, &self.rec);
        match effect {
            Effect::ResumeSource => agent.backend.resume_source(&rec.vm).await?,
            Effect::RetireSource => {
                let retired = agent.backend.retire_source(&rec.vm, rec.id).await?;
                if let Some(e) = retired.vtpm {
                    // Not mandatory: the VM already runs on the destination.
                    let audit = Audit::VtpmErased { files: e.files, bytes: e.bytes };
                    self.audit(audit, None).await?;
                }
            }
            Effect::DiscardIncoming => agent.backend.discard_incoming(&rec.vm, rec.id).await?,
            Effect::ReleaseVm => agent.backend.release(&rec.vm, rec.id).await,
            Effect::ForgetVm => agent.backend.forget(&rec.vm).await?,
            Effect::StartCooldown => agent.authz.moved(&rec.vm),
            Effect::Resolve | Effect::RecoverPostcopy | Effect::NotifyLost => {
                agent.follow_up(rec.id, effect)
            }
        }
        Ok(())
    }

    fn count(&self, outcome: Outcome) {
        let label = match outcome {
            Outcome::Completed => "completed",
            Outcome::RolledBack | Outcome::Refused | Outcome::Discarded => "aborted",
            Outcome::InDoubt | Outcome::PostcopyInterrupted => "in_doubt",
            Outcome::PostcopyLost => "postcopy_lost",
        };
        let elapsed = now_unix_ms().saturating_sub(self.rec.created_unix_ms);
        let (role, bytes) = (self.rec.role, self.rec.bytes);
        self.agent.metrics.migration_finished(role, label, bytes, Duration::from_millis(elapsed));
    }
}
