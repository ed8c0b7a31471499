//! The audit log: durable appends, resume, and every kind of tampering.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{cluster, read_lines, write_lines, Cluster};
use ferry_audit::{verify_log, AuditError, AuditEvent, AuditLog, RecordFault, VerifyError};

fn note(i: u64) -> AuditEvent {
    let mut ev = AuditEvent::new("note");
    ev.detail = serde_json::json!({ "note": format!("record-{i:03}") });
    ev
}

/// A log of `n` records after genesis (seq 0), written in two sessions.
fn log_with(c: &Cluster, name: &str, n: u64) -> std::path::PathBuf {
    let path = c.path(name);
    let mut log = AuditLog::open(&path, c.src_signer()).unwrap();
    for i in 1..=n / 2 {
        assert_eq!(log.append(&note(i)).unwrap(), i);
    }
    drop(log);
    let mut log = AuditLog::open(&path, c.src_signer()).unwrap();
    for i in n / 2 + 1..=n {
        assert_eq!(log.append(&note(i)).unwrap(), i);
    }
    path
}

/// (line, seq, fault) of a failed verification.
fn failure(path: &Path, c: &Cluster) -> (u64, Option<u64>, RecordFault) {
    match verify_log(path, &c.ca) {
        Err(VerifyError::Record { line, seq, fault, .. }) => (line, seq, fault),
        Err(e) => panic!("unexpected error {e}"),
        Ok(s) => panic!("tampered log verified: {s:?}"),
    }
}

/// A batch is chained exactly as one-by-one appends: the log verifies,
/// seqs run on, and a reopened log appends after it; a bad kind in a batch
/// writes none of it.
#[test]
fn a_batch_appends_in_order_with_one_write() {
    let c = cluster();
    let path = log_with(&c, "batch.log", 4);
    let mut log = AuditLog::open(&path, c.src_signer()).unwrap();
    assert_eq!(log.append_all(&[note(5), note(6), note(7)]).unwrap(), 5..8);
    let mut bad = note(8);
    bad.kind = "Not A Kind".into();
    assert!(matches!(log.append_all(&[note(8), bad]), Err(AuditError::BadKind { .. })));
    assert_eq!(log.append_all(&[]).unwrap(), 8..8);
    drop(log);
    let mut log = AuditLog::open(&path, c.src_signer()).unwrap();
    assert_eq!(log.append(&note(8)).unwrap(), 8);
    drop(log);
    assert_eq!(verify_log(&path, &c.ca).unwrap().records, 9);
    let lines = read_lines(&path);
    for (i, line) in lines.iter().enumerate().skip(1) {
        assert!(line.contains(&format!("record-{i:03}")), "line {i}: {line}");
    }
}

#[test]
fn append_reopen_append_verifies() {
    let c = cluster();
    let path = log_with(&c, "a.log", 20);
    let mut log = AuditLog::open(&path, c.src_signer()).unwrap();
    for i in 21..=25 {
        assert_eq!(log.append(&note(i)).unwrap(), i);
    }
    let head = log.head();
    drop(log);
    let s = verify_log(&path, &c.ca).unwrap();
    assert_eq!(s.records, 26);
    assert_eq!(s.head, head);
    assert_eq!(s.host, "spiffe://ferry.test/host/src-host");
    // Genesis alone carries the certificate: later lines are small.
    let lines = read_lines(&path);
    assert!(lines[0].contains("\"cert\":"));
    assert!(lines[1..].iter().all(|l| !l.contains("\"cert\":")));
}

#[test]
fn edited_byte_names_the_record() {
    let c = cluster();
    let path = log_with(&c, "a.log", 20);
    let mut lines = read_lines(&path);
    lines[7] = lines[7].replace("record-007", "record-00w"); // one byte
    write_lines(&path, &lines);
    assert_eq!(failure(&path, &c), (8, Some(7), RecordFault::BadSignature));
    // Resuming refuses it too: resume checks the whole chain (and the tail
    // signature), and the link after the edited record breaks.
    let err = AuditLog::open(&path, c.src_signer()).unwrap_err();
    assert!(matches!(err, AuditError::Damaged(_)), "{err}");
}

#[test]
fn deleted_record_is_named() {
    let c = cluster();
    let path = log_with(&c, "a.log", 20);
    let mut lines = read_lines(&path);
    lines.remove(5);
    write_lines(&path, &lines);
    assert_eq!(failure(&path, &c), (6, Some(6), RecordFault::Sequence { expected: 5, found: 6 }));
}

#[test]
fn swapped_records_are_named() {
    let c = cluster();
    let path = log_with(&c, "a.log", 20);
    let mut lines = read_lines(&path);
    lines.swap(9, 10);
    write_lines(&path, &lines);
    assert_eq!(
        failure(&path, &c),
        (10, Some(10), RecordFault::Sequence { expected: 9, found: 10 })
    );
}

#[test]
fn record_spliced_from_another_log_breaks_the_chain() {
    // Same host, same seq, valid signature: only the chain can tell.
    let c = cluster();
    let a = log_with(&c, "a.log", 10);
    let b = log_with(&c, "b.log", 10);
    let mut lines = read_lines(&a);
    lines[4] = read_lines(&b)[4].clone();
    write_lines(&a, &lines);
    assert_eq!(failure(&a, &c), (5, Some(4), RecordFault::Chain));
}

#[test]
fn partially_truncated_last_record_is_named_and_not_resumed() {
    let c = cluster();
    let path = log_with(&c, "a.log", 20);
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 10).unwrap();
    drop(f);
    assert_eq!(failure(&path, &c), (21, None, RecordFault::Incomplete));
    let err = AuditLog::open(&path, c.src_signer()).unwrap_err();
    assert!(matches!(err, AuditError::Damaged(_)), "{err}");
    assert!(err.to_string().contains("line 21"), "{err}");
}

#[test]
fn whitespace_outside_the_signed_part_is_refused() {
    let c = cluster();
    let path = log_with(&c, "a.log", 4);
    let mut lines = read_lines(&path);
    lines[4] = lines[4].replacen("\"sig\":", "\"sig\": ", 1);
    write_lines(&path, &lines);
    assert_eq!(failure(&path, &c), (5, None, RecordFault::NotCanonical));
}

#[test]
fn forged_tail_signature_is_refused_on_resume() {
    let c = cluster();
    let path = log_with(&c, "a.log", 4);
    let mut lines = read_lines(&path);
    // Re-sign the last record with the other host's key: the certificate in
    // force (src) does not verify it.
    let forged = {
        let v: serde_json::Value = serde_json::from_str(&lines[4]).unwrap();
        let raw = serde_json::to_string(&v["record"]).unwrap();
        let mut m = b"ferry-signed-v1\0audit_record\0".to_vec();
        m.extend_from_slice(raw.as_bytes());
        let sig = c.dst_signer().sign(&m);
        use base64::Engine as _;
        format!(
            "{{\"record\":{raw},\"sig\":\"{}\"}}",
            base64::engine::general_purpose::STANDARD.encode(sig)
        )
    };
    lines[4] = forged;
    write_lines(&path, &lines);
    assert_eq!(failure(&path, &c), (5, Some(4), RecordFault::BadSignature));
    assert!(matches!(AuditLog::open(&path, c.src_signer()), Err(AuditError::Damaged(_))));
}

#[test]
fn clean_tail_truncation_is_not_detectable_alone() {
    // Documented limit: dropping whole records at the end leaves a valid,
    // shorter log. The head an auditor noted earlier shows it (and
    // cross_check shows it when the peer holds later evidence: see cross.rs).
    let c = cluster();
    let path = log_with(&c, "a.log", 20);
    let noted = verify_log(&path, &c.ca).unwrap().head;
    let mut lines = read_lines(&path);
    lines.pop();
    write_lines(&path, &lines);
    let now = verify_log(&path, &c.ca).unwrap();
    assert!(now.head.seq < noted.seq);
}

#[test]
fn another_hosts_log_is_not_resumed() {
    let c = cluster();
    let path = log_with(&c, "a.log", 2);
    let err = AuditLog::open(&path, c.dst_signer()).unwrap_err();
    assert!(matches!(err, AuditError::NotOurLog { .. }), "{err}");
}

#[test]
fn renewed_certificate_is_recorded_and_verifies() {
    let c = cluster();
    let path = log_with(&c, "a.log", 4);
    let renewed = c
        .ca_dir
        .issue_host(
            &"src-host".parse().unwrap(),
            ferry_identity::Validity::days(60),
            &c.path("renewed"),
        )
        .unwrap();
    let mut log =
        AuditLog::open(&path, ferry_audit::Signer::load(&renewed.cert, &renewed.key).unwrap())
            .unwrap();
    log.append(&note(99)).unwrap();
    drop(log);
    let lines = read_lines(&path);
    assert!(lines[5].contains("signer_cert_changed") && lines[5].contains("\"cert\":"));
    assert_eq!(verify_log(&path, &c.ca).unwrap().records, 7);
}

#[test]
fn log_from_another_ca_is_refused() {
    let c = cluster();
    let path = log_with(&c, "a.log", 2);
    let other = cluster();
    assert_eq!(failure(&path, &other).0, 1);
}
