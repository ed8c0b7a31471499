//! docs/protocol.md step 7 with real faults: whatever breaks during a migration,
//! the VM runs exactly once and is never lost.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A lab whose migrations are slowed to ~64 MiB/s so a fault can land mid-transfer.
fn slow_lab() -> (TestLab, PathBuf) {
    let lab = TestLab::up(2, 64);
    let vm = lab.start_guest("host1", "g", 512, "fill_mib=384 dirty=64 hb_ms=10");
    let log = PathBuf::from(vm["console_log"].as_str().expect("log"));
    (lab, log)
}

/// Wait until the destination has launched its incoming QEMU and some
/// state has flowed; returns that QEMU's pid.
fn wait_transfer_started(lab: &TestLab) -> i32 {
    let mut pid = 0;
    wait_until(Duration::from_secs(30), "the incoming VM on host2", || {
        let vms = lab.vms("host2");
        pid = vms.iter().find(|v| v["name"] == "g").and_then(|v| v["pid"].as_i64()).unwrap_or(0)
            as i32;
        pid != 0
    });
    std::thread::sleep(Duration::from_millis(1500));
    pid
}

fn finish(child: std::process::Child) -> (bool, String) {
    let o = child.wait_with_output().expect("wait migrate");
    (o.status.success(), text(&o))
}

/// After a failed migration: the source copy runs (its heartbeat moves on)
/// and no QEMU for the VM is left on the destination.
fn assert_rolled_back(lab: &TestLab, log: &std::path::Path) {
    let started = Instant::now();
    wait_until(Duration::from_secs(10), "the source copy to run again", || {
        lab.vm_state("host1", "g").as_deref() == Some("running")
    });
    eprintln!(
        "source running again {} ms after the failure was reported",
        started.elapsed().as_millis()
    );
    assert_guest_runs(log);
    assert_eq!(lab.running_on("g"), ["host1"]);
    wait_until(Duration::from_secs(10), "no QEMU left on host2", || {
        live_qemus_under(&lab.host("host2").state_dir).is_empty()
    });
    let lines = ferry_cli::console::read_console(log).expect("console");
    assert!(
        !lines.iter().any(|l| matches!(l.line, ferry_guest::GuestLine::Corrupt { .. })),
        "guest memory corrupted"
    );
}

#[test]
fn destination_agent_killed_mid_transfer() {
    let (lab, log) = slow_lab();
    let child = spawn_migrate(&lab);
    wait_transfer_started(&lab);
    // Scraped during the transfer: one migration in flight.
    assert_eq!(metric(&scrape(lab.host("host1").metrics), "ferry_active_migrations"), 1);
    lab.kill_agent("host2");
    let t = Instant::now();
    let (ok, out) = finish(child);
    assert!(!ok, "migration reported success: {out}");
    eprintln!("failure reported {} ms after the kill: {out}", t.elapsed().as_millis());
    assert!(t.elapsed() < Duration::from_secs(20), "took too long to notice");
    // The destination's QEMU is orphaned (paused, never resumed): host2 runs
    // nothing until its agent restarts and cleans it up.
    wait_until(Duration::from_secs(10), "source running", || {
        lab.vm_state("host1", "g").as_deref() == Some("running")
    });
    assert_eq!(lab.running_on("g"), ["host1"]);
    lab.start_agent("host2");
    assert!(lab.vms("host2").is_empty(), "restarted host2 still lists the incoming VM");
    assert_rolled_back(&lab, &log);
    // The destination's record says it never ran the VM.
    let (_, list) = lab.ferry_json(&["migrations", "list", "--host", "host2"]);
    let states: Vec<_> =
        list["migrations"].as_array().expect("list").iter().map(|m| m["state"].clone()).collect();
    assert_eq!(states, [serde_json::json!("aborted")], "{list}");
    let m = scrape(lab.host("host1").metrics);
    assert_eq!(metric(&m, "ferry_migrations_total{role=\"source\",outcome=\"aborted\"}"), 1, "{m}");
    assert_eq!(metric(&m, "ferry_active_migrations"), 0, "{m}");
}

#[test]
fn destination_qemu_killed_mid_transfer() {
    let (lab, log) = slow_lab();
    let child = spawn_migrate(&lab);
    let qemu = wait_transfer_started(&lab);
    let _ = Command::new("kill").args(["-9", &qemu.to_string()]).status();
    let (ok, out) = finish(child);
    assert!(!ok, "migration reported success: {out}");
    assert!(out.contains("host2"), "error does not name the destination: {out}");
    assert_rolled_back(&lab, &log);
    assert!(lab.vms("host2").is_empty());
}

#[test]
fn connection_cut_mid_transfer() {
    let (lab, log) = slow_lab();
    let proxy = Proxy::start(lab.host("host2").addr, ProxyMode::CutAfter(64 << 20));
    lab.route_peer("host1", "host2", proxy.addr);
    lab.restart_agent("host1");
    let (ok, out) = finish(spawn_migrate(&lab));
    assert!(!ok, "migration reported success: {out}");
    assert_rolled_back(&lab, &log);
    assert!(lab.vms("host2").is_empty());
}

/// After Commit, no Receipt: the source copy stays paused ("in doubt")
/// while the destination cannot answer, and the source agent keeps asking
/// by itself. Once the network heals it settles with no operator command:
/// here the destination did run the VM, so the source copy is retired.
#[test]
fn a_lost_receipt_keeps_the_source_paused_until_the_destination_answers() {
    let lab = TestLab::up(2, 0);
    lab.start_guest("host1", "g", 256, "fill_mib=128 dirty=64 hb_ms=10");
    // Everything the destination says after the bulk of the state passed is swallowed.
    let proxy = Proxy::start(lab.host("host2").addr, ProxyMode::MuteDownstreamAfter(100 << 20));
    lab.route_peer("host1", "host2", proxy.addr);
    append_migration_config(&lab, "host1", "commit_timeout_ms = 1000\nio_timeout_ms = 2000");
    lab.restart_agent("host1");

    let o = lab.ferry(&["migrate", "g", "--to", "host2", "--host", "host1", "--json"]);
    assert_eq!(o.status.code(), Some(4), "expected the in-doubt exit status: {}", text(&o));
    assert!(text(&o).contains("resolve"), "{}", text(&o));
    let id = {
        let (_, list) = lab.ferry_json(&["migrations", "list", "--host", "host1"]);
        let m = &list["migrations"][0];
        assert_eq!(m["state"], "in_doubt", "{list}");
        m["id"].as_str().expect("id").to_owned()
    };
    // At most one copy runs: the destination's; the source's is paused.
    assert_eq!(lab.running_on("g"), ["host2"]);
    assert_ne!(lab.vm_state("host1", "g").as_deref(), Some("running"));
    // While the destination cannot answer, the agent's attempts change nothing.
    let audit1 = lab.host("host1").state_dir.join("audit.log");
    wait_until(Duration::from_secs(30), "failed attempts to settle it", || {
        std::fs::read_to_string(&audit1).unwrap_or_default().matches("resolve_attempt").count() >= 2
    });
    assert_ne!(lab.vm_state("host1", "g").as_deref(), Some("running"));
    // The network heals (the proxy goes) and the source agent restarts
    // meanwhile: it asks the destination again by itself and settles.
    lab.unroute_peer("host1", "host2", proxy.addr);
    drop(proxy);
    lab.restart_agent("host1");
    lab.wait_completed("host1", &id);
    assert!(lab.vm_state("host1", "g").is_none(), "source copy not removed");
    assert_eq!(lab.running_on("g"), ["host2"]);
    // Nothing is left for an operator to resolve.
    let (ok, v) = lab.ferry_json(&["migrations", "resolve", &id, "--host", "host1"]);
    assert!(!ok && v["message"].as_str().unwrap_or("").contains("completed"), "{v}");
    assert!(live_qemus_under(&lab.host("host1").state_dir).is_empty());
}
