//! Post-copy between namespaced hosts (`ferry lab up --netns`) over a
//! migration link shaped to 200 Mbit/s (`ferry lab link --rate`): a guest
//! that dirties memory far faster than the link carries it switches to
//! post-copy and moves intact, and a link that goes down while the
//! destination still fetches pages is recovered by the source on its own
//! once the link is `--up` again.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// 256 pages (1 MiB) dirtied per ms over 128 MiB: the link's 25 MB/s
/// never catches up in pre-copy, so the source switches after one pass.
const FAST: &str = "fill_mib=128 dirty=256 hb_ms=10";

/// A namespaced lab whose agents notice a silent link after 3 s, with
/// host1's migration link at 200 Mbit/s and the fast guest on host1.
fn shaped_lab(migration: &str) -> (TestLab, Value) {
    let lab = TestLab::up_with(2, 0, &["--netns"]);
    for h in ["host1", "host2"] {
        let settings = format!("[migration]\nio_timeout_ms = 3000\n{migration}");
        lab.edit_config(h, "[migration]\n", &settings);
        lab.restart_agent(h);
    }
    let vm = lab.start_guest("host1", "g", 256, FAST);
    let said = lab.link("host1", &["--rate", "200mbit"]);
    assert!(said.contains("200 Mbit/s"), "{said}");
    (lab, vm)
}

/// Both audit logs hold the switchover: commit sent by host1 before host2
/// resumed the VM, receipt (the handover) sent back by host2.
fn assert_switched_over(lab: &TestLab, id: &str) {
    for (host, kinds) in [
        ("host1", ["commit_sent", "receipt_received"]),
        ("host2", ["commit_received", "receipt_sent"]),
    ] {
        let log = lab.host(host).state_dir.join("audit.log");
        let log = log.to_str().expect("utf8");
        let records = text(&lab.ferry(&["audit", "show", log, "--migration", id, "--json"]));
        for kind in kinds {
            let switchover = records
                .lines()
                .any(|l| l.contains(&format!("\"{kind}\"")) && l.contains("\"switchover\""));
            assert!(switchover, "no switchover {kind} in {host}'s audit log: {records}");
        }
    }
    verify_both_audit_logs(lab);
}

/// Both sides completed and signed for the same stream; the VM runs once,
/// on host2, with its memory intact; the source QEMU is gone.
fn assert_completed_once(lab: &TestLab, id: &str, src_pid: i32) {
    let (_, src) = lab.ferry_json(&["migrations", "show", id, "--host", "host1"]);
    let (_, dst) = lab.ferry_json(&["migrations", "show", id, "--host", "host2"]);
    assert_eq!((&src["state"], &dst["state"]), (&"completed".into(), &"completed".into()));
    assert_eq!(
        (&dst["bytes"], &dst["digest"]),
        (&src["bytes"], &src["digest"]),
        "the two sides signed for different streams"
    );
    wait_until(Duration::from_secs(10), "the source QEMU to exit", || !pid_alive(src_pid));
    assert_eq!(lab.running_on("g"), ["host2"]);
    assert!(live_qemus_under(&lab.host("host1").state_dir).is_empty(), "a QEMU runs on host1");
    assert_switched_over(lab, id);
    assert_moved_intact(lab, "g", id);
}

#[test]
fn postcopy_over_a_200_mbit_link_between_namespaced_hosts() {
    let t0 = Instant::now();
    let (lab, vm) = shaped_lab("");
    let src_pid = vm["pid"].as_i64().expect("pid") as i32;
    let h1 = lab.netns("host1");
    let sent_before = if_bytes(&h1, "mig").1;
    let started = Instant::now();
    let (ok, rec) =
        lab.ferry_json(&["migrate", "g", "--to", "host2", "--host", "host1", "--postcopy"]);
    let secs = started.elapsed().as_secs_f64();
    let sent = if_bytes(&h1, "mig").1 - sent_before;
    let mbit_s = sent as f64 * 8.0 / secs / 1e6;
    eprintln!("{sent} B in {secs:.1} s: {mbit_s:.0} Mbit/s on a 200 Mbit/s link");
    assert!(ok, "post-copy over the shaped link failed: {rec}");
    assert_eq!(rec["postcopy"], true, "{rec}");
    let moved = rec["bytes"].as_u64().expect("bytes");
    assert!(sent >= moved && moved > 128 << 20, "{sent} B sent on mig for {moved} B moved");
    assert!(mbit_s < 210.0, "the link carried {mbit_s:.0} Mbit/s, more than its rate");
    assert_completed_once(&lab, rec["id"].as_str().expect("id"), src_pid);
    eprintln!("took {:?}", t0.elapsed());
}

/// host1's migration link goes down while host2 runs the VM and still
/// fetches pages from host1. Neither half is stopped or resumed; the
/// source's recovery attempts fail while the link is down, and after
/// `lab link host1 --up` it resumes the stream by itself.
#[test]
fn postcopy_link_down_recovers_by_itself_after_up() {
    let t0 = Instant::now();
    let (lab, vm) = shaped_lab("postcopy_recover_retry_ms = 500\n");
    let src_pid = vm["pid"].as_i64().expect("pid") as i32;
    let child = lab.spawn_postcopy_to_host2("g");
    // 128 MiB of dirty pages take seconds at 200 Mbit/s after the hand-over.
    wait_until(Duration::from_secs(120), "the hand-over", || {
        lab.only_migration_state("host1") == "postcopy_active"
    });
    let said = lab.link("host1", &["--down"]);
    assert!(said.contains("down"), "{said}");

    let o = child.wait_with_output().expect("wait migrate");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert!(!o.status.success(), "post-copy over a dead link completed: {}", text(&o));
    assert_eq!(v["kind"], "in_doubt", "{}", text(&o));
    let (_, list) = lab.ferry_json(&["migrations", "list", "--host", "host1"]);
    let id = list["migrations"][0]["id"].as_str().expect("id").to_owned();
    lab.wait_failed_recoveries("host1", 2);
    assert!(pid_alive(src_pid), "the source's half (holding pages) was stopped");
    assert_ne!(
        lab.vm_state("host1", "g").as_deref(),
        Some("running"),
        "the source copy was resumed: the VM would run twice"
    );
    assert!(lab.vms("host2").iter().any(|v| v["name"] == "g"), "host2's half is gone");

    let said = lab.link("host1", &["--up"]);
    assert!(said.contains("up"), "{said}");
    wait_until(Duration::from_secs(120), "recovery on both hosts", || {
        lab.only_migration_state("host1") == "completed"
            && lab.only_migration_state("host2") == "completed"
    });
    assert_completed_once(&lab, &id, src_pid);
    eprintln!("took {:?}", t0.elapsed());
}
