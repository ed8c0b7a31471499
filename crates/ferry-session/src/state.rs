//! The vocabulary of the transition table.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Source,
    Destination,
}

/// Where a migration stands; persisted in its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// Connecting, attesting, offering (source); checking the offer and
    /// launching the incoming VM (destination).
    Preparing,
    /// VM state is moving.
    Transferring,
    /// Source: the Commit is recorded and sent; the copy is paused and must
    /// not run until the destination answers.
    Committed,
    /// Source: committed and no valid answer yet; the agent keeps asking the
    /// destination and the copy stays paused meanwhile.
    InDoubt,
    /// Destination: the stream matched the Commit; about to resume the VM.
    Resuming,
    /// Post-copy after the hand-over: the destination runs the VM while the
    /// source's QEMU still holds pages it lacks. The VM exists only as both
    /// halves together: neither may be stopped or resumed.
    PostcopyActive,
    /// Post-copy after the hand-over, and the source's half is gone: the
    /// pages only it held are lost. The destination's frozen half is
    /// released to the operator (stop it, or keep it for forensics).
    PostcopyLost,
    Completed,
    /// Ended without moving the VM: it runs on the source (again).
    Aborted,
}

impl MigrationState {
    pub const ALL: [MigrationState; 9] = [
        MigrationState::Preparing,
        MigrationState::Transferring,
        MigrationState::Committed,
        MigrationState::InDoubt,
        MigrationState::Resuming,
        MigrationState::PostcopyActive,
        MigrationState::PostcopyLost,
        MigrationState::Completed,
        MigrationState::Aborted,
    ];

    /// Nothing more will happen to a migration in this state.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationState::Completed | MigrationState::Aborted | MigrationState::PostcopyLost
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            MigrationState::Preparing => "preparing",
            MigrationState::Transferring => "transferring",
            MigrationState::Committed => "committed",
            MigrationState::InDoubt => "in_doubt",
            MigrationState::Resuming => "resuming",
            MigrationState::PostcopyActive => "postcopy_active",
            MigrationState::PostcopyLost => "postcopy_lost",
            MigrationState::Completed => "completed",
            MigrationState::Aborted => "aborted",
        }
    }
}

impl std::fmt::Display for MigrationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the VM looked like when a restarted agent found the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmFacts {
    /// No VM process (QEMU died, or was never launched).
    Gone,
    /// The VM process lives.
    Alive {
        /// The guest runs (not paused).
        running: bool,
        /// QEMU reports its migration `completed`.
        migration_completed: bool,
    },
}

/// Which restarts a row applies to; rows are tried in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Any,
    Gone,
    Running,
    MigrationCompleted,
}

impl Found {
    fn matches(self, facts: VmFacts) -> bool {
        match (self, facts) {
            (Found::Any, _) => true,
            (Found::Gone, VmFacts::Gone) => true,
            (Found::Running, VmFacts::Alive { running, .. }) => running,
            (Found::MigrationCompleted, VmFacts::Alive { migration_completed, .. }) => {
                migration_completed
            }
            _ => false,
        }
    }
}

/// What a destination reports about a migration when its source asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestinationOutcome {
    /// The destination resumed the VM: the source must retire its copy.
    Completed,
    /// The destination will never resume the VM: the source must resume.
    Aborted,
    /// Still deciding on the destination side; ask again.
    InProgress,
    /// Post-copy: the destination runs the VM (the reply carries its signed
    /// hand-over) and still lacks pages the source holds: recover, never resume.
    PostcopyActive,
    /// Never seen: the destination cannot resume it either.
    Unknown,
}

impl DestinationOutcome {
    pub fn name(self) -> &'static str {
        match self {
            DestinationOutcome::Completed => "completed",
            DestinationOutcome::Aborted => "aborted",
            DestinationOutcome::InProgress => "in_progress",
            DestinationOutcome::PostcopyActive => "postcopy_active",
            DestinationOutcome::Unknown => "unknown",
        }
    }
}

/// What happened to a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Source: the destination's signed Accept verified. Destination: the
    /// Accept is recorded and sent; the VM was launched for the stream.
    Accepted,
    /// Source: the Commit (final or post-copy switchover) is recorded, about
    /// to be sent.
    Committed,
    /// Source: a valid Receipt for exactly what was committed.
    ReceiptVerified,
    /// Post-copy: the source verified the destination's signed hand-over;
    /// the destination resumed the VM under it.
    HandedOver,
    /// Destination: QEMU loaded the stream and its count and digest equal
    /// the Commit's (a `DigestsMatch` was made).
    DigestsMatched,
    /// Destination: QEMU runs the VM.
    Resumed,
    /// Post-copy: QEMU finished; every page is on the destination.
    PostcopyDone,
    /// Something broke: the link, a check, QEMU, the audit log, a timeout.
    Failed,
    /// The peer refused or aborted (a Refuse, or an Abort before it signed
    /// for the VM): it promises never to run this VM.
    PeerAborted,
    /// Post-copy: the source's QEMU is gone.
    SourceLost,
    /// Source: the destination answered an in-doubt query.
    Resolved(DestinationOutcome),
    /// The agent restarted and found the VM like this.
    Restarted(VmFacts),
}

/// What must happen when a transition is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Effect {
    /// Source: cancel QEMU's migration if it still runs and resume the copy.
    ResumeSource,
    /// Source: the destination signed for the VM; quit the paused copy.
    RetireSource,
    /// Destination: kill the incoming VM; it must never run here.
    DiscardIncoming,
    /// The migration lets go of the VM: other operations may touch it.
    ReleaseVm,
    /// The VM's process is gone: drop it from this host's inventory (its
    /// console log is kept with the departed VMs).
    ForgetVm,
    /// The VM moved (or arrived): start its cooldown.
    StartCooldown,
    /// Source: keep asking the destination what became of the migration.
    Resolve,
    /// Source: keep resuming the interrupted post-copy stream.
    RecoverPostcopy,
    /// Source: tell the destination that the source half is lost.
    NotifyLost,
}

impl Effect {
    /// Undo effects run before the new state is recorded: each is
    /// idempotent, and the state it leaves (the old one, if the agent dies
    /// in between) redoes it on restart. Everything else runs after.
    pub fn before_recording(self) -> bool {
        matches!(self, Effect::ResumeSource | Effect::RetireSource | Effect::DiscardIncoming)
    }
}

/// What the audit log says about a transition; `None` where the flow's own
/// message records (offer, accept, commit...) already say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    RolledBack,
    Refused,
    Discarded,
    InDoubt,
    PostcopyInterrupted,
    PostcopyLost,
}

/// A legal transition. Only [`next`](crate::next) makes one (outside this
/// crate a non-exhaustive struct cannot be built), and only a `Step` lets a
/// record change state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Step {
    pub to: MigrationState,
    pub effects: &'static [Effect],
    pub outcome: Option<Outcome>,
}

/// A transition the table does not have: a bug in the caller, never a
/// peer's doing (peer input becomes events only after it was checked).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition for a {role:?} migration: {event:?} in state {from}")]
pub struct IllegalTransition {
    pub role: Role,
    pub from: MigrationState,
    pub event: Event,
}

/// The events of [`Event`] without their data, to name table rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    Accepted,
    Committed,
    ReceiptVerified,
    HandedOver,
    DigestsMatched,
    Resumed,
    PostcopyDone,
    Failed,
    PeerAborted,
    SourceLost,
    Resolved(DestinationOutcome),
    Restarted(Found),
}

impl On {
    pub(crate) fn matches(self, event: Event) -> bool {
        match (self, event) {
            (On::Accepted, Event::Accepted)
            | (On::Committed, Event::Committed)
            | (On::ReceiptVerified, Event::ReceiptVerified)
            | (On::HandedOver, Event::HandedOver)
            | (On::DigestsMatched, Event::DigestsMatched)
            | (On::Resumed, Event::Resumed)
            | (On::PostcopyDone, Event::PostcopyDone)
            | (On::Failed, Event::Failed)
            | (On::PeerAborted, Event::PeerAborted)
            | (On::SourceLost, Event::SourceLost) => true,
            (On::Resolved(a), Event::Resolved(b)) => a == b,
            (On::Restarted(found), Event::Restarted(facts)) => found.matches(facts),
            _ => false,
        }
    }
}
