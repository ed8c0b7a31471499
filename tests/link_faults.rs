//! Migrations over a real, misbehaving migration network: namespaced lab
//! hosts (`ferry lab up --netns`) whose migration link drops packets,
//! goes down, or runs at 200 Mbit/s (`ferry lab link`). Whatever the link
//! does, the VM runs exactly once and its memory is intact.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Packets the lab's rules tagged `tag` dropped inside `ns`.
fn dropped(ns: &str, tag: &str) -> u64 {
    let o = Command::new("ip")
        .args(["netns", "exec", ns, "iptables", "-w", "-L", "-v", "-x", "-n"])
        .output()
        .expect("iptables");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.contains(tag))
        .filter_map(|l| l.split_whitespace().next().and_then(|p| p.parse::<u64>().ok()))
        .sum()
}

/// Both agents notice a silent link after 3 s instead of 15.
fn quick_timeouts(lab: &TestLab, extra: &str) {
    for h in ["host1", "host2"] {
        lab.edit_config(h, "[migration]\n", &format!("[migration]\nio_timeout_ms = 3000\n{extra}"));
        lab.restart_agent(h);
    }
}

/// 2 % of the packets in and out of the source's migration link are lost:
/// TCP carries the migration through, both sides agree on the digest and
/// the guest's memory checks clean.
#[test]
fn two_percent_loss_on_the_migration_link() {
    let t0 = Instant::now();
    let lab = TestLab::up_with(2, 0, &["--netns"]);
    // A lossy link carries a few MB/s: a gently dirtying guest, and a
    // failure within 90 s rather than 10 minutes.
    quick_timeouts(&lab, "max_transfer_ms = 90000\n");
    lab.start_guest("host1", "g", 128, "fill_mib=48 dirty=1 hb_ms=10");
    let said = lab.link("host1", &["--loss", "2%"]);
    assert!(said.contains("dropping 2% of the frames"), "{said}");

    let started = Instant::now();
    let (ok, rec) = lab.ferry_json(&["migrate", "g", "--to", "host2", "--host", "host1"]);
    let lost = dropped(&lab.netns("host1"), "ferry-loss");
    eprintln!("{lost} frames dropped; {} B in {:?}", rec["bytes"], started.elapsed());
    assert!(ok, "migration over a lossy link failed: {rec}");
    // 1448-byte segments: 2 % of them is hundreds of frames.
    assert!(lost > 300, "the loss rule dropped only {lost} frames");
    let id = rec["id"].as_str().expect("id").to_owned();
    let (ok, dst) = lab.ferry_json(&["migrations", "show", &id, "--host", "host2"]);
    assert!(ok, "{dst}");
    assert_eq!(dst["digest"], rec["digest"], "the two sides disagree on what moved");
    assert_moved_intact(&lab, "g", &id);
    assert_eq!(lab.running_on("g"), ["host2"]);

    let cleared = lab.link("host1", &["--clear"]);
    assert!(cleared.contains("restored"), "{cleared}");
    assert_eq!(dropped(&lab.netns("host1"), "ferry-"), 0, "--clear left rules behind");
    eprintln!("took {:?}", t0.elapsed());
}

/// The destination's migration link goes down in mid-transfer. The
/// operator still reaches both agents (the management network is up); the
/// source gives up within its timeout and resumes, the destination's QEMU
/// goes, and one copy runs.
#[test]
fn migration_link_down_mid_transfer() {
    let t0 = Instant::now();
    let lab = TestLab::up_with(2, 24, &["--netns"]);
    quick_timeouts(&lab, "");
    let vm = lab.start_guest("host1", "g", 256, "fill_mib=192 dirty=32 hb_ms=10");
    let log = PathBuf::from(vm["console_log"].as_str().expect("log"));

    let child = spawn_migrate(&lab);
    wait_until(Duration::from_secs(60), "the incoming VM on host2", || {
        lab.vms("host2").iter().any(|v| v["name"] == "g")
    });
    std::thread::sleep(Duration::from_millis(1500));
    let said = lab.link("host2", &["--down"]);
    assert!(said.contains("down"), "{said}");
    let cut = Instant::now();

    let o = child.wait_with_output().expect("wait migrate");
    assert!(!o.status.success(), "migration over a dead link succeeded: {}", text(&o));
    eprintln!("failure reported {} ms after the link went down", cut.elapsed().as_millis());
    wait_until(Duration::from_secs(20), "the source copy to run again", || {
        lab.vm_state("host1", "g").as_deref() == Some("running")
    });
    assert_guest_runs(&log);
    wait_until(Duration::from_secs(30), "no QEMU left on host2", || {
        live_qemus_under(&lab.host("host2").state_dir).is_empty()
    });
    assert!(lab.vms("host2").is_empty(), "host2 still lists the VM");
    assert_eq!(lab.running_on("g"), ["host1"]);
    let lines = ferry_cli::console::read_console(&log).expect("console");
    assert!(
        !lines.iter().any(|l| matches!(l.line, ferry_guest::GuestLine::Corrupt { .. })),
        "guest memory corrupted"
    );
    eprintln!("took {:?}", t0.elapsed());
}

/// A 200 Mbit/s link and a guest that dirties memory: the migration either
/// converges (intact, on the destination) or is aborted at max_transfer_ms
/// with the VM running on the source; nothing is left half-done. The link
/// never carried more than its rate.
#[test]
fn rate_limited_link_with_a_dirtying_guest() {
    let t0 = Instant::now();
    let lab = TestLab::up_with(2, 0, &["--netns"]);
    quick_timeouts(&lab, "max_transfer_ms = 15000\n");
    let vm = lab.start_guest("host1", "g", 128, "fill_mib=64 dirty=32 hb_ms=10");
    let log = PathBuf::from(vm["console_log"].as_str().expect("log"));
    let said = lab.link("host1", &["--rate", "200mbit"]);
    assert!(said.contains("200 Mbit/s"), "{said}");

    let h1 = lab.netns("host1");
    let sent_before = if_bytes(&h1, "mig").1;
    let started = Instant::now();
    let o = lab.ferry(&["migrate", "g", "--to", "host2", "--host", "host1", "--json"]);
    let secs = started.elapsed().as_secs_f64();
    let sent = if_bytes(&h1, "mig").1 - sent_before;
    let mbit_s = sent as f64 * 8.0 / secs / 1e6;
    eprintln!("{sent} B in {secs:.1} s: {mbit_s:.0} Mbit/s on a 200 Mbit/s link");
    // The bucket can release one burst above the rate; the wall time also
    // counts the handshake, so the average stays below the rate.
    assert!(mbit_s < 210.0, "the link carried {mbit_s:.0} Mbit/s, more than its rate");
    assert!(sent > 32 << 20, "only {sent} B crossed the migration link");

    if o.status.success() {
        let rec: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        eprintln!("converged: {rec}");
        assert_moved_intact(&lab, "g", rec["id"].as_str().expect("id"));
        assert_eq!(lab.running_on("g"), ["host2"]);
    } else {
        let out = text(&o);
        eprintln!("aborted: {out}");
        assert!(out.contains("did not converge"), "failed for another reason: {out}");
        wait_until(Duration::from_secs(20), "the source copy to run again", || {
            lab.vm_state("host1", "g").as_deref() == Some("running")
        });
        assert_guest_runs(&log);
        wait_until(Duration::from_secs(30), "no QEMU left on host2", || {
            live_qemus_under(&lab.host("host2").state_dir).is_empty()
        });
        assert_eq!(lab.running_on("g"), ["host1"]);
    }
    eprintln!("took {:?}", t0.elapsed());
}

/// host1 partitioned from host2's migration address: a migration cannot
/// even connect, is refused naming host2, and the VM keeps running on
/// host1; after `--clear` it moves.
#[test]
fn a_partitioned_peer_cannot_be_reached_until_cleared() {
    let t0 = Instant::now();
    let lab = TestLab::up_with(2, 0, &["--netns"]);
    let vm = lab.start_guest("host1", "g", 128, "fill_mib=32 dirty=1 hb_ms=10");
    let log = PathBuf::from(vm["console_log"].as_str().expect("log"));
    let said = lab.link("host1", &["--partition", "host2"]);
    assert!(said.contains("partitioned from host2"), "{said}");

    let o = lab.ferry(&["migrate", "g", "--to", "host2", "--host", "host1", "--json"]);
    assert!(!o.status.success(), "migration across a partition succeeded: {}", text(&o));
    assert!(text(&o).contains("host2"), "the error does not name host2: {}", text(&o));
    assert!(dropped(&lab.netns("host1"), "ferry-partition-host2") > 0, "nothing was dropped");
    assert_eq!(lab.running_on("g"), ["host1"]);
    assert_guest_runs(&log);

    lab.link("host1", &["--clear"]);
    let (ok, rec) = lab.ferry_json(&["migrate", "g", "--to", "host2", "--host", "host1"]);
    assert!(ok, "migration after --clear failed: {rec}");
    assert_eq!(lab.running_on("g"), ["host2"]);
    eprintln!("took {:?}", t0.elapsed());
}

/// host2's outgoing frames with a payload on its migration link, counted
/// by a rule tagged `tag` (the bytes it matched).
fn matched_bytes(ns: &str, tag: &str) -> u64 {
    let o = Command::new("ip")
        .args(["netns", "exec", ns, "iptables", "-w", "-L", "OUTPUT", "-v", "-x", "-n"])
        .output()
        .expect("iptables");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.contains(tag))
        .filter_map(|l| l.split_whitespace().nth(1).and_then(|b| b.parse::<u64>().ok()))
        .sum()
}

fn iptables(ns: &str, args: &[&str]) {
    let o = Command::new("ip")
        .args(["netns", "exec", ns, "iptables", "-w"])
        .args(args)
        .output()
        .expect("ip");
    assert!(o.status.success(), "iptables {args:?}: {}", text(&o));
}

/// The destination's last words do not cross the migration link (a
/// one-way failure made with iptables in host2's namespace: its frames
/// with a payload pass until a quota measured on an identical migration,
/// minus the Receipt's, is used up). host2 gets the Commit and runs the
/// VM; host1 never hears the Receipt and stays in doubt with its copy
/// paused. With the link restored, `ferry migrations resolve` settles it:
/// one copy runs, on host2.
#[test]
fn receipt_lost_on_the_link_is_in_doubt_until_resolved() {
    let t0 = Instant::now();
    let lab = TestLab::up_with(2, 0, &["--netns"]);
    quick_timeouts(&lab, "commit_timeout_ms = 1000\n");
    let ns2 = lab.netns("host2");
    let payload = ["-o", "mig", "-m", "length", "--length", "100:65535", "-m", "comment"];
    // Two identical quiet guests: the first measures what host2 says in a migration.
    let cmdline = "fill_mib=48 dirty=0 hb_ms=10";
    lab.start_guest("host1", "probe", 128, cmdline);
    iptables(&ns2, &[&["-A", "OUTPUT"][..], &payload, &["--comment", "ferry-test-count"]].concat());
    let (ok, rec) = lab.ferry_json(&["migrate", "probe", "--to", "host2", "--host", "host1"]);
    assert!(ok, "{rec}");
    let said = matched_bytes(&ns2, "ferry-test-count");
    lab.start_guest("host1", "g", 128, cmdline);
    lab.link("host2", &["--clear"]);
    let quota = (said - 150).to_string();
    let pass = [&["-A", "OUTPUT"][..], &payload, &["--comment", "ferry-test-quota"]].concat();
    iptables(&ns2, &[&pass[..], &["-m", "quota", "--quota", &quota, "-j", "ACCEPT"]].concat());
    let mute = [&["-A", "OUTPUT"][..], &payload, &["--comment", "ferry-test-mute"]].concat();
    iptables(&ns2, &[&mute[..], &["-j", "DROP"]].concat());

    let o = lab.ferry(&["migrate", "g", "--to", "host2", "--host", "host1", "--json"]);
    eprintln!(
        "host2 said {said} B in the probe; muted {} B",
        matched_bytes(&ns2, "ferry-test-mute")
    );
    assert_eq!(o.status.code(), Some(4), "expected the in-doubt exit status: {}", text(&o));
    let (_, list) = lab.ferry_json(&["migrations", "list", "--host", "host1"]);
    let m = list["migrations"]
        .as_array()
        .expect("list")
        .iter()
        .find(|m| m["state"] == "in_doubt")
        .cloned()
        .unwrap_or_else(|| panic!("no migration in doubt: {list}"));
    let id = m["id"].as_str().expect("id").to_owned();
    assert_ne!(lab.vm_state("host1", "g").as_deref(), Some("running"));
    assert_eq!(lab.running_on("g"), ["host2"]);

    // `--clear` removes every rule tagged ferry-, the test's too.
    lab.link("host2", &["--clear"]);
    assert_eq!(matched_bytes(&ns2, "ferry-"), 0, "rules left behind");
    // The source agent's own retry loop may be asking at the same moment
    // ("already being worked on") or have settled it first ("completed").
    wait_until(Duration::from_secs(30), "resolve to settle the migration", || {
        let (ok, v) = lab.ferry_json(&["migrations", "resolve", &id, "--host", "host1"]);
        let message = v["message"].as_str().unwrap_or("");
        assert!(ok || message.contains("being worked on") || message.contains("completed"), "{v}");
        ok || message.contains("completed")
    });
    let (_, m) = lab.ferry_json(&["migrations", "show", &id, "--host", "host1"]);
    assert_eq!(m["state"], "completed", "{m}");
    assert!(lab.vm_state("host1", "g").is_none(), "the source copy was not retired");
    assert_eq!(lab.running_on("g"), ["host2"]);
    eprintln!("took {:?}", t0.elapsed());
}
