//! Every legal transition, as data.

use crate::state::*;

/// One row: (role, from, on) → (to, effects, outcome).
pub type Row = (Role, MigrationState, On, MigrationState, &'static [Effect], Option<Outcome>);

use Effect::*;
use MigrationState::*;
use Role::{Destination as D, Source as S};

const ROLL_BACK: &[Effect] = &[ResumeSource, ReleaseVm];
const RETIRE: &[Effect] = &[RetireSource, StartCooldown];
const DISCARD: &[Effect] = &[DiscardIncoming, ReleaseVm];
const ARRIVED: &[Effect] = &[ReleaseVm, StartCooldown];
const NONE: &[Effect] = &[];

/// Every legal transition. Restart rows are tried in order: the first whose
/// [`Found`] matches what the agent found wins.
#[rustfmt::skip]
pub const ROWS: &[Row] = &[
    // Source, while the migration runs.
    (S, Preparing, On::Accepted, Transferring, NONE, None),
    (S, Preparing, On::Failed, Aborted, ROLL_BACK, Some(Outcome::RolledBack)),
    (S, Preparing, On::PeerAborted, Aborted, ROLL_BACK, Some(Outcome::RolledBack)),
    (S, Transferring, On::Committed, Committed, NONE, None),
    (S, Transferring, On::Failed, Aborted, ROLL_BACK, Some(Outcome::RolledBack)),
    (S, Transferring, On::PeerAborted, Aborted, ROLL_BACK, Some(Outcome::RolledBack)),
    (S, Committed, On::ReceiptVerified, Completed, RETIRE, Some(Outcome::Completed)),
    (S, Committed, On::HandedOver, PostcopyActive, NONE, None),
    (S, Committed, On::PeerAborted, Aborted, ROLL_BACK, Some(Outcome::RolledBack)),
    (S, Committed, On::Failed, InDoubt, &[Resolve], Some(Outcome::InDoubt)),
    // Source, settling a migration in doubt by asking the destination.
    (S, InDoubt, On::Resolved(DestinationOutcome::Completed), Completed, RETIRE, Some(Outcome::Completed)),
    (S, InDoubt, On::Resolved(DestinationOutcome::Aborted), Aborted, ROLL_BACK, Some(Outcome::RolledBack)),
    (S, InDoubt, On::Resolved(DestinationOutcome::Unknown), Aborted, ROLL_BACK, Some(Outcome::RolledBack)),
    (S, InDoubt, On::Resolved(DestinationOutcome::PostcopyActive), PostcopyActive, &[RecoverPostcopy], Some(Outcome::PostcopyInterrupted)),
    (S, InDoubt, On::Resolved(DestinationOutcome::InProgress), InDoubt, &[Resolve], None),
    (S, InDoubt, On::Failed, InDoubt, &[Resolve], None),
    // Source, post-copy after the hand-over.
    (S, PostcopyActive, On::PostcopyDone, Completed, RETIRE, Some(Outcome::Completed)),
    (S, PostcopyActive, On::Failed, PostcopyActive, &[RecoverPostcopy], Some(Outcome::PostcopyInterrupted)),
    (S, PostcopyActive, On::SourceLost, PostcopyLost, &[ReleaseVm, ForgetVm, NotifyLost], Some(Outcome::PostcopyLost)),
    // Source, after a restart.
    (S, Preparing, On::Restarted(Found::Gone), Aborted, &[ReleaseVm], Some(Outcome::RolledBack)),
    (S, Preparing, On::Restarted(Found::Any), Aborted, ROLL_BACK, Some(Outcome::RolledBack)),
    (S, Transferring, On::Restarted(Found::Gone), Aborted, &[ReleaseVm], Some(Outcome::RolledBack)),
    (S, Transferring, On::Restarted(Found::Any), Aborted, ROLL_BACK, Some(Outcome::RolledBack)),
    (S, Committed, On::Restarted(Found::Any), InDoubt, &[Resolve], Some(Outcome::InDoubt)),
    (S, InDoubt, On::Restarted(Found::Any), InDoubt, &[Resolve], None),
    (S, PostcopyActive, On::Restarted(Found::Gone), PostcopyLost, &[ForgetVm, NotifyLost], Some(Outcome::PostcopyLost)),
    (S, PostcopyActive, On::Restarted(Found::MigrationCompleted), Completed, RETIRE, Some(Outcome::Completed)),
    (S, PostcopyActive, On::Restarted(Found::Any), PostcopyActive, &[RecoverPostcopy], None),
    // Destination, while the migration runs.
    (D, Preparing, On::Accepted, Transferring, NONE, None),
    (D, Preparing, On::Failed, Aborted, DISCARD, Some(Outcome::Refused)),
    (D, Transferring, On::DigestsMatched, Resuming, NONE, None),
    (D, Transferring, On::Failed, Aborted, DISCARD, Some(Outcome::Discarded)),
    (D, Transferring, On::PeerAborted, Aborted, DISCARD, Some(Outcome::Discarded)),
    (D, Resuming, On::Resumed, Completed, ARRIVED, Some(Outcome::Completed)),
    (D, Resuming, On::HandedOver, PostcopyActive, NONE, None),
    (D, Resuming, On::Failed, Aborted, DISCARD, Some(Outcome::Discarded)),
    (D, PostcopyActive, On::PostcopyDone, Completed, ARRIVED, Some(Outcome::Completed)),
    (D, PostcopyActive, On::Failed, PostcopyActive, NONE, Some(Outcome::PostcopyInterrupted)),
    (D, PostcopyActive, On::SourceLost, PostcopyLost, &[ReleaseVm], Some(Outcome::PostcopyLost)),
    // Destination, after a restart.
    (D, Preparing, On::Restarted(Found::Any), Aborted, DISCARD, Some(Outcome::Discarded)),
    (D, Transferring, On::Restarted(Found::Any), Aborted, DISCARD, Some(Outcome::Discarded)),
    (D, Resuming, On::Restarted(Found::Running), Completed, ARRIVED, Some(Outcome::Completed)),
    (D, Resuming, On::Restarted(Found::Any), Aborted, DISCARD, Some(Outcome::Discarded)),
    (D, PostcopyActive, On::Restarted(Found::Gone), PostcopyLost, &[ForgetVm], Some(Outcome::PostcopyLost)),
    (D, PostcopyActive, On::Restarted(Found::MigrationCompleted), Completed, ARRIVED, Some(Outcome::Completed)),
    (D, PostcopyActive, On::Restarted(Found::Any), PostcopyActive, NONE, None),
];
