//! A vTPM under faults, with real agents, QEMU and swtpm: a bit flipped in
//! the stream, the destination agent killed mid-transfer, a lost Receipt.
//! Each time exactly one vTPM state is live afterwards (or one paused VM in
//! doubt keeps its state), never two, and the guest reads what it had.

mod common;

use std::time::Duration;

use common::*;

fn vtpm_on(lab: &TestLab, host: &str) -> bool {
    !vtpm_state_under(&lab.host(host).state_dir).is_empty()
}

#[test]
fn a_flipped_bit_aborts_and_the_source_keeps_its_vtpm() {
    let _g = serial();
    let lab = TestLab::up(2, 0);
    let vm = start_tpm_guest_sized(&lab, "host1", "g", 128, 64);
    let log = console_path(&vm);
    let mitm = Mitm::start(lab.host("host2").addr, Tamper::None, None);
    lab.route_peer("host1", "host2", mitm.addr);
    // The restarted agent adopts the VM and its running swtpm.
    lab.restart_agent("host1");

    mitm.set_tamper(Tamper::FlipBit { dir: Dir::Up, offset: 16 << 20, mask: 0x10 });
    let (ok, out, _) = migrate(&lab);
    assert!(!ok, "a tampered migration succeeded: {out}");
    assert_eq!(mitm.log().flipped.len(), 1, "the bit was not flipped: {out}");
    assert_source_resumed(&lab, &log);
    assert_vtpm_kept(&log);
    wait_until(Duration::from_secs(10), "no vTPM state left on host2", || !vtpm_on(&lab, "host2"));
    assert!(vtpm_on(&lab, "host1"), "the source's vTPM state is untouched");

    // The same path untampered: the vTPM moves, and only it remains.
    mitm.set_tamper(Tamper::None);
    let (ok, out, _) = migrate(&lab);
    assert!(ok, "an untampered migration failed: {out}");
    assert_eq!(lab.running_on("g"), ["host2"]);
    assert_vtpm_kept(&console_of(&lab, "host2", "g"));
    assert!(!vtpm_on(&lab, "host1"), "host1 kept vTPM state");
}

#[test]
fn the_destination_agent_killed_mid_transfer_leaves_one_vtpm() {
    let _g = serial();
    // ~32 MiB/s, so the kill lands while the state still flows.
    let lab = TestLab::up(2, 32);
    let vm = start_tpm_guest_sized(&lab, "host1", "g", 256, 192);
    let log = console_path(&vm);
    let child = spawn_migrate(&lab);
    wait_until(Duration::from_secs(30), "the incoming VM on host2", || {
        lab.vms("host2").iter().any(|v| v["name"] == "g")
    });
    // Its own swtpm, on an empty state dir: swtpm's state arrives at the
    // end of QEMU's stream, so nothing of the vTPM is there before.
    let incoming = lab.host("host2").state_dir.join("vms").join("g").join("vtpm");
    assert!(incoming.is_dir(), "the incoming VM has no vTPM state dir");
    assert!(!vtpm_on(&lab, "host2"), "vTPM state on host2 before the stream ended");
    std::thread::sleep(Duration::from_millis(1500));
    lab.kill_agent("host2");
    let o = child.wait_with_output().expect("wait migrate");
    assert!(!o.status.success(), "migration reported success: {}", text(&o));
    wait_until(Duration::from_secs(20), "the source copy to run again", || {
        lab.vm_state("host1", "g").as_deref() == Some("running")
    });
    assert_vtpm_kept(&log);
    // The restarted destination discards its incoming VM and erases its vTPM.
    lab.start_agent("host2");
    assert!(lab.vms("host2").is_empty(), "restarted host2 still lists the incoming VM");
    wait_until(Duration::from_secs(10), "no vTPM state left on host2", || !vtpm_on(&lab, "host2"));
    assert!(vtpm_on(&lab, "host1"));
    assert_eq!(lab.running_on("g"), ["host1"]);
}

/// After the Commit, no Receipt: the source's copy stays paused in doubt
/// with its vTPM state while the destination runs the VM on its own; once
/// the destination can answer, the source settles and erases its state.
#[test]
fn a_lost_receipt_keeps_one_live_vtpm_and_one_paused_copy_until_settled() {
    let _g = serial();
    let lab = TestLab::up(2, 0);
    start_tpm_guest_sized(&lab, "host1", "g", 256, 128);
    let proxy = Proxy::start(lab.host("host2").addr, ProxyMode::MuteDownstreamAfter(100 << 20));
    lab.route_peer("host1", "host2", proxy.addr);
    append_migration_config(&lab, "host1", "commit_timeout_ms = 1000\nio_timeout_ms = 2000\n");
    lab.restart_agent("host1");

    let o = lab.ferry(&["migrate", "g", "--to", "host2", "--host", "host1", "--json"]);
    assert_eq!(o.status.code(), Some(4), "expected the in-doubt exit status: {}", text(&o));
    let (_, list) = lab.ferry_json(&["migrations", "list", "--host", "host1"]);
    let id = list["migrations"][0]["id"].as_str().expect("id").to_owned();
    assert_eq!(list["migrations"][0]["state"], "in_doubt", "{list}");
    // One live vTPM (the destination's, its VM running), one paused copy
    // whose state is kept: it may still be the only one.
    assert_eq!(lab.running_on("g"), ["host2"]);
    assert_ne!(lab.vm_state("host1", "g").as_deref(), Some("running"));
    assert!(vtpm_on(&lab, "host1"), "the in-doubt copy lost its vTPM state");
    assert_vtpm_kept(&console_of(&lab, "host2", "g"));

    // The network heals: the source settles by itself and erases its copy.
    lab.unroute_peer("host1", "host2", proxy.addr);
    drop(proxy);
    lab.restart_agent("host1");
    lab.wait_completed("host1", &id);
    assert!(lab.vm_state("host1", "g").is_none(), "source copy not removed");
    assert!(!vtpm_on(&lab, "host1"), "the settled source kept vTPM state");
    assert!(
        audit_kinds(&lab, "host1").iter().any(|e| e["kind"] == "vtpm_erased"),
        "the erase is audited"
    );
}
