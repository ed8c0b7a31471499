//! Helpers shared by the replay and audit-evidence suites: migrating the
//! test guest, reading records and audit logs, a refused offer.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::*;

/// `ferry migrate g --to host2 --host host1 --json`: (success, output).
pub fn try_migrate(lab: &TestLab) -> (bool, String) {
    let o = lab.ferry(&["migrate", "g", "--to", "host2", "--host", "host1", "--json"]);
    (o.status.success(), text(&o))
}

/// Migrate g from host1 to host2 (it must succeed); the migration record.
pub fn migrate_ok(lab: &TestLab) -> Value {
    let (ok, rec) = lab.ferry_json(&["migrate", "g", "--to", "host2", "--host", "host1"]);
    assert!(ok, "migration failed: {rec}");
    assert_eq!(lab.running_on("g"), ["host2"]);
    rec
}

/// The events of `kind` in `host`'s audit log.
pub fn audit_events(lab: &TestLab, host: &str, kind: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(audit_log(lab, host)).expect("audit log");
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("log line")["record"]["event"].clone())
        .filter(|e| e["kind"] == kind)
        .collect()
}

pub fn audit_log(lab: &TestLab, host: &str) -> PathBuf {
    lab.host(host).state_dir.join("audit.log")
}

pub fn ca(lab: &TestLab) -> &str {
    lab.lab.ca.to_str().expect("utf8")
}

/// `ferry audit verify` of both hosts' logs with the cross-check; asserts
/// it succeeds and returns its JSON.
pub fn verify_both_audit_logs(lab: &TestLab) -> Value {
    let (h1, h2) = (audit_log(lab, "host1"), audit_log(lab, "host2"));
    let (h1, h2) = (h1.to_str().expect("utf8"), h2.to_str().expect("utf8"));
    let (ok, v) = lab.ferry_json(&["audit", "verify", h1, h2, "--ca", ca(lab)]);
    assert!(ok, "the two audit logs do not verify together: {v}");
    v
}

/// Every migration record on `host`: (id, state, bytes, error).
pub fn migration_records(lab: &TestLab, host: &str) -> Vec<(String, String, u64, String)> {
    let (ok, list) = lab.ferry_json(&["migrations", "list", "--host", host]);
    assert!(ok, "migrations list on {host}: {list}");
    list["migrations"]
        .as_array()
        .expect("migrations")
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap_or("").to_owned(),
                m["state"].as_str().unwrap_or("").to_owned(),
                m["bytes"].as_u64().unwrap_or(0),
                m["error"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// The signed message of `kind` that `host`'s audit log recorded for migration `id`.
pub fn recorded_message(log: &Path, event_kind: &str, id: &str) -> ferry_audit::Signed {
    let text = std::fs::read_to_string(log).expect("audit log");
    let line = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("log line"))
        .find(|v| {
            v["record"]["event"]["kind"] == event_kind && v["record"]["event"]["migration_id"] == id
        })
        .unwrap_or_else(|| panic!("no {event_kind} record for {id} in {}", log.display()));
    serde_json::from_value(line["record"]["event"]["signed"].clone()).expect("signed message")
}

pub fn host2_refusals(lab: &TestLab, reason: &str) -> u64 {
    metric(
        &scrape(lab.host("host2").metrics),
        &format!("ferry_refusals_total{{reason=\"{reason}\"}}"),
    )
}

/// What host2 answered `r`'s offer with, then the connection must end.
pub fn refusal(r: &mut RogueSource) -> String {
    let answer = r.read().unwrap_or_else(|e| panic!("no answer to the offer: {e}"));
    assert_eq!(answer["type"], "refuse", "a replayed offer was not refused: {answer}");
    let (more, closed_by) = r.read_until_closed();
    assert!(more.is_empty(), "host2 sent more after refusing: {more:?}");
    assert!(!closed_by.contains("timed out"), "host2 kept the connection open: {closed_by}");
    answer["reason"].as_str().unwrap_or("").to_owned()
}
