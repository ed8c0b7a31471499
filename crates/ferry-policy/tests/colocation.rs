//! Co-location (the survey's C6) with the example policy set: a VM's
//! anti-affinity keeps other tenants away in both directions, on a migration
//! (ReceiveVm) and on `ferry vm start` (StartVm), and a refusal names the
//! resident VM it is about.

mod common;

use common::*;
use ferry_policy::{Action, Decision, PolicyEngine, Request};

/// Denied by `id`; returns the reason and the residents blamed.
fn forbidden_by(d: &Decision, id: &str) -> (String, Vec<String>) {
    match d {
        Decision::Deny { policies, reason, residents } => {
            assert!(policies.iter().any(|p| p == id), "denied, but not by {id}: {d:?}");
            assert!(reason.contains(id), "reason should name {id}: {reason}");
            (reason.clone(), residents.iter().map(|r| r.to_string()).collect())
        }
        Decision::Allow { .. } => panic!("expected deny by {id}, got {d:?}"),
    }
}

fn allowed_by(d: &Decision, id: &str) {
    assert!(d.is_allow() && d.policies().iter().any(|p| p == id), "expected allow by {id}: {d:?}");
}

/// host-b receives a VM of `tenant` from host-a.
fn receive(tenant: &str) -> Request {
    request(host("host-b"), Action::ReceiveVm, labels(tenant, 0))
}

/// host-b starts a VM of `tenant` on itself.
fn start(tenant: &str) -> Request {
    let mut r = request(host("host-b"), Action::StartVm, labels(tenant, 0));
    r.source = r.destination.clone();
    r
}

#[test]
fn a_resident_keeps_out_the_tenants_it_excludes() {
    let e = example_engine();
    for mut r in [receive("blue"), start("blue")] {
        r.resident_on_destination = vec![resident("green"), excluding("victim", "red", &["blue"])];
        let (reason, blamed) = forbidden_by(&e.authorize(&r), "resident-anti-co-location");
        assert!(reason.contains("`victim`") && reason.contains("tenant `red`"), "{reason}");
        assert_eq!(blamed, ["victim"], "only the excluding resident is to blame");
        // The mover's own rule does not fire: blue excludes nobody.
        assert!(!e.authorize(&r).policies().iter().any(|p| p == "anti-co-location"));

        // A tenant the resident does not exclude is placed.
        r.labels = labels("green", 0);
        let own = if r.action == Action::StartVm { "host-start-own" } else { "host-receive-own" };
        allowed_by(&e.authorize(&r), own);
    }
}

#[test]
fn a_mover_is_not_placed_next_to_a_tenant_it_excludes() {
    let e = example_engine();
    for mut r in [receive("blue"), start("blue")] {
        r.labels.anti_affinity = vec!["red".into()];
        r.resident_on_destination = vec![resident("green"), resident("red")];
        let (reason, blamed) = forbidden_by(&e.authorize(&r), "anti-co-location");
        assert!(reason.contains("`red-vm`"), "{reason}");
        assert_eq!(blamed, ["red-vm"]);
    }
}

#[test]
fn both_directions_at_once_name_every_resident_involved() {
    let e = example_engine();
    let mut r = receive("blue");
    r.labels.anti_affinity = vec!["red".into()];
    r.labels.allowed_zones = vec!["zone-9".into()];
    r.resident_on_destination = vec![
        excluding("victim", "green", &["blue"]),
        resident("red"),
        excluding("guard", "yellow", &["blue", "purple"]),
        resident("plain"),
    ];
    match e.authorize(&r) {
        Decision::Deny { policies, residents, reason } => {
            assert_eq!(policies, ["zone-allowed", "anti-co-location", "resident-anti-co-location"]);
            let names: Vec<_> = residents.iter().map(|n| n.as_str()).collect();
            assert_eq!(names, ["victim", "red-vm", "guard"], "{reason}");
            // The zone rule is about the VM and the host, not the residents.
            let zone = reason.split("`anti-co-location`").next().expect("zone part");
            assert!(!zone.contains("resident"), "{reason}");
            assert!(!reason.contains("plain-vm"), "{reason}");
        }
        d => panic!("expected deny, got {d:?}"),
    }
}

#[test]
fn a_rule_about_residents_together_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pair.cedar");
    std::fs::write(
        &path,
        r#"@id("hosts-receive") permit (principal is Host, action == Action::"ReceiveVm", resource);
@id("no-red-with-green") forbid (principal, action, resource is Vm)
when { context.resident_tenants.contains("red") && context.resident_tenants.contains("green") };
"#,
    )
    .expect("write");
    let e = PolicyEngine::load(&[path], &example_entities()).expect("loads");
    let mut r = receive("blue");
    r.resident_on_destination = vec![resident("red"), resident("green")];
    let (reason, blamed) = forbidden_by(&e.authorize(&r), "no-red-with-green");
    assert!(reason.contains("residents together"), "{reason}");
    assert!(blamed.is_empty(), "no single resident is to blame: {blamed:?}");
    r.resident_on_destination.pop();
    allowed_by(&e.authorize(&r), "hosts-receive");
}

#[test]
fn policies_see_every_resident_attribute() {
    // The schema gives residents the same attributes as the VM; a policy may
    // use any of them (here: a level-3 resident wants no other tenant).
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("own.cedar");
    std::fs::write(
        &path,
        r#"@id("hosts-receive") permit (principal is Host, action == Action::"ReceiveVm", resource);
@id("victim-alone") forbid (principal, action, resource is Vm)
when { context.residents.contains({name: "victim", tenant: "red", security_level: 3,
                                   allowed_zones: ["zone-1"], anti_affinity: ["nobody"]}) };
"#,
    )
    .expect("write");
    let e = PolicyEngine::load(&[path], &example_entities()).expect("loads");
    let mut r = receive("blue");
    let mut victim = excluding("victim", "red", &["nobody"]);
    victim.labels.security_level = 3;
    victim.labels.allowed_zones = vec!["zone-1".into()];
    r.resident_on_destination = vec![victim.clone()];
    let (_, blamed) = forbidden_by(&e.authorize(&r), "victim-alone");
    assert_eq!(blamed, ["victim"]);
    victim.labels.security_level = 2;
    r.resident_on_destination = vec![victim];
    allowed_by(&e.authorize(&r), "hosts-receive");
}

#[test]
fn a_host_starts_vms_only_on_itself() {
    let e = example_engine();
    allowed_by(&e.authorize(&start("blue")), "host-start-own");
    // host-a cannot decide a start on host-b.
    let mut r = start("blue");
    r.principal = host("host-a");
    assert!(!e.authorize(&r).is_allow());
    // A start is not a migration: source and destination are one host.
    let mut r = start("blue");
    r.source = "host-a".parse().expect("host");
    assert!(!e.authorize(&r).is_allow());
}

#[test]
fn the_source_has_no_residents_and_is_unaffected() {
    let e = example_engine();
    let mut l = labels("blue", 0);
    l.anti_affinity = vec!["red".into()];
    allowed_by(&e.authorize(&request(host("host-a"), Action::SendVm, l)), "host-send-own");
}

#[test]
fn explain_lists_the_residents_and_the_one_that_blocked() {
    let e = example_engine();
    let mut r = receive("blue");
    r.resident_on_destination = vec![resident("green"), excluding("victim", "red", &["blue"])];
    let text = e.explain(&r);
    assert!(text.starts_with("decision: DENY"), "{text}");
    assert!(text.contains("resident: 2 VM(s) on the destination"), "{text}");
    assert!(text.contains("forbid resident-anti-co-location"), "{text}");
    let blocked = text.split("blocked by resident(s):").nth(1).expect("blocked section");
    assert!(blocked.contains("`victim`: tenant `red`"), "{text}");
    assert!(!blocked.contains("green-vm"), "{text}");
}
