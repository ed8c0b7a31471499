//! libvirt's domains under attack and under faults, for real (each lab host
//! its own libvirtd, the test guest as a libvirt domain): whatever happens
//! to the carried migration, libvirt runs exactly one copy of the domain.

mod common;

use std::time::Instant;

use common::*;

/// A bit flipped in the carried stream (the man in the middle of
/// tests/wire_attacks.rs, between the agents): the destination never opens
/// the gate, libvirt fails the job, the source domain runs on and the
/// destination has no domain. The same path without the flip migrates.
#[test]
fn a_flipped_bit_in_a_libvirt_stream_keeps_the_domain_on_the_source() {
    let t0 = Instant::now();
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    let log = start_domain(&lab, "host1", "lv", "fill_mib=32 dirty=16 hb_ms=20 tlbflush=1");
    let mitm = Mitm::start(lab.host("host2").addr, Tamper::None, None);
    lab.route_peer("host1", "host2", mitm.addr);
    lab.restart_agent("host1");

    mitm.set_tamper(Tamper::FlipBit { dir: Dir::Up, offset: 8 << 20, mask: 0x10 });
    let (ok, out) = migrate_domain(&lab, "lv", "host1", "host2");
    assert!(!ok, "a tampered migration succeeded: {out}");
    let seen = mitm.log();
    assert_eq!(seen.flipped.len(), 1, "the bit was not flipped ({seen:?}): {out}");
    assert_domain_stayed(&lab, "lv", "host1", "host2", &log);
    assert_refused_at_the_gate(&lab, "host1", "host2");

    // The tampering, not the proxy, failed it.
    mitm.set_tamper(Tamper::None);
    let (ok, out) = migrate_domain(&lab, "lv", "host1", "host2");
    assert!(ok, "an untampered migration through the proxy failed: {out}");
    assert_eq!(domstate(&lab, "host2", "lv").as_deref(), Some("running"));
    assert_eq!(domstate(&lab, "host1", "lv"), None);
    eprintln!("bit flip under libvirt: whole test {} ms", t0.elapsed().as_millis());
}

/// A migration of `lv` (64 MiB of dirty memory at 8 MiB/s) from host1 to
/// host2, running in the background, with the incoming domain created.
fn migrating(lab: &TestLab) -> (std::path::PathBuf, std::process::Child) {
    let log = start_domain(lab, "host1", "lv", "fill_mib=64 dirty=16 hb_ms=20 tlbflush=1");
    slow_migration(lab, "host1", "lv", 8);
    let child = spawn_migrate_domain(lab, "lv", "host1", "host2");
    wait_domain_arriving(lab, "host2", "lv");
    (log, child)
}

/// The migration's record on `host` reaches `state` (after a restart the
/// agent settles what it left).
fn wait_record(lab: &TestLab, host: &str, state: &str) {
    wait_until(std::time::Duration::from_secs(60), "the record to settle", || {
        records(lab, host).last().map(|r| r.0.as_str()) == Some(state)
    });
}

/// kill -9 of the destination agent mid-transfer: libvirt's connections
/// die with it, libvirt fails the job and resumes the domain on the source,
/// the destination's libvirtd drops its half. One copy, on the source; the
/// destination agent, restarted, records the migration as aborted.
#[test]
fn the_destination_agent_killed_mid_transfer_leaves_the_domain_on_the_source() {
    let t0 = Instant::now();
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    let (log, child) = migrating(&lab);
    lab.kill_agent("host2");
    let out = child.wait_with_output().expect("migrate");
    assert!(!out.status.success(), "the migration succeeded without its destination agent");
    assert_domain_stayed(&lab, "lv", "host1", "host2", &log);
    lab.start_agent("host2");
    wait_record(&lab, "host2", "aborted");
    assert_eq!(records(&lab, "host1").last().map(|r| r.0.as_str()), Some("aborted"));
    assert_eq!(domain_running_on(&lab, "lv"), ["host1"]);
    eprintln!("destination agent killed: whole test {} ms", t0.elapsed().as_millis());
}

/// kill -9 of the source agent mid-transfer: libvirt's local connections
/// die, libvirt fails the job and resumes the domain; the destination cuts
/// its half. The source agent, restarted, settles its record: one copy,
/// running on the source.
#[test]
fn the_source_agent_killed_mid_transfer_leaves_the_domain_on_the_source() {
    let t0 = Instant::now();
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    let (log, child) = migrating(&lab);
    lab.kill_agent("host1");
    let out = child.wait_with_output().expect("migrate");
    assert!(!out.status.success(), "the migration succeeded without its source agent");
    assert_domain_stayed(&lab, "lv", "host1", "host2", &log);
    wait_record(&lab, "host2", "aborted");
    lab.start_agent("host1");
    wait_record(&lab, "host1", "aborted");
    assert_eq!(domain_running_on(&lab, "lv"), ["host1"]);
    assert_guest_runs(&log);
    eprintln!("source agent killed: whole test {} ms", t0.elapsed().as_millis());
}

/// The link is lost while the destination's gate holds: the destination
/// QEMU loaded everything and its SHUT waits, but the destination's
/// `Loaded` never reaches the source (everything downstream is swallowed),
/// so no Commit comes; then the link is cut. The source QEMU, stopped for
/// its last phase, never gets SHUT: libvirt fails the job and resumes it;
/// the destination never opens its gate and drops its half. One copy, on
/// the source.
#[test]
fn a_link_cut_while_the_gate_holds_leaves_the_domain_on_the_source() {
    let t0 = Instant::now();
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    let log = start_domain(&lab, "host1", "lv", "fill_mib=32 dirty=16 hb_ms=20 tlbflush=1");
    let proxy = Proxy::start(lab.host("host2").addr, ProxyMode::MuteDownstreamAfter(4 << 20));
    lab.route_peer("host1", "host2", proxy.addr);
    for host in ["host1", "host2"] {
        append_migration_config(&lab, host, "io_timeout_ms = 5000\ncommit_timeout_ms = 3000");
    }
    lab.restart_agent("host1");
    lab.restart_agent("host2");
    let child = spawn_migrate_domain(&lab, "lv", "host1", "host2");
    // The source domain stops for the last phase once its QEMU sent
    // everything; the destination's QEMU holds it all, its SHUT held.
    wait_until(std::time::Duration::from_secs(90), "the source's last phase", || {
        domstate(&lab, "host1", "lv").as_deref() == Some("paused")
    });
    assert_eq!(domstate(&lab, "host2", "lv").as_deref(), Some("paused"));
    proxy.cut();
    let out = child.wait_with_output().expect("migrate");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "the migration succeeded over a cut link: {said}");
    assert_domain_stayed(&lab, "lv", "host1", "host2", &log);
    let audit = std::fs::read_to_string(lab.host("host2").state_dir.join("audit.log"))
        .expect("host2 audit log");
    assert!(!audit.contains("\"resuming\""), "host2 opened its gate: {audit}");
    wait_record(&lab, "host1", "aborted");
    wait_record(&lab, "host2", "aborted");
    assert_eq!(domain_running_on(&lab, "lv"), ["host1"]);
    eprintln!("link cut while the gate holds: {said}; whole test {} ms", t0.elapsed().as_millis());
}

/// kill -9 of the source agent right after it committed (its domain
/// stopped for the last phase, the destination's gate about to open, and
/// libvirt's Finish and Confirm still to travel through the agent). Whatever
/// libvirt then does, once the restarted source agent settled the
/// migration exactly one copy runs, on the host its record names.
#[test]
fn the_source_agent_killed_at_the_switchover_leaves_exactly_one_copy() {
    let t0 = Instant::now();
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    start_domain(&lab, "host1", "lv", "fill_mib=32 dirty=16 hb_ms=20 tlbflush=1");
    let child = spawn_migrate_domain(&lab, "lv", "host1", "host2");
    // The source's QEMU sent everything and waits, stopped, for SHUT; its
    // agent recorded and sent the Commit (libvirt's paused state lasts
    // milliseconds and is easily missed by polling; this state lasts until
    // libvirt's Finish and the Receipt).
    wait_until(std::time::Duration::from_secs(90), "the source's Commit", || {
        records(&lab, "host1").last().is_some_and(|r| r.0 == "committed")
    });
    lab.kill_agent("host1");
    let _ = child.wait_with_output();
    lab.start_agent("host1");
    wait_until(std::time::Duration::from_secs(90), "host1 to settle the migration", || {
        records(&lab, "host1").last().is_some_and(|r| r.0 == "completed" || r.0 == "aborted")
    });
    let settled = records(&lab, "host1").last().cloned().expect("a record");
    let states: Vec<_> = ["host1", "host2"].map(|h| domstate(&lab, h, "lv")).into();
    eprintln!("killed at the switchover: host1 record {settled:?}, domains {states:?}");
    assert_eq!(domain_running_on(&lab, "lv").len(), 1, "domains: {states:?}");
    let expected = if settled.0 == "completed" { "host2" } else { "host1" };
    assert_eq!(domain_running_on(&lab, "lv"), [expected], "record {settled:?}");
    eprintln!("source killed at the switchover: whole test {} ms", t0.elapsed().as_millis());
}

/// kill -9 of the destination agent once its gate opened (its audit log
/// says `resuming`: the digests matched and SHUT is about to go) and before
/// its Receipt: libvirt's control connection dies with it, so libvirt
/// cannot finish on the destination. Once host2's agent is back and the
/// agents settled the migration, exactly one copy runs, on the host the
/// records name: never none, never two.
#[test]
fn the_destination_agent_killed_after_its_gate_opened_leaves_exactly_one_copy() {
    let t0 = Instant::now();
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    start_domain(&lab, "host1", "lv", "fill_mib=32 dirty=16 hb_ms=20 tlbflush=1");
    let child = spawn_migrate_domain(&lab, "lv", "host1", "host2");
    wait_gate_opened(&lab, "host2");
    lab.kill_agent("host2");
    let audit = lab.host("host2").state_dir.join("audit.log");
    let said = std::fs::read_to_string(&audit).expect("host2 audit log");
    assert!(!said.contains("\"receipt_sent\""), "the kill came after the Receipt: {said}");
    lab.start_agent("host2");
    let settled = settled_with_one_copy(&lab, child);
    eprintln!("destination killed at its gate: {settled}, {} ms", t0.elapsed().as_millis());
}

/// kill -9 of the destination agent after libvirt ran the domain there and
/// it signed its Receipt, which never reached the source: the man in the
/// middle lets the small frames (SHUT) through once host2's gate opened and
/// swallows the Receipt (a signed message: kilobytes). The source, in
/// doubt, asks host2 (before or after its restart) and both records say
/// completed: one copy, on host2.
#[test]
fn the_destination_agent_killed_before_its_receipt_arrived_leaves_one_copy_there() {
    let t0 = Instant::now();
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    start_domain(&lab, "host1", "lv", "fill_mib=32 dirty=16 hb_ms=20 tlbflush=1");
    let mitm = Mitm::start(lab.host("host2").addr, Tamper::None, None);
    lab.route_peer("host1", "host2", mitm.addr);
    lab.restart_agent("host1");
    // The migration's first connection carries its session: SHUT, then
    // the Receipt.
    let session = mitm.log().connections + 1;
    let child = spawn_migrate_domain(&lab, "lv", "host1", "host2");
    wait_gate_opened(&lab, "host2");
    mitm.mute_down_from_record(session, 512);
    wait_audited(&lab, "host2", "receipt_sent");
    lab.kill_agent("host2");
    lab.start_agent("host2");
    let settled = settled_with_one_copy(&lab, child);
    assert_eq!(settled, "completed", "the domain runs on host2");
    // The Receipt never came on the session: the source had it by asking,
    // and took host2's downtime from it too.
    let received: Vec<_> = audit_events(&lab, "host1", "receipt_received");
    assert!(!received.is_empty(), "host1 settled without a receipt");
    assert!(received.iter().all(|e| e["detail"]["via"] == "resolve"), "{received:?}");
    let (_, list) = lab.ferry_json(&["migrations", "list", "--host", "host1"]);
    let rec = list["migrations"].as_array().and_then(|m| m.last()).cloned().unwrap_or_default();
    assert!(rec["qemu_downtime_ms"].as_u64().is_some(), "no downtime on host1: {rec}");
    eprintln!("destination killed before its Receipt: {} ms", t0.elapsed().as_millis());
}

/// kill -9 of the destination agent after libvirt ran the domain there and
/// *before* it signed its Receipt: its record says `resuming`, and the
/// restarted agent, finding the domain running, settles it completed and
/// signs the Receipt then, so the source (in doubt) settles by asking, on
/// its own. The window is forced by stopping host2's agent (SIGSTOP) the
/// moment libvirt reports the domain resumed there (its lifecycle event);
/// the agent polls for that every 100 ms, so it rarely signed first, and
/// an attempt where it did is retried the other way round.
#[test]
fn the_destination_agent_killed_before_signing_its_receipt_signs_it_after_restart() {
    let t0 = Instant::now();
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    start_domain(&lab, "host1", "lv", "fill_mib=32 dirty=16 hb_ms=20 tlbflush=1");
    let (mut from, mut to) = ("host1", "host2");
    for attempt in 1..=3 {
        let signed_before = audit_events(&lab, to, "receipt_sent").len();
        let events = lifecycle_events(&lab, to);
        let child = spawn_migrate_domain(&lab, "lv", from, to);
        stop_agent_when_resumed(&lab, to, "lv", events);
        if audit_events(&lab, to, "receipt_sent").len() > signed_before {
            // It signed before it was stopped: not this test's window.
            signal_agent(&lab, to, "-CONT");
            settled_with_one_copy(&lab, child);
            eprintln!("attempt {attempt}: {to} signed before it stopped; again the other way");
            (from, to) = (to, from);
            continue;
        }
        lab.kill_agent(to);
        lab.start_agent(to);
        let settled = settled_with_one_copy(&lab, child);
        assert_eq!(settled, "completed", "the domain runs on {to}");
        let signed_after = audit_events(&lab, to, "receipt_sent").len();
        assert_eq!(signed_after, signed_before + 1, "{to} signed no receipt after its restart");
        let received = audit_events(&lab, from, "receipt_received");
        let via = received.last().map(|e| e["detail"]["via"].clone());
        assert_eq!(via, Some("resolve".into()), "{from} settled without the receipt: {received:?}");
        let ms = t0.elapsed().as_millis();
        eprintln!("destination killed before signing: attempt {attempt}, {ms} ms");
        return;
    }
    panic!("three attempts, and each time the destination signed before it could be stopped");
}

/// After a fault: wait for `ferry migrate` and for both agents to settle
/// the migration of `lv`; they agree, and exactly one copy runs, on the
/// host their records name. Returns the settled state.
fn settled_with_one_copy(lab: &TestLab, migrate: std::process::Child) -> String {
    let out = migrate.wait_with_output().expect("migrate");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let settled = |h: &str| {
        records(lab, h).last().map(|r| r.0.clone()).filter(|s| s == "completed" || s == "aborted")
    };
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    while settled("host1").is_none() || settled("host2").is_none() {
        let (src, dst) = (records(lab, "host1"), records(lab, "host2"));
        assert!(Instant::now() < deadline, "unsettled: host1 {src:?}, host2 {dst:?}; {out}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let (src, dst) = (settled("host1"), settled("host2"));
    let states: Vec<_> = ["host1", "host2"].map(|h| domstate(lab, h, "lv")).into();
    eprintln!("migrate said {out}; records {src:?} {dst:?}; domains {states:?}");
    assert_eq!(src, dst, "the agents disagree; domains {states:?}");
    let src = src.expect("settled");
    let expected = if src == "completed" { "host2" } else { "host1" };
    assert_eq!(domain_running_on(lab, "lv"), [expected], "records {src:?}, domains {states:?}");
    src
}

/// `virsh event --loop` on `host`: every domain's lifecycle, line-buffered
/// (the incoming domain does not exist yet).
fn lifecycle_events(lab: &TestLab, host: &str) -> std::process::Child {
    let uri = common::libvirt(lab, host).uri();
    std::process::Command::new("stdbuf")
        .args(["-oL", "virsh", "-c", &uri, "event", "--event", "lifecycle"])
        .arg("--loop")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("virsh event")
}

/// SIGSTOP `host`'s agent the moment libvirt says `vm` resumed there.
fn stop_agent_when_resumed(lab: &TestLab, host: &str, vm: &str, mut events: std::process::Child) {
    use std::io::BufRead;
    let out = events.stdout.take().expect("virsh event stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let domain = format!("'{vm}'");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains(&domain) && line.contains("Resumed") && tx.send(line).is_err() {
                return;
            }
        }
    });
    let resumed = rx.recv_timeout(std::time::Duration::from_secs(120));
    if resumed.is_ok() {
        signal_agent(lab, host, "-STOP");
    }
    let _ = events.kill();
    let _ = events.wait();
    assert!(resumed.is_ok(), "libvirt on {host} never reported the domain resumed");
}

fn signal_agent(lab: &TestLab, host: &str, signal: &str) {
    let pid = lab.agent_pid(host).to_string();
    let ok = std::process::Command::new("kill").args([signal, &pid]).status().expect("kill");
    assert!(ok.success(), "kill {signal} {pid}");
}
