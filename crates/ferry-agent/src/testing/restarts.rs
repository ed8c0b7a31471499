//! The restart table row by row, with real agents restarted on the state a
//! crash left: a record in each state and the VM as the agent finds it.

use std::time::{Duration, Instant};

use ferry_session::{Event, MigrationState};
use ferry_types::{MigrationId, VmName};

use super::lab::{spec, vm, Lab};
use crate::records::{MigrationRecord, Role};

/// Write a record of a host1 → host2 migration of "web" that reached its
/// state by `path`, on host `n` (1: source, 2: destination).
fn put(lab: &Lab, n: usize, path: &[Event]) -> MigrationId {
    let role = if n == 1 { Role::Source } else { Role::Destination };
    let id = MigrationId::new();
    let mut rec = MigrationRecord::new(
        id,
        role,
        vm("web"),
        "host1".parse().unwrap(),
        "host2".parse().unwrap(),
    );
    for e in path {
        let step = ferry_session::next(role, rec.state(), *e).expect("a legal path");
        rec.enter(&step);
    }
    assert!(lab.host(n).agent.records.create(&mut rec).expect("record"));
    id
}

async fn vm_paused(lab: &Lab, n: usize, id: MigrationId, running: bool) {
    let b = &lab.host(n).backend;
    b.insert_running(spec("web")).await;
    if !running {
        b.pause(&vm("web")).await;
    }
    b.claim_for_test(&vm("web"), id).await;
}

/// The record's state once it stops changing for the given state.
async fn state_after(
    lab: &Lab,
    n: usize,
    id: MigrationId,
    leaving: Option<MigrationState>,
) -> MigrationRecord {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = lab.host(n).agent.records.get(&id).unwrap().unwrap();
        if Some(r.state()) != leaving || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn web(lab: &Lab, n: usize) -> Option<(bool, bool)> {
    // The effects after a recorded state run just after it: give them a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    lab.host(n)
        .backend
        .state(&VmName::try_from("web".to_owned()).unwrap())
        .await
        .map(|(r, b)| (r, b.is_some()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_restarts_before_the_commit_runs_its_vm_again() {
    let mut lab = Lab::new("").await;
    let id = put(&lab, 1, &[Event::Accepted]);
    vm_paused(&lab, 1, id, false).await;
    lab.restart(1).await;
    let r = state_after(&lab, 1, id, None).await;
    assert_eq!(r.state(), MigrationState::Aborted);
    assert!(r.error.as_deref().unwrap_or("").contains("runs here again"), "{:?}", r.error);
    assert_eq!(web(&lab, 1).await, Some((true, false)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_whose_vm_died_while_it_was_down_says_so() {
    let mut lab = Lab::new("").await;
    let id = put(&lab, 1, &[]);
    lab.restart(1).await;
    let r = state_after(&lab, 1, id, None).await;
    assert_eq!(r.state(), MigrationState::Aborted);
    assert!(r.error.as_deref().unwrap_or("").contains("QEMU is gone"), "{:?}", r.error);
}

/// Committed, then the agent died: in doubt after the restart, and it
/// asks the destination by itself. This destination never saw the
/// migration, so it records the id as aborted and signs that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_restarts_after_the_commit_asks_before_it_resumes() {
    let mut lab = Lab::new("").await;
    let id = put(&lab, 1, &[Event::Accepted, Event::Committed]);
    vm_paused(&lab, 1, id, false).await;
    lab.restart(1).await;
    let r = state_after(&lab, 1, id, Some(MigrationState::InDoubt)).await;
    assert_eq!(r.state(), MigrationState::Aborted, "{:?}", r.error);
    assert_eq!(web(&lab, 1).await, Some((true, false)));
    let tomb = lab.host(2).agent.records.get(&id).unwrap().expect("the id is recorded on host2");
    assert_eq!(tomb.state(), MigrationState::Aborted, "host2 can never accept this id later");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_restarts_before_resuming_discards_its_vm() {
    for path in [&[][..], &[Event::Accepted][..], &[Event::Accepted, Event::DigestsMatched][..]] {
        let mut lab = Lab::new("").await;
        let id = put(&lab, 2, path);
        vm_paused(&lab, 2, id, false).await;
        lab.restart(2).await;
        let r = state_after(&lab, 2, id, None).await;
        assert_eq!(r.state(), MigrationState::Aborted, "{path:?}");
        assert_eq!(web(&lab, 2).await, None, "{path:?}: the incoming VM must never run");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_restarts_after_resuming_keeps_the_running_vm() {
    let mut lab = Lab::new("").await;
    let id = put(&lab, 2, &[Event::Accepted, Event::DigestsMatched]);
    vm_paused(&lab, 2, id, true).await;
    lab.restart(2).await;
    assert_eq!(state_after(&lab, 2, id, None).await.state(), MigrationState::Completed);
    assert_eq!(web(&lab, 2).await, Some((true, false)));
}

/// Post-copy after the hand-over, and the source's half died while its
/// agent was down: the pages only it held are lost. Both sides end
/// `postcopy_lost`, and the destination's frozen half goes back to its
/// operator, who can stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_source_half_ends_postcopy_on_both_sides() {
    let mut lab = Lab::new("").await;
    let src = put(&lab, 1, &[Event::Accepted, Event::Committed, Event::HandedOver]);
    let dst =
        put_with_id(&lab, 2, src, &[Event::Accepted, Event::DigestsMatched, Event::HandedOver]);
    vm_paused(&lab, 2, dst, true).await;
    lab.restart(1).await;
    let r = state_after(&lab, 1, src, None).await;
    assert_eq!(r.state(), MigrationState::PostcopyLost);
    let d = state_after(&lab, 2, dst, Some(MigrationState::PostcopyActive)).await;
    assert_eq!(d.state(), MigrationState::PostcopyLost, "{:?}", d.error);
    assert_eq!(web(&lab, 2).await, Some((true, false)), "released to the operator");
    let told = state_after(&lab, 1, src, None).await;
    assert!(told.peer_told, "the source knows the destination was told");
    use crate::backend::VmBackend;
    lab.host(2).backend.stop(&vm("web")).await.expect("the operator may stop it now");
}

fn put_with_id(lab: &Lab, n: usize, id: MigrationId, path: &[Event]) -> MigrationId {
    let role = if n == 1 { Role::Source } else { Role::Destination };
    let mut rec = MigrationRecord::new(
        id,
        role,
        vm("web"),
        "host1".parse().unwrap(),
        "host2".parse().unwrap(),
    );
    for e in path {
        rec.enter(&ferry_session::next(role, rec.state(), *e).expect("a legal path"));
    }
    assert!(lab.host(n).agent.records.create(&mut rec).expect("record"));
    id
}
