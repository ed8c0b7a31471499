//! Each rule of the example policy set (docs/policy/ferry.cedar), decided by
//! the real Cedar engine: one allowed and one denied case per rule.

mod common;

use common::*;
use ferry_policy::{Action, Decision, PolicyEngine};

fn allowed_by(d: &Decision, id: &str) {
    match d {
        Decision::Allow { policies } => {
            assert!(policies.iter().any(|p| p == id), "allowed, but not by {id}: {d:?}")
        }
        Decision::Deny { .. } => panic!("expected allow by {id}, got {d:?}"),
    }
}

fn forbidden_by(d: &Decision, id: &str) {
    match d {
        Decision::Deny { policies, reason, .. } => {
            assert!(policies.iter().any(|p| p == id), "denied, but not by {id}: {d:?}");
            assert!(reason.contains(id), "reason should name {id}: {reason}");
        }
        Decision::Allow { .. } => panic!("expected deny by {id}, got {d:?}"),
    }
}

/// A deny that no forbid caused: nothing permitted the request.
fn default_denied(d: &Decision) -> String {
    match d {
        Decision::Deny { policies, reason, .. } => {
            assert!(policies.is_empty(), "expected default deny, got {d:?}");
            reason.clone()
        }
        Decision::Allow { .. } => panic!("expected default deny, got {d:?}"),
    }
}

#[test]
fn admin_may_migrate_any_vm_but_not_without_the_role() {
    let e = example_engine();
    // alice holds "admin"; the VM belongs to a tenant she does not look after.
    let d =
        e.authorize(&request(operator("alice", "admin"), Action::MigrateVm, labels("green", 1)));
    allowed_by(&d, "admin-migrate-any");

    // bob claims "admin" but the entities file does not give him that role.
    let d = e.authorize(&request(operator("bob", "admin"), Action::MigrateVm, labels("green", 1)));
    let reason = default_denied(&d);
    assert!(reason.contains("operator `bob` acting as `admin`"), "{reason}");
    assert!(reason.contains("admin-migrate-any"), "reason lists the candidates: {reason}");
}

#[test]
fn operator_may_migrate_only_own_tenant() {
    let e = example_engine();
    let d =
        e.authorize(&request(operator("bob", "operator"), Action::MigrateVm, labels("green", 1)));
    allowed_by(&d, "operator-migrate-own-tenant");

    let d =
        e.authorize(&request(operator("bob", "operator"), Action::MigrateVm, labels("blue", 1)));
    let reason = default_denied(&d);
    assert!(reason.contains("tenant `blue`"), "{reason}");
}

#[test]
fn destination_must_be_in_allowed_zones() {
    let e = example_engine();
    let mut l = labels("blue", 1);
    l.allowed_zones = vec!["zone-1".into()];
    let d = e.authorize(&request(operator("alice", "admin"), Action::MigrateVm, l.clone()));
    allowed_by(&d, "admin-migrate-any");

    // host-c is in zone-2.
    let mut r = request(operator("alice", "admin"), Action::MigrateVm, l);
    r.destination = "host-c".parse().expect("host");
    forbidden_by(&e.authorize(&r), "zone-allowed");

    // No allowed_zones means no zone restriction.
    let mut r = request(operator("alice", "admin"), Action::MigrateVm, labels("blue", 1));
    r.destination = "host-c".parse().expect("host");
    allowed_by(&e.authorize(&r), "admin-migrate-any");
}

#[test]
fn hosts_need_trust_at_least_the_security_level() {
    let e = example_engine();
    // host-b (trust 2) receives a level-2 VM from host-a (trust 3).
    let d = e.authorize(&request(host("host-b"), Action::ReceiveVm, labels("blue", 2)));
    allowed_by(&d, "host-receive-own");
    let d = e.authorize(&request(host("host-a"), Action::SendVm, labels("blue", 2)));
    allowed_by(&d, "host-send-own");

    // A level-3 VM: host-b's trust 2 is too low, on either side of the deal.
    let d = e.authorize(&request(host("host-b"), Action::ReceiveVm, labels("blue", 3)));
    forbidden_by(&d, "host-trust");
    let d = e.authorize(&request(host("host-a"), Action::SendVm, labels("blue", 3)));
    forbidden_by(&d, "host-trust");
    // ...and the operator's request is refused up front as well.
    let d = e.authorize(&request(operator("alice", "admin"), Action::MigrateVm, labels("blue", 3)));
    forbidden_by(&d, "host-trust");
}

#[test]
fn hosts_speak_only_for_their_own_side() {
    let e = example_engine();
    // host-a is the source, so it may not claim to receive.
    let d = e.authorize(&request(host("host-a"), Action::ReceiveVm, labels("blue", 0)));
    default_denied(&d);
    // host-c is not part of this migration at all.
    let d = e.authorize(&request(host("host-c"), Action::SendVm, labels("blue", 0)));
    default_denied(&d);
}

#[test]
fn postcopy_only_for_low_security() {
    let e = example_engine();
    let mut r = request(operator("alice", "admin"), Action::MigrateVm, labels("blue", 1));
    r.postcopy = true;
    allowed_by(&e.authorize(&r), "admin-migrate-any");

    r.labels.security_level = 2;
    forbidden_by(&e.authorize(&r), "postcopy-low-security-only");
    // The destination refuses it too, whatever the source decided.
    let mut r = request(host("host-b"), Action::ReceiveVm, labels("blue", 2));
    r.postcopy = true;
    forbidden_by(&e.authorize(&r), "postcopy-low-security-only");
}

#[test]
fn anti_co_location_on_receive() {
    let e = example_engine();
    let mut l = labels("blue", 1);
    l.anti_affinity = vec!["red".into()];
    let mut r = request(host("host-b"), Action::ReceiveVm, l);
    r.resident_on_destination = vec![resident("green"), resident("blue")];
    allowed_by(&e.authorize(&r), "host-receive-own");

    r.resident_on_destination.push(resident("red"));
    forbidden_by(&e.authorize(&r), "anti-co-location");
}

#[test]
fn every_matching_forbid_is_named() {
    let e = example_engine();
    let mut l = labels("blue", 3);
    l.allowed_zones = vec!["zone-9".into()];
    let mut r = request(operator("alice", "admin"), Action::MigrateVm, l);
    r.postcopy = true;
    match e.authorize(&r) {
        Decision::Deny { policies, .. } => assert_eq!(
            policies,
            ["zone-allowed", "host-trust", "postcopy-low-security-only"],
            "in file order"
        ),
        d => panic!("expected deny, got {d:?}"),
    }
}

#[test]
fn default_deny_when_no_policy_matches() {
    // Only the forbids of the example: nothing is ever permitted.
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(docs().join("ferry.cedar")).expect("read");
    let forbids: String = text
        .split("\n\n")
        .filter(|chunk| chunk.contains("forbid ("))
        .collect::<Vec<_>>()
        .join("\n\n");
    let path = dir.path().join("forbids.cedar");
    std::fs::write(&path, forbids).expect("write");
    let e = PolicyEngine::load(&[path], &example_entities()).expect("load");
    assert_eq!(e.policies().len(), 6);
    let reason = default_denied(&e.authorize(&request(
        operator("alice", "admin"),
        Action::MigrateVm,
        labels("blue", 0),
    )));
    assert!(reason.contains("no permit policy covers MigrateVm"), "{reason}");

    // An empty policy set denies everything as well.
    let e = PolicyEngine::load(&[], &example_entities()).expect("load");
    default_denied(&e.authorize(&request(host("host-b"), Action::ReceiveVm, labels("blue", 0))));
}

#[test]
fn unknown_parties_and_bad_labels_are_denied() {
    let e = example_engine();
    let reason = default_denied(&e.authorize(&request(
        operator("mallory", "admin"),
        Action::MigrateVm,
        labels("blue", 0),
    )));
    assert!(reason.contains("mallory") && reason.contains("not in the entities file"), "{reason}");

    let mut r = request(operator("alice", "admin"), Action::MigrateVm, labels("blue", 0));
    r.destination = "host-x".parse().expect("host");
    let reason = default_denied(&e.authorize(&r));
    assert!(reason.contains("destination host `host-x`"), "{reason}");

    let reason = default_denied(&e.authorize(&request(
        operator("alice", "admin"),
        Action::MigrateVm,
        labels("blue", 9),
    )));
    assert!(reason.contains("above the maximum"), "{reason}");

    // A host asking for an operator's action does not fit the schema.
    let reason = default_denied(&e.authorize(&request(
        host("host-a"),
        Action::MigrateVm,
        labels("blue", 0),
    )));
    assert!(reason.contains("schema"), "{reason}");
}

#[test]
fn explain_names_decision_and_policies() {
    let e = example_engine();
    let mut r = request(operator("alice", "admin"), Action::MigrateVm, labels("blue", 2));
    r.postcopy = true;
    let text = e.explain(&r);
    assert!(text.starts_with("decision: DENY"), "{text}");
    assert!(text.contains("forbid postcopy-low-security-only"), "{text}");
    assert!(text.contains("`host-b`: zone \"zone-1\", trust level 2"), "{text}");

    let text =
        e.explain(&request(operator("bob", "operator"), Action::MigrateVm, labels("blue", 0)));
    assert!(text.starts_with("decision: DENY"), "{text}");
    assert!(text.contains("permit policies for MigrateVm (none matched)"), "{text}");
    assert!(text.contains("permit operator-migrate-own-tenant"), "{text}");

    let text =
        e.explain(&request(operator("bob", "operator"), Action::MigrateVm, labels("green", 0)));
    assert!(text.starts_with("decision: ALLOW"), "{text}");
    println!("{text}");
}

#[test]
fn a_forbid_that_fails_to_evaluate_denies() {
    // Cedar skips policies whose evaluation errors; for a forbid that would
    // mean "allow". The engine turns any evaluation error into a deny.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("overflow.cedar");
    std::fs::write(
        &path,
        r#"@id("all-ops") permit (principal is Operator, action, resource);
@id("overflowing") forbid (principal, action, resource is Vm)
when { context.now + 9223372036854775807 > 0 };
"#,
    )
    .expect("write");
    let e = PolicyEngine::load(&[path], &example_entities())
        .expect("validates: overflow is a run-time error");
    match e.authorize(&request(operator("bob", "operator"), Action::MigrateVm, labels("green", 0)))
    {
        Decision::Deny { reason, .. } => {
            assert!(
                reason.contains("evaluation failed") && reason.contains("overflowing"),
                "{reason}"
            )
        }
        d => panic!("expected deny, got {d:?}"),
    }
}

#[test]
fn only_security_level_zero_moves_between_unattested_platforms() {
    let e = example_engine();
    for (source_attested, destination_attested) in [(false, true), (true, false), (false, false)] {
        let mut req = request(operator("alice", "admin"), Action::MigrateVm, labels("green", 1));
        req.source_attested = source_attested;
        req.destination_attested = destination_attested;
        forbidden_by(&e.authorize(&req), "attested-platforms");
        // The same move of a level-0 VM is for the other rules to decide.
        req.labels = labels("green", 0);
        allowed_by(&e.authorize(&req), "admin-migrate-any");
    }
    let req = request(operator("alice", "admin"), Action::MigrateVm, labels("green", 1));
    allowed_by(&e.authorize(&req), "admin-migrate-any");
}
