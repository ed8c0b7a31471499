//! The protocol's outcomes with two real agents and fake VMs: each test
//! asserts typed states on both hosts and where the VM runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_session::MigrationState;
use ferry_types::VmName;

use super::lab::{spec, vm, Lab};
use crate::backend::fake::{FakeBackend, Hook};
use crate::error::Error;
use crate::plan::TransferPlan;
use crate::protocol::ErrorKind;
use crate::records::{MigrationRecord, Role};

async fn with_vm(lab: &Lab, name: &str) -> VmName {
    lab.host(1).backend.insert_running(spec(name)).await;
    vm(name)
}

/// The one record of a migration on host `n`.
fn record(lab: &Lab, n: usize) -> MigrationRecord {
    let all = lab.host(n).agent.records.all().expect("records");
    let mut recs = all;
    assert_eq!(recs.len(), 1, "host{n} records: {recs:?}");
    recs.remove(0)
}

/// Wait until host `n`'s record leaves `state`.
async fn settled_from(
    lab: &Lab,
    n: usize,
    state: MigrationState,
    within: Duration,
) -> MigrationRecord {
    let deadline = Instant::now() + within;
    loop {
        let r = record(lab, n);
        if r.state() != state || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (running, held by a migration) on host `n`, or None if absent.
async fn vm_on(lab: &Lab, n: usize, name: &VmName) -> Option<(bool, bool)> {
    lab.host(n).backend.state(name).await.map(|(running, busy)| (running, busy.is_some()))
}

/// `vm_on` once it equals `want`, or as it stands after two seconds: the
/// effects that follow a recorded state (releasing the VM) run just after.
async fn vm_becomes(
    lab: &Lab,
    n: usize,
    name: &VmName,
    want: Option<(bool, bool)>,
) -> Option<(bool, bool)> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let now = vm_on(lab, n, name).await;
        if now == want || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn cut_link(lab: &Lab) -> Hook {
    let link = lab.link.clone();
    Arc::new(move || {
        let link = link.clone();
        Box::pin(async move { link.cut().await })
    })
}

fn audit_outcome(lab: &Lab, id: &ferry_types::MigrationId) -> String {
    let ca = ferry_audit::CaTrust::load(&lab.dir.path().join("ca/ca.pem")).expect("CA");
    let logs: Vec<_> = (1..=2).map(|n| lab.host(n).agent.cfg.audit_log_path()).collect();
    let cross = ferry_audit::cross_check(&logs[0], &logs[1], &ca).expect("cross-check");
    let m = cross
        .migrations
        .iter()
        .find(|m| m.migration_id == id.to_string())
        .expect("migration in logs");
    m.outcome.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_completes_and_the_vm_runs_once() {
    let lab = Lab::new("").await;
    let web = with_vm(&lab, "web").await;
    let done = lab.migrate("web").await.expect("started");
    assert!(done.error.is_none(), "{:?}", done.error.map(|e| crate::report(&e)));
    assert_eq!(done.record.state(), MigrationState::Completed);
    let dest = record(&lab, 2);
    assert_eq!(dest.state(), MigrationState::Completed);
    // The gate's hold is measured where it happens: on the destination only.
    assert!(dest.gate_hold_ms.is_some() && done.record.gate_hold_ms.is_none());
    assert_eq!(vm_on(&lab, 1, &web).await, None, "the source copy was retired");
    assert_eq!(vm_on(&lab, 2, &web).await, Some((true, false)), "runs on host2, released");
    assert_eq!(done.record.bytes, crate::backend::fake::MEMORY as u64);
    assert_eq!(audit_outcome(&lab, &done.record.id), "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_streams_are_joined_and_committed_together() {
    let lab = Lab::new("").await;
    let web = with_vm(&lab, "web").await;
    let done = lab.migrate_with("web", TransferPlan::new(3, false).unwrap()).await.unwrap();
    assert_eq!(
        done.record.state(),
        MigrationState::Completed,
        "{:?}",
        done.error.map(|e| crate::report(&e))
    );
    assert_eq!(record(&lab, 2).streams, 3);
    assert_eq!(vm_on(&lab, 2, &web).await, Some((true, false)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admission_refusal_is_recorded_on_both_sides_and_the_vm_stays() {
    let lab = Lab::with("", "[admission]\ncapacity_memory_mib = 16\n").await;
    let web = with_vm(&lab, "web").await;
    let done = lab.migrate("web").await.unwrap();
    let e = done.error.expect("refused");
    assert!(matches!(e, Error::Refused { .. }), "{}", crate::report(&e));
    assert!(crate::report(&e).contains("admission control"), "{}", crate::report(&e));
    assert_eq!(done.record.state(), MigrationState::Aborted);
    let dest = record(&lab, 2);
    assert_eq!((dest.role, dest.state()), (Role::Destination, MigrationState::Aborted));
    assert!(dest.error.as_deref().unwrap_or("").starts_with("admission:"), "{:?}", dest.error);
    assert_eq!(vm_on(&lab, 1, &web).await, Some((true, false)));
    assert_eq!(vm_on(&lab, 2, &web).await, None, "nothing launched on host2");
    // The destination's log says it ended: a refusal, not an unfinished migration.
    assert_eq!(audit_outcome(&lab, &done.record.id), "refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_platform_is_refused_in_both_directions() {
    let lab = Lab::new("").await;
    let web = with_vm(&lab, "web").await;
    lab.host(2).tampered.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = lab.migrate("web").await.unwrap().error.expect("refused");
    assert!(
        matches!(&e, Error::Attestation { host, .. } if host.as_str() == "host2"),
        "{}",
        crate::report(&e)
    );
    assert!(crate::report(&e).contains("PCR 7"), "{}", crate::report(&e));
    lab.host(2).tampered.store(false, std::sync::atomic::Ordering::SeqCst);
    lab.host(1).tampered.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = lab.migrate("web").await.unwrap().error.expect("refused");
    assert!(
        matches!(&e, Error::Refused { reason, .. } if reason.contains("source host1 failed attestation")),
        "{}",
        crate::report(&e)
    );
    assert_eq!(vm_on(&lab, 1, &web).await, Some((true, false)));
    assert_eq!(vm_on(&lab, 2, &web).await, None);
}

/// The receipt is lost (the link is cut as the destination resumes the
/// VM): the source goes in doubt, asks again by itself and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_receipt_settles_itself_as_completed() {
    let lab = Lab::new("").await;
    let web = with_vm(&lab, "web").await;
    FakeBackend::set(&lab.host(2).backend.0.hooks.before_gate, cut_link(&lab));
    let done = lab.migrate("web").await.unwrap();
    assert_eq!(
        done.record.state(),
        MigrationState::InDoubt,
        "{:?}",
        done.error.map(|e| crate::report(&e))
    );
    let src = settled_from(&lab, 1, MigrationState::InDoubt, Duration::from_secs(10)).await;
    assert_eq!(src.state(), MigrationState::Completed, "{:?}", src.error);
    assert!(src.receipt.is_some(), "completed only on the destination's receipt");
    assert_eq!(vm_becomes(&lab, 1, &web, None).await, None);
    assert_eq!(vm_on(&lab, 2, &web).await, Some((true, false)));
    assert_eq!(audit_outcome(&lab, &src.id), "completed");
}

/// The destination refuses the stream after the Commit and its Abort is
/// lost (what a bit flipped late in the stream does): the source asks by
/// itself, gets the destination's signed "aborted", and runs the VM again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_abort_after_the_commit_settles_itself_and_the_source_resumes() {
    let lab = Lab::new("").await;
    let web = with_vm(&lab, "web").await;
    let backend = &lab.host(2).backend;
    FakeBackend::set(&backend.0.hooks.before_loaded, cut_link(&lab));
    backend.0.hooks.fail_load.store(true, std::sync::atomic::Ordering::SeqCst);
    let done = lab.migrate("web").await.unwrap();
    assert_eq!(done.record.state(), MigrationState::InDoubt);
    assert_eq!(vm_on(&lab, 1, &web).await, Some((false, true)), "paused while in doubt");
    let src = settled_from(&lab, 1, MigrationState::InDoubt, Duration::from_secs(10)).await;
    assert_eq!(src.state(), MigrationState::Aborted, "{:?}", src.error);
    let again = vm_becomes(&lab, 1, &web, Some((true, false))).await;
    assert_eq!(again, Some((true, false)), "runs on the source again");
    assert_eq!(vm_on(&lab, 2, &web).await, None);
    assert_eq!(record(&lab, 2).state(), MigrationState::Aborted);
}

/// While the destination cannot be reached the VM stays paused; every
/// attempt is counted; once it is back the migration settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_destination_keeps_the_vm_paused_until_it_answers() {
    let lab = Lab::new("").await;
    let web = with_vm(&lab, "web").await;
    let backend = &lab.host(2).backend;
    let link = lab.link.clone();
    let cut_and_close: Hook = Arc::new(move || {
        let link = link.clone();
        Box::pin(async move {
            link.refuse(true);
            link.cut().await;
        })
    });
    FakeBackend::set(&backend.0.hooks.before_loaded, cut_and_close);
    backend.0.hooks.fail_load.store(true, std::sync::atomic::Ordering::SeqCst);
    let done = lab.migrate("web").await.unwrap();
    let e = done.error.expect("in doubt");
    assert_eq!(e.kind(), ErrorKind::Peer, "{}", crate::report(&e));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(record(&lab, 1).state(), MigrationState::InDoubt);
    assert_eq!(vm_on(&lab, 1, &web).await, Some((false, true)), "paused, held");
    let metrics = lab.host(1).agent.metrics.render(1, 0);
    assert!(
        metrics.contains("ferry_resolve_attempts_total{result=\"unsettled\"} 2")
            || metrics.contains("ferry_resolve_attempts_total{result=\"unsettled\"} 3")
            || metrics.contains("ferry_resolve_attempts_total{result=\"unsettled\"} 4"),
        "{metrics}"
    );
    lab.link.refuse(false);
    let src = settled_from(&lab, 1, MigrationState::InDoubt, Duration::from_secs(10)).await;
    assert_eq!(src.state(), MigrationState::Aborted, "{:?}", src.error);
    assert_eq!(vm_becomes(&lab, 1, &web, Some((true, false))).await, Some((true, false)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_just_moved_is_held_back_by_its_cooldown() {
    let lab = Lab::new("").await;
    with_vm(&lab, "web").await;
    assert!(lab.migrate("web").await.unwrap().error.is_none());
    let agent = lab.host(2).agent.clone();
    let operator = "admin".parse().unwrap();
    let who = crate::session::source::Requester { operator: &operator, role: "admin" };
    let plan = TransferPlan::new(1, false).unwrap();
    let e = crate::session::source::start(agent, vm("web"), "host1".parse().unwrap(), who, plan)
        .await
        .err()
        .expect("denied");
    assert_eq!(e.kind(), ErrorKind::Denied);
    assert!(crate::report(&e).contains("cooldown"), "{}", crate::report(&e));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_cannot_be_served_say_why() {
    let lab = Lab::new("").await;
    with_vm(&lab, "web").await;
    let agent = lab.host(1).agent.clone();
    let operator = "admin".parse().unwrap();
    let plan = TransferPlan::new(1, false).unwrap();
    let start = |vm_name: &str, to: &str| {
        let who = crate::session::source::Requester { operator: &operator, role: "admin" };
        crate::session::source::start(agent.clone(), vm(vm_name), to.parse().unwrap(), who, plan)
    };
    let e = start("web", "host1").await.err().expect("self");
    assert!(matches!(e, Error::SelfDestination { .. }), "{e}");
    assert!(e.to_string().contains("not host1"), "{e}");
    let e = start("db", "host2").await.err().expect("no vm");
    assert!(matches!(e, Error::NoSuchVm { .. }), "{e}");
    let e = start("web", "host9").await.err().expect("unknown peer");
    assert!(matches!(e, Error::UnknownPeer(_)), "{e}");
    assert_eq!(e.kind(), ErrorKind::Request);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vtpm_vm_is_offered_only_to_a_host_that_can_host_its_vtpm() {
    let lab = Lab::new("").await;
    let mut with_tpm = spec("web");
    with_tpm.tpm = ferry_vmm::TpmModel::Crb;
    lab.host(1).backend.insert_running(with_tpm).await;
    let web = vm("web");
    let done = lab.migrate("web").await.unwrap();
    let e = done.error.expect("refused at pre-flight");
    assert!(matches!(e, Error::VtpmPreflight { .. }), "{}", crate::report(&e));
    let why = crate::report(&e);
    assert!(why.contains("host2 cannot host this VM's crb vTPM: it has no vTPM support"), "{why}");
    assert_eq!(done.record.state(), MigrationState::Aborted);
    assert_eq!(done.record.bytes, 0);
    let host2 = lab.host(2).agent.records.all().expect("records");
    assert!(host2.is_empty(), "host2 saw an offer: {host2:?}");
    assert_eq!(vm_on(&lab, 1, &web).await, Some((true, false)), "the VM stays, released");
    let ca = ferry_audit::CaTrust::load(&lab.dir.path().join("ca/ca.pem")).expect("CA");
    let logs: Vec<_> = (1..=2).map(|n| lab.host(n).agent.cfg.audit_log_path()).collect();
    let cross = ferry_audit::cross_check(&logs[0], &logs[1], &ca).expect("cross-check");
    // Nothing signed was sent: the audit logs agree that host2 had no part.
    let only = format!("{} appears only in", done.record.id);
    let warning = cross.warnings.iter().find(|w| w.contains(&only)).expect("a one-sided note");
    assert!(warning.contains("expected, it ended before any signed"), "{warning}");

    // Once host2 can host it, the same VM moves, and both records say vTPM.
    *lab.host(2).backend.0.vtpm.lock().unwrap() = Some(ferry_vmm::VtpmSupport {
        swtpm: Some("0.7.1".into()),
        tpm2: true,
        models: vec![ferry_vmm::TpmModel::Crb],
        problem: None,
    });
    let done = lab.migrate("web").await.unwrap();
    assert!(done.error.is_none(), "{:?}", done.error.map(|e| crate::report(&e)));
    assert_eq!(done.record.tpm, ferry_vmm::TpmModel::Crb);
    assert_eq!(record(&lab, 2).tpm, ferry_vmm::TpmModel::Crb);
    assert_eq!(vm_on(&lab, 2, &web).await, Some((true, false)));
}
