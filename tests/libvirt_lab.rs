//! `ferry lab up --backend libvirt` leaves nothing behind when it fails, and
//! `ferry lab start` brings a host's libvirtd back.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn pid_in(file: &Path) -> Option<i32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// host2's libvirt cannot start (its directory is taken by a file): `lab
/// up` fails, and what it had started (host1's libvirtd, both swtpms) is
/// stopped.
#[test]
fn a_failed_lab_up_stops_what_it_started() {
    let dir = tempfile::Builder::new().prefix("ferry-e2e-").tempdir_in("/tmp").expect("tempdir");
    std::fs::create_dir_all(dir.path().join("hosts/host2")).expect("mkdir");
    std::fs::write(dir.path().join("hosts/host2/libvirt"), "not a directory").expect("write");
    let d = dir.path().to_str().expect("utf8");
    let o = run(&["lab", "up", "--hosts", "2", "--dir", d, "--backend", "libvirt"], None);
    assert!(!o.status.success(), "lab up succeeded: {}", text(&o));
    let host1 = dir.path().join("hosts/host1/libvirt");
    let pid = pid_in(&host1.join("daemon.pid")).expect("host1's libvirtd was started first");
    wait_until(Duration::from_secs(10), "host1's libvirtd to stop", || !pid_alive(pid));
    if let Some(p) = pid_in(&host1.join("run/libvirtd.pid")) {
        assert!(!pid_alive(p), "libvirtd {p} of host1 still runs");
    }
    // Both hosts' swtpms were started before host2's libvirtd failed.
    for host in ["host1", "host2"] {
        let tpm = dir.path().join("hosts").join(host).join("tpm");
        let pid = pid_in(&tpm.join("swtpm.pid")).unwrap_or_else(|| panic!("{host}'s swtpm"));
        wait_until(Duration::from_secs(10), "the swtpms to stop", || !pid_alive(pid));
    }
}

/// host1's agent and libvirtd are killed (-9) while a domain runs; `lab
/// start` restarts both, libvirt finds its domain again, the agent lists it,
/// and it migrates.
#[test]
fn lab_start_restarts_a_hosts_libvirtd() {
    let t0 = Instant::now();
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    start_domain(&lab, "host1", "lv", "fill_mib=8 hb_ms=50 tlbflush=1");
    let lv = libvirt(&lab, "host1");
    let daemon = lv.daemon();
    lab.kill_agent("host1");
    let _ = std::process::Command::new("kill").args(["-9", &daemon.to_string()]).status();
    wait_until(Duration::from_secs(10), "libvirtd to die", || !pid_alive(daemon));
    lab.start_agent("host1");
    assert_ne!(lv.daemon(), daemon, "lab start did not start a new libvirtd");
    assert!(pid_alive(lv.daemon()));
    assert_eq!(domstate(&lab, "host1", "lv").as_deref(), Some("running"));
    assert_eq!(lab.vm_state("host1", "lv").as_deref(), Some("running"));
    // A domain with no job has no job statistics: libvirt answers with no
    // parameters at all, which once aborted an agent polling a migration
    // that had just ended.
    let job = ferry_libvirt::Libvirt::new(&lv.uri()).job("lv").expect("job statistics");
    assert_eq!(job.data_total, 0, "{job:?}");
    let (ok, out) = migrate_domain(&lab, "lv", "host1", "host2");
    assert!(ok, "migration after the restart failed: {out}");
    assert_eq!(domain_running_on(&lab, "lv"), ["host2"]);
    eprintln!("libvirtd restart: whole test {} ms", t0.elapsed().as_millis());
}
