//! The table row by row, and the rules it must keep whatever rows are added.

use crate::*;
use DestinationOutcome as Dest;
use Effect::*;
use MigrationState::*;
use Role::{Destination as D, Source as S};

fn go(role: Role, from: MigrationState, event: Event) -> (MigrationState, Vec<Effect>) {
    let step = next(role, from, event).unwrap_or_else(|e| panic!("{e}"));
    (step.to, step.effects.to_vec())
}

const ALIVE_PAUSED: VmFacts = VmFacts::Alive { running: false, migration_completed: false };
const ALIVE_RUNNING: VmFacts = VmFacts::Alive { running: true, migration_completed: false };
const MIGRATED: VmFacts = VmFacts::Alive { running: false, migration_completed: true };
const FACTS: [VmFacts; 4] = [VmFacts::Gone, ALIVE_PAUSED, ALIVE_RUNNING, MIGRATED];

#[test]
fn a_source_migration_runs_to_completion() {
    assert_eq!(go(S, Preparing, Event::Accepted), (Transferring, vec![]));
    assert_eq!(go(S, Transferring, Event::Committed), (Committed, vec![]));
    assert_eq!(
        go(S, Committed, Event::ReceiptVerified),
        (Completed, vec![RetireSource, StartCooldown])
    );
}

#[test]
fn before_the_commit_every_failure_rolls_the_source_back() {
    for from in [Preparing, Transferring] {
        for event in [Event::Failed, Event::PeerAborted] {
            assert_eq!(go(S, from, event), (Aborted, vec![ResumeSource, ReleaseVm]), "{from:?}");
        }
    }
}

#[test]
fn after_the_commit_only_the_destination_decides() {
    assert_eq!(go(S, Committed, Event::Failed), (InDoubt, vec![Resolve]));
    assert_eq!(go(S, Committed, Event::PeerAborted), (Aborted, vec![ResumeSource, ReleaseVm]));
    assert_eq!(go(S, Committed, Event::HandedOver), (PostcopyActive, vec![]));
    assert_eq!(go(S, InDoubt, Event::Failed), (InDoubt, vec![Resolve]));
    let resolved = |o| go(S, InDoubt, Event::Resolved(o));
    assert_eq!(resolved(Dest::Completed), (Completed, vec![RetireSource, StartCooldown]));
    assert_eq!(resolved(Dest::Aborted), (Aborted, vec![ResumeSource, ReleaseVm]));
    assert_eq!(resolved(Dest::Unknown), (Aborted, vec![ResumeSource, ReleaseVm]));
    assert_eq!(resolved(Dest::InProgress), (InDoubt, vec![Resolve]));
    assert_eq!(resolved(Dest::PostcopyActive), (PostcopyActive, vec![RecoverPostcopy]));
}

#[test]
fn postcopy_after_the_handover_never_resumes_or_retires_on_a_failure() {
    assert_eq!(go(S, PostcopyActive, Event::Failed), (PostcopyActive, vec![RecoverPostcopy]));
    assert!(next(S, PostcopyActive, Event::PeerAborted).is_err(), "no abort after the hand-over");
    assert_eq!(
        go(S, PostcopyActive, Event::PostcopyDone),
        (Completed, vec![RetireSource, StartCooldown])
    );
    assert_eq!(
        go(S, PostcopyActive, Event::SourceLost),
        (PostcopyLost, vec![ReleaseVm, ForgetVm, NotifyLost])
    );
    assert_eq!(go(D, PostcopyActive, Event::Failed), (PostcopyActive, vec![]));
    assert_eq!(go(D, PostcopyActive, Event::SourceLost), (PostcopyLost, vec![ReleaseVm]));
    assert_eq!(
        go(D, PostcopyActive, Event::PostcopyDone),
        (Completed, vec![ReleaseVm, StartCooldown])
    );
}

#[test]
fn a_destination_runs_the_vm_only_after_the_digests_matched() {
    assert_eq!(go(D, Preparing, Event::Accepted), (Transferring, vec![]));
    assert!(next(D, Transferring, Event::Resumed).is_err());
    assert!(next(D, Preparing, Event::DigestsMatched).is_err());
    assert_eq!(go(D, Transferring, Event::DigestsMatched), (Resuming, vec![]));
    assert_eq!(go(D, Resuming, Event::Resumed), (Completed, vec![ReleaseVm, StartCooldown]));
    assert_eq!(go(D, Resuming, Event::HandedOver), (PostcopyActive, vec![]));
    for (from, event) in [
        (Preparing, Event::Failed),
        (Transferring, Event::Failed),
        (Transferring, Event::PeerAborted),
        (Resuming, Event::Failed),
    ] {
        assert_eq!(go(D, from, event), (Aborted, vec![DiscardIncoming, ReleaseVm]), "{from:?}");
    }
}

/// The restart table of the old recovery.rs, row by row, for every fact.
#[test]
fn restart_rows() {
    let source = |from, facts| go(S, from, Event::Restarted(facts));
    for facts in FACTS {
        let undo =
            if facts == VmFacts::Gone { vec![ReleaseVm] } else { vec![ResumeSource, ReleaseVm] };
        assert_eq!(source(Preparing, facts), (Aborted, undo.clone()), "{facts:?}");
        assert_eq!(source(Transferring, facts), (Aborted, undo), "{facts:?}");
        assert_eq!(source(Committed, facts), (InDoubt, vec![Resolve]), "{facts:?}");
        assert_eq!(source(InDoubt, facts), (InDoubt, vec![Resolve]), "{facts:?}");
    }
    assert_eq!(source(PostcopyActive, VmFacts::Gone), (PostcopyLost, vec![ForgetVm, NotifyLost]));
    assert_eq!(source(PostcopyActive, MIGRATED), (Completed, vec![RetireSource, StartCooldown]));
    assert_eq!(source(PostcopyActive, ALIVE_PAUSED), (PostcopyActive, vec![RecoverPostcopy]));

    let dest = |from, facts| go(D, from, Event::Restarted(facts));
    for facts in FACTS {
        assert_eq!(dest(Preparing, facts), (Aborted, vec![DiscardIncoming, ReleaseVm]));
        assert_eq!(dest(Transferring, facts), (Aborted, vec![DiscardIncoming, ReleaseVm]));
    }
    assert_eq!(dest(Resuming, ALIVE_RUNNING), (Completed, vec![ReleaseVm, StartCooldown]));
    for facts in [VmFacts::Gone, ALIVE_PAUSED] {
        assert_eq!(dest(Resuming, facts), (Aborted, vec![DiscardIncoming, ReleaseVm]));
    }
    assert_eq!(dest(PostcopyActive, VmFacts::Gone), (PostcopyLost, vec![ForgetVm]));
    let done = VmFacts::Alive { running: true, migration_completed: true };
    assert_eq!(dest(PostcopyActive, done), (Completed, vec![ReleaseVm, StartCooldown]));
    assert_eq!(dest(PostcopyActive, ALIVE_RUNNING), (PostcopyActive, vec![]));
}

#[test]
fn final_states_are_final() {
    for row in ROWS {
        assert!(!row.1.is_final(), "a row leaves final state {:?}", row.1);
    }
    for state in MigrationState::ALL.into_iter().filter(|s| s.is_final()) {
        for facts in FACTS {
            assert!(next(S, state, Event::Restarted(facts)).is_err());
            assert!(next(D, state, Event::Restarted(facts)).is_err());
        }
    }
}

/// The one rule, for any rows added later: after the Commit the source
/// resumes its copy only on the destination's word that it will never run
/// the VM, and retires it only on the destination's word that it does.
#[test]
fn after_the_commit_the_source_copy_moves_only_on_the_destinations_word() {
    for (role, from, on, _, effects, _) in ROWS {
        if *role != S || matches!(from, Preparing | Transferring) {
            continue;
        }
        if effects.contains(&ResumeSource) {
            let word = matches!(
                on,
                On::PeerAborted | On::Resolved(Dest::Aborted) | On::Resolved(Dest::Unknown)
            );
            assert!(word, "{from:?} --{on:?}--> resumes the source copy");
        }
        if effects.contains(&RetireSource) {
            let word = matches!(
                on,
                On::ReceiptVerified
                    | On::Resolved(Dest::Completed)
                    | On::PostcopyDone
                    | On::Restarted(Found::MigrationCompleted)
            );
            assert!(word, "{from:?} --{on:?}--> retires the source copy");
        }
    }
}

/// No row is shadowed by an earlier one (restart rows after a catch-all).
#[test]
fn every_row_can_be_reached() {
    for (i, row) in ROWS.iter().enumerate() {
        let shadowed = ROWS[..i].iter().any(|earlier| {
            earlier.0 == row.0
                && earlier.1 == row.1
                && match (earlier.2, row.2) {
                    (On::Restarted(Found::Any), On::Restarted(_)) => true,
                    (a, b) => a == b,
                }
        });
        assert!(!shadowed, "row {i} {:?} {:?} {:?} is shadowed", row.0, row.1, row.2);
    }
}

#[test]
fn undo_effects_run_before_the_state_is_recorded() {
    assert!(ResumeSource.before_recording());
    assert!(RetireSource.before_recording());
    assert!(DiscardIncoming.before_recording());
    for later in [ReleaseVm, ForgetVm, StartCooldown, Resolve, RecoverPostcopy, NotifyLost] {
        assert!(!later.before_recording(), "{later:?}");
    }
}

/// An event that matches a row's trigger.
fn example(on: On) -> Event {
    match on {
        On::Accepted => Event::Accepted,
        On::Committed => Event::Committed,
        On::ReceiptVerified => Event::ReceiptVerified,
        On::HandedOver => Event::HandedOver,
        On::DigestsMatched => Event::DigestsMatched,
        On::Resumed => Event::Resumed,
        On::PostcopyDone => Event::PostcopyDone,
        On::Failed => Event::Failed,
        On::PeerAborted => Event::PeerAborted,
        On::SourceLost => Event::SourceLost,
        On::Resolved(o) => Event::Resolved(o),
        On::Restarted(Found::Any) => Event::Restarted(ALIVE_PAUSED),
        On::Restarted(Found::Gone) => Event::Restarted(VmFacts::Gone),
        On::Restarted(Found::Running) => Event::Restarted(ALIVE_RUNNING),
        On::Restarted(Found::MigrationCompleted) => Event::Restarted(MIGRATED),
    }
}

/// Every row is taken exactly as written by an event that matches it.
#[test]
fn every_row_is_taken_as_written() {
    for (role, from, on, to, effects, outcome) in ROWS {
        let step = next(*role, *from, example(*on)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (step.to, step.effects, step.outcome),
            (*to, *effects, *outcome),
            "{role:?} {from:?} {on:?}"
        );
    }
}
