//! Two hosts' logs against each other, and evidence bundles.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use common::{cluster, exchange, migrate, read_lines, write_lines, Cluster};
use ferry_audit::{
    cross_check, export_bundle, verify_bundle, verify_log, AuditLog, EvidenceBundle, MessageFault,
    VerifyError,
};

const M1: &str = "0190f5c2-0000-7000-8000-000000000001";
const M2: &str = "0190f5c2-0000-7000-8000-000000000002";

/// Two migrations src -> dst: M1 complete, then M2 complete.
fn two_logs(c: &Cluster) -> (PathBuf, PathBuf) {
    let (sp, dp) = (c.path("src.log"), c.path("dst.log"));
    let mut s = AuditLog::open(&sp, c.src_signer()).unwrap();
    let mut d = AuditLog::open(&dp, c.dst_signer()).unwrap();
    migrate(&c.ca, &mut s, &mut d, M1, 4);
    migrate(&c.ca, &mut s, &mut d, M2, 4);
    (sp, dp)
}

fn disagreement(r: Result<ferry_audit::CrossSummary, VerifyError>) -> (String, String) {
    match r {
        Err(VerifyError::Disagree { migration_id, why }) => (migration_id, why),
        Err(e) => panic!("unexpected {e}"),
        Ok(s) => panic!("cross-check passed: {s:?}"),
    }
}

#[test]
fn matching_logs_cross_check() {
    let c = cluster();
    let (sp, dp) = two_logs(&c);
    let s = cross_check(&sp, &dp, &c.ca).unwrap();
    assert_eq!(s.migrations.len(), 2);
    for m in &s.migrations {
        assert_eq!(m.outcome, "completed");
        assert_eq!(m.agreed, ["offer", "accept", "commit", "receipt"]);
        assert_eq!(m.source.as_deref(), Some("spiffe://ferry.test/host/src-host"));
        assert_eq!(m.destination.as_deref(), Some("spiffe://ferry.test/host/dst-host"));
    }
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    assert!(matches!(cross_check(&sp, &sp, &c.ca), Err(VerifyError::CrossCheck(_))));
}

#[test]
fn source_log_cut_back_is_caught_by_the_destination_log() {
    // The source drops its last 4 records (all of M2): a valid
    // log on its own, but the destination holds M2's Commit signed by the source.
    let c = cluster();
    let (sp, dp) = two_logs(&c);
    let mut lines = read_lines(&sp);
    lines.truncate(lines.len() - 4);
    write_lines(&sp, &lines);
    verify_log(&sp, &c.ca).unwrap();
    let (mid, why) = disagreement(cross_check(&sp, &dp, &c.ca));
    assert_eq!(mid, M2);
    assert!(
        why.contains("\"commit\" message signed by spiffe://ferry.test/host/src-host"),
        "{why}"
    );
    assert!(why.contains("line"), "{why}");
}

#[test]
fn source_log_cut_back_below_a_signed_log_head_is_caught() {
    // Cut the source back to before M2 entirely: the destination's copy of
    // M2's Offer carries the source's log_head, which the source log no
    // longer reaches.
    let c = cluster();
    let (sp, dp) = two_logs(&c);
    let mut lines = read_lines(&sp);
    lines.truncate(5); // genesis + the 4 records of M1
    write_lines(&sp, &lines);
    let (mid, why) = disagreement(cross_check(&sp, &dp, &c.ca));
    assert_eq!(mid, M2);
    assert!(why.contains("does not contain") || why.contains("cut back"), "{why}");
}

#[test]
fn lost_receipt_at_the_source_tail_is_a_warning_not_proof() {
    // The last source record (Receipt received) dropped: the source may
    // simply have crashed before receiving it ("in doubt"), so this is
    // reported, not treated as tampering.
    let c = cluster();
    let (sp, dp) = two_logs(&c);
    let mut lines = read_lines(&sp);
    lines.pop();
    write_lines(&sp, &lines);
    let s = cross_check(&sp, &dp, &c.ca).unwrap();
    assert!(s.warnings.iter().any(|w| w.contains(M2) && w.contains("Receipt")), "{:?}", s.warnings);
}

/// A migration in one log only: expected when it ended before any signed
/// message left the host (a denied request), or involved a third host; not
/// when the host signed an Offer the peer never recorded.
#[test]
fn one_sided_migrations_say_whether_that_is_expected() {
    let c = cluster();
    let (sp, dp) = two_logs(&c);
    let mut s = AuditLog::open(&sp, c.src_signer()).unwrap();
    let denied = |mid: &str, peer: &str| ferry_audit::AuditEvent {
        kind: "denied".into(),
        migration_id: Some(mid.into()),
        vm: Some("vm-1".into()),
        peer: Some(peer.into()),
        detail: serde_json::json!({ "reason": "policy" }),
        signed: None,
    };
    let (m3, m4) = ("0190f5c2-0000-7000-8000-000000000003", "0190f5c2-0000-7000-8000-000000000004");
    s.append(&denied(m3, "dst-host")).unwrap();
    s.append(&denied(m4, "third-host")).unwrap();
    drop(s);
    let w = cross_check(&sp, &dp, &c.ca).unwrap().warnings;
    let about = |m: &str| w.iter().find(|x| x.contains(m)).cloned().unwrap_or_default();
    assert!(about(m3).contains("(denied): expected, it ended before any signed message"), "{w:?}");
    assert!(about(m4).contains("expected, its peer is third-host"), "{w:?}");

    // An Offer signed and logged by the source that the destination never recorded.
    let mut lines = read_lines(&dp);
    lines.truncate(5); // genesis + M1
    write_lines(&dp, &lines);
    let mut s_lines = read_lines(&sp);
    s_lines.truncate(6); // genesis, M1, and the Offer of M2
    write_lines(&sp, &s_lines);
    let w = cross_check(&sp, &dp, &c.ca).unwrap().warnings;
    let m2 = w.iter().find(|x| x.contains(M2)).cloned().unwrap_or_default();
    assert!(m2.contains("although it holds a signed \"offer\""), "{w:?}");
}

#[test]
fn destination_log_rewritten_with_another_commit_is_caught() {
    // The destination re-writes its whole log claiming it got different
    // digests: it cannot forge the source's signature, so it can only drop
    // the source's Commit, which the source's log proves it received.
    let c = cluster();
    let (sp, _) = two_logs(&c);
    let dp = c.path("dst2.log");
    let mut s2 = AuditLog::open(&c.path("scratch.log"), c.src_signer()).unwrap();
    let mut d = AuditLog::open(&dp, c.dst_signer()).unwrap();
    migrate(&c.ca, &mut s2, &mut d, M1, 2); // offer, accept only... with new bodies
    let r = cross_check(&sp, &dp, &c.ca);
    assert!(matches!(r, Err(VerifyError::Disagree { .. })), "{r:?}");
}

fn bundle(c: &Cluster) -> EvidenceBundle {
    let (sp, dp) = two_logs(c);
    export_bundle(&[sp, dp], M1).unwrap()
}

fn message_failure(b: &EvidenceBundle, c: &Cluster) -> (String, MessageFault) {
    match verify_bundle(b, &c.ca) {
        Err(VerifyError::Message { what, fault }) => (what, fault),
        Err(e) => panic!("unexpected {e}"),
        Ok(s) => panic!("bad bundle verified: {s:?}"),
    }
}

#[test]
fn bundle_verifies_offline_with_only_the_ca() {
    let c = cluster();
    let b = bundle(&c);
    // Through JSON, as it would travel, checked against the CA file alone.
    let text = serde_json::to_string_pretty(&b).unwrap();
    let b: EvidenceBundle = serde_json::from_str(&text).unwrap();
    let ca = ferry_audit::CaTrust::load(&c.ca_dir.cert_path()).unwrap();
    let s = verify_bundle(&b, &ca).unwrap();
    assert_eq!(s.messages, ["offer", "accept", "commit", "receipt"]);
    assert_eq!(s.outcome, "completed");
    assert_eq!(s.hosts.len(), 2);
    assert_eq!(s.records, 2 * (4 + 1)); // 4 records per log + the genesis carrying the cert
    assert!(!text.contains(M2), "M2 leaked into M1's bundle");
    assert!(matches!(
        export_bundle(&[c.path("src.log")], "nope"),
        Err(ferry_audit::AuditError::NoSuchMigration { .. })
    ));
}

#[test]
fn forged_signature_in_bundle_names_the_message() {
    let c = cluster();
    let mut b = bundle(&c);
    b.messages[2].body = b.messages[2].body.replace(&"00".repeat(32), &"01".repeat(32));
    let (what, fault) = message_failure(&b, &c);
    assert_eq!(what, "message #2 (commit)");
    assert_eq!(fault, MessageFault::BadSignature);
}

#[test]
fn signature_swapped_between_messages_names_the_message() {
    let c = cluster();
    let mut b = bundle(&c);
    let (offer_sig, commit_sig) =
        (b.messages[0].signature.clone(), b.messages[2].signature.clone());
    b.messages[0].signature = commit_sig;
    b.messages[2].signature = offer_sig;
    let (what, fault) = message_failure(&b, &c);
    assert_eq!(what, "message #0 (offer)");
    assert_eq!(fault, MessageFault::BadSignature);
    // Swapping signer and signature together (Accept's onto the Offer) fails as well.
    let mut b = bundle(&c);
    b.messages[0].signature = b.messages[1].signature.clone();
    b.messages[0].signer_cert = b.messages[1].signer_cert.clone();
    assert_eq!(message_failure(&b, &c).0, "message #0 (offer)");
}

#[test]
fn bundle_hiding_or_editing_a_record_fails() {
    let c = cluster();
    let mut b = bundle(&c);
    b.messages.pop(); // drop the Receipt from the list, records still hold it
    assert!(matches!(verify_bundle(&b, &c.ca), Err(VerifyError::Bundle(_))));

    let mut b = bundle(&c);
    let rec = &mut b.logs[1].records[3];
    rec.text = rec.text.replacen("vm-1", "vm-2", 1);
    match verify_bundle(&b, &c.ca) {
        Err(VerifyError::Record { line, .. }) => assert_eq!(line, b.logs[1].records[3].line),
        other => panic!("{other:?}"),
    }
}

#[test]
fn source_history_rewritten_behind_a_signed_log_head_is_caught() {
    // The source rewrites its log from seq 2 on (inserting a record), then
    // re-appends the very same events, so every message it signed is still
    // there. M2's Offer, held by the destination, carries the source's
    // log_head from before the rewrite, which no longer matches.
    let c = cluster();
    let (sp, dp) = two_logs(&c);
    let original = read_lines(&sp);
    write_lines(&sp, &original[..2]);
    let mut s = AuditLog::open(&sp, c.src_signer()).unwrap();
    s.append(&ferry_audit::AuditEvent::new("inserted")).unwrap();
    for line in &original[2..] {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let ev: ferry_audit::AuditEvent =
            serde_json::from_value(v["record"]["event"].clone()).unwrap();
        s.append(&ev).unwrap();
    }
    drop(s);
    verify_log(&sp, &c.ca).unwrap();
    let (mid, why) = disagreement(cross_check(&sp, &dp, &c.ca));
    assert!(why.contains("history was rewritten"), "{mid}: {why}");
}

#[test]
fn postcopy_switchover_and_aborts_from_both_sides_cross_check() {
    let c = cluster();
    let (sp, dp) = (c.path("src.log"), c.path("dst.log"));
    let mut s = AuditLog::open(&sp, c.src_signer()).unwrap();
    let mut d = AuditLog::open(&dp, c.dst_signer()).unwrap();
    let postcopy = [
        ("offer", true),
        ("accept", false),
        ("switchover", true),
        ("handover", false),
        ("commit", true),
        ("receipt", false),
    ];
    exchange(&c.ca, &mut s, &mut d, M1, &postcopy);
    // The source gives up and says so; the destination answers with its own.
    exchange(
        &c.ca,
        &mut s,
        &mut d,
        M2,
        &[("offer", true), ("accept", false), ("abort", true), ("abort", false)],
    );
    let summary = cross_check(&sp, &dp, &c.ca).unwrap();
    let m1 = summary.migrations.iter().find(|m| m.migration_id == M1).unwrap();
    assert_eq!(m1.agreed, ["offer", "accept", "switchover", "handover", "commit", "receipt"]);
    assert_eq!(m1.outcome, "completed");
    let m2 = summary.migrations.iter().find(|m| m.migration_id == M2).unwrap();
    assert_eq!(m2.outcome, "aborted");
    assert_eq!(m2.agreed, ["offer", "accept", "abort", "abort"]);
    for mid in [M1, M2] {
        let b = export_bundle(&[sp.clone(), dp.clone()], mid).unwrap();
        verify_bundle(&b, &c.ca).unwrap();
    }
}

#[test]
fn a_switchover_signed_by_the_destination_is_refused() {
    let c = cluster();
    let (sp, dp) = (c.path("src.log"), c.path("dst.log"));
    let mut s = AuditLog::open(&sp, c.src_signer()).unwrap();
    let mut d = AuditLog::open(&dp, c.dst_signer()).unwrap();
    // A destination that vouches for the source's switchover itself.
    exchange(
        &c.ca,
        &mut s,
        &mut d,
        M1,
        &[("offer", true), ("accept", false), ("switchover", false)],
    );
    let (mid, why) = disagreement(cross_check(&sp, &dp, &c.ca));
    assert_eq!(mid, M1);
    assert!(why.contains("\"switchover\" is signed by"), "{why}");
    let b = export_bundle(&[sp, dp], M1).unwrap();
    let (what, fault) = message_failure(&b, &c);
    assert!(what.contains("switchover"), "{what}: {fault:?}");
}

#[test]
fn two_commits_or_two_aborts_by_one_side_are_equivocation() {
    for second in ["commit", "abort"] {
        let c = cluster();
        let (sp, dp) = (c.path("src.log"), c.path("dst.log"));
        let mut s = AuditLog::open(&sp, c.src_signer()).unwrap();
        let mut d = AuditLog::open(&dp, c.dst_signer()).unwrap();
        exchange(
            &c.ca,
            &mut s,
            &mut d,
            M1,
            &[("offer", true), ("accept", false), (second, true), (second, true)],
        );
        let (_, why) = disagreement(cross_check(&sp, &dp, &c.ca));
        assert!(why.contains(&format!("2 different \"{second}\" messages")), "{why}");
        let b = export_bundle(&[sp, dp], M1).unwrap();
        let (what, fault) = message_failure(&b, &c);
        assert!(format!("{fault:?}").contains("a second"), "{what}: {fault:?}");
    }
}
