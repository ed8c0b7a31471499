//! The spine, end to end: a 512 MiB guest that dirties memory migrates
//! between two real agents over mTLS; it keeps running on the destination,
//! its memory checks clean, and exactly one copy runs.

mod common;

use std::path::Path;

use common::*;

#[test]
fn a_dirtying_guest_migrates_keeps_running_and_runs_once() {
    let lab = TestLab::up(2, 0);
    let src = lab.start_guest("host1", "g1", 512, "fill_mib=256 dirty=256 hb_ms=10");
    let src_pid = src["pid"].as_i64().expect("pid") as i32;

    let completed = "ferry_migrations_total{role=\"source\",outcome=\"completed\"}";
    let received = "ferry_migrations_total{role=\"destination\",outcome=\"completed\"}";
    assert_eq!(metric(&scrape(lab.host("host1").metrics), completed), 0);

    let (ok, rec) = lab.ferry_json(&["migrate", "g1", "--to", "host2", "--host", "host1"]);
    assert!(ok, "migration failed: {rec}");
    // The counters moved on both sides.
    let m1 = scrape(lab.host("host1").metrics);
    assert_eq!(metric(&m1, completed), 1, "{m1}");
    assert!(metric(&m1, "ferry_migration_bytes_total{role=\"source\"}") > 256 << 20, "{m1}");
    assert_eq!(metric(&scrape(lab.host("host2").metrics), received), 1);
    assert_eq!(rec["state"], "completed", "{rec}");
    assert!(
        rec["bytes"].as_u64().unwrap_or(0) > 256 << 20,
        "less than the filled memory moved: {rec}"
    );
    let id = rec["id"].as_str().expect("id").to_owned();

    // Exactly one copy: running on host2, gone from host1, source QEMU dead.
    assert_eq!(lab.running_on("g1"), ["host2"]);
    assert!(lab.vm_state("host1", "g1").is_none(), "source still lists the VM");
    assert!(!pid_alive(src_pid), "source QEMU {src_pid} still alive");
    assert!(
        live_qemus_under(&lab.host("host1").state_dir).is_empty(),
        "a QEMU still runs on host1"
    );
    assert_eq!(live_qemus_under(&lab.host("host2").state_dir).len(), 1);

    // Both sides agree on what moved.
    let (ok, dst_rec) = lab.ferry_json(&["migrations", "show", &id, "--host", "host2"]);
    assert!(ok, "{dst_rec}");
    assert_eq!(dst_rec["state"], "completed");
    assert_eq!(dst_rec["digest"], rec["digest"]);
    assert_eq!(dst_rec["bytes"], rec["bytes"]);

    // The guest kept running: its heartbeat goes on and two full memory
    // sweeps on the destination find no error.
    let c = assert_moved_intact(&lab, "g1", &id);
    let blackout = c.guest_blackout_ms.expect("blackout measured");
    eprintln!("guest blackout {blackout} ms, QEMU downtime {} ms", rec["qemu_downtime_ms"]);
    // The source keeps QEMU's own clock of the migration (what bench.py
    // compares with plain QEMU), inside the record's end-to-end time.
    let qemu_ms = rec["qemu_total_ms"].as_u64().expect("QEMU's migration time recorded");
    assert!(qemu_ms > 0 && qemu_ms <= rec["total_ms"].as_u64().expect("total_ms"), "{rec}");
    assert!(dst_rec.get("qemu_total_ms").is_none(), "{dst_rec}");
    let dst_vm = lab.vms("host2").into_iter().find(|v| v["name"] == "g1").expect("g1 on host2");
    assert_guest_runs(Path::new(dst_vm["console_log"].as_str().expect("log")));

    // Records survive an agent restart, and the adopted VM still answers.
    lab.restart_agent("host2");
    lab.restart_agent("host1");
    let (ok, again) = lab.ferry_json(&["migrations", "show", &id, "--host", "host1"]);
    assert!(ok && again["state"] == "completed", "{again}");
    assert_eq!(lab.running_on("g1"), ["host2"], "the adopted VM must still run, once");

    // And it can move back.
    let (ok, back) = lab.ferry_json(&["migrate", "g1", "--to", "host1", "--host", "host2"]);
    assert!(ok, "migration back failed: {back}");
    assert_eq!(lab.running_on("g1"), ["host1"]);
}

/// As root the demo's hosts get network namespaces, as with `lab up`: the
/// VM crosses only the migration network, and the demo leaves no
/// namespace, veth or bridge behind.
#[test]
fn demo_json_reports_a_verified_migration() {
    let (v, lab) = demo_verifies("qemu", &[]);
    let network = &v["network"];
    assert_eq!(network["kind"], "netns", "{v}");
    assert_eq!(network["subnet"], "10.77.2.0/24", "{v}");
    assert_eq!(network["destination_addr"], "10.77.2.12:7444", "{v}");
    let bytes = v["bytes"].as_u64().expect("bytes");
    let mig = network["source_sent_migration_bytes"].as_u64().expect("migration bytes");
    let mgmt = network["source_sent_management_bytes"].as_u64().expect("management bytes");
    assert!(mig >= bytes, "{mig} B on the migration interface for {bytes} B moved: {v}");
    assert!(mgmt < 1 << 20, "{mgmt} B on the management interface during the migration");
    let prefix = &lab.net.expect("lab.json names the networks").prefix;
    assert!(namespaces_named(prefix).is_empty(), "{:?} left", namespaces_named(prefix));
    let links = lab_links_in_root_namespace();
    assert!(links.is_empty(), "links named like the lab's in the root namespace: {links:?}");
}

/// `--no-netns` keeps both hosts on loopback, also as root.
#[test]
fn demo_with_no_netns_stays_on_loopback() {
    let (v, lab) = demo_verifies("qemu", &["--no-netns"]);
    assert_eq!(v["network"]["kind"], "loopback", "{v}");
    assert_eq!(v["network"]["source_addr"], "127.0.0.1", "{v}");
    assert!(lab.net.is_none() && lab.hosts.iter().all(|h| h.netns.is_none()), "{v}");
}

/// The same story with the guest as a libvirt domain: libvirt runs the
/// migration, the agents carry it (no blackout: libvirt's console file
/// has no timestamps, so the field is there but null).
#[test]
fn demo_with_libvirt_reports_a_verified_migration() {
    let (v, _) = demo_verifies("libvirt", &[]);
    // libvirtd's QEMUs would run outside a host's namespace.
    assert_eq!(v["network"]["kind"], "loopback", "{v}");
    assert!(v["network"]["source_sent_migration_bytes"].is_null(), "{v}");
}

/// Run the demo with `backend` and `extra` arguments; returns its JSON and
/// the lab it made.
fn demo_verifies(backend: &str, extra: &[&str]) -> (serde_json::Value, ferry_cli::lab::Lab) {
    let dir = tempfile::Builder::new().prefix("ferry-demo-").tempdir_in("/tmp").expect("tmp");
    let lab_dir = dir.path().join("lab");
    let lab_dir_arg = lab_dir.to_str().expect("utf8");
    let mut args = vec!["demo", "--json", "--backend", backend, "--memory", "256"];
    args.extend(["--fill", "128", "--dir", lab_dir_arg]);
    args.extend(extra);
    let o = run(&args, None);
    let out = text(&o);
    assert!(o.status.success(), "demo failed: {out}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    for field in [
        "migrated",
        "vm",
        "source",
        "destination",
        "running_on",
        "bytes",
        "total_ms",
        "downtime_ms",
        "guest_blackout_ms",
        "network",
        "checks",
    ] {
        assert!(v.get(field).is_some(), "demo JSON lacks {field}: {v}");
    }
    assert_eq!(v["migrated"], true);
    assert_eq!(v["running_on"], serde_json::json!(["host2"]));
    for (k, check) in v["checks"].as_object().expect("checks") {
        assert_eq!(check, true, "check {k} failed: {v}");
    }
    assert!(live_qemus_under(&lab_dir).is_empty(), "demo left QEMUs running");
    let lab = ferry_cli::lab::Lab::load(&lab_dir).expect("lab.json");
    for lv in lab.hosts.iter().filter_map(|h| h.libvirt.as_ref()) {
        assert!(!pid_alive(lv.pid as i32), "demo left libvirtd {} running", lv.pid);
    }
    (v, lab)
}

#[test]
fn bad_requests_get_clear_errors() {
    let lab = TestLab::up(2, 0);
    let o = lab.ferry(&["migrate", "nope", "--to", "host2", "--host", "host1"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("no VM nope on host1"), "{}", text(&o));
    let o = lab.ferry(&["migrate", "nope", "--to", "host9", "--host", "host1"]);
    assert!(text(&o).contains("unknown destination host9"), "{}", text(&o));
    let o =
        lab.ferry(&["vm", "start", "--host", "host1", "--name", "x", "--kernel", "../etc/passwd"]);
    assert!(!o.status.success() && text(&o).contains("image"), "{}", text(&o));
    let o =
        lab.ferry(&["vm", "start", "--host", "host1", "--name", "x", "--kernel", "missing.elf"]);
    assert!(!o.status.success() && text(&o).contains("missing.elf"), "{}", text(&o));
    assert!(live_qemus_under(lab.dir.path()).is_empty());
}

/// QEMU's multifd channels carried on parallel TLS connections, each hashed;
/// the commit covers all of them, and the guest's memory checks clean.
#[test]
fn parallel_streams_carry_multifd_channels() {
    let lab = TestLab::up(2, 0);
    let vm = lab.start_guest("host1", "m", 512, "fill_mib=256 dirty=64 hb_ms=10");
    let src_pid = vm["pid"].as_i64().expect("pid") as i32;
    let (ok, rec) =
        lab.ferry_json(&["migrate", "m", "--to", "host2", "--host", "host1", "--streams", "4"]);
    assert!(ok, "multifd migration failed: {rec}");
    assert_eq!(rec["streams"], 4, "{rec}");
    assert!(rec["bytes"].as_u64().unwrap_or(0) > 256 << 20, "{rec}");
    let (_, dst) =
        lab.ferry_json(&["migrations", "show", rec["id"].as_str().expect("id"), "--host", "host2"]);
    assert_eq!(dst["digest"], rec["digest"]);
    assert_eq!(dst["streams"], 4);
    assert_eq!(
        metric(&scrape(lab.host("host2").metrics), "ferry_refusals_total{reason=\"stream_join\"}"),
        0
    );
    assert_eq!(lab.running_on("m"), ["host2"]);
    assert!(!pid_alive(src_pid));
    assert_moved_intact(&lab, "m", rec["id"].as_str().expect("id"));
    // Out of range is refused before anything starts.
    let o = lab.ferry(&["migrate", "m", "--to", "host1", "--host", "host2", "--streams", "9"]);
    assert!(!o.status.success());
}
