//! libvirt's domains under Ferry, for real: each lab host runs its own
//! libvirtd (in its own mount namespace) and its agent with
//! `[vmm] backend = "libvirt"`. libvirt keeps the domain and runs its own
//! peer-to-peer migration; every byte between the hosts travels through the
//! agents' attested, authorized, signed and digested channel, and the VM
//! runs on the destination only after the digests matched.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use ferry_cli::console;
use ferry_cli::lab_libvirt::{self, LabLibvirt};

fn libvirt<'a>(lab: &'a TestLab, host: &str) -> &'a LabLibvirt {
    lab.host(host).libvirt.as_ref().expect("the host runs libvirt")
}

fn virsh(lab: &TestLab, host: &str, args: &[&str]) -> String {
    let o = Command::new("virsh")
        .arg("-c")
        .arg(libvirt(lab, host).uri())
        .args(args)
        .output()
        .expect("run virsh");
    assert!(o.status.success(), "virsh {args:?} on {host}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// `virsh domstate`, or None when the host has no such domain.
fn domstate(lab: &TestLab, host: &str, vm: &str) -> Option<String> {
    let o = Command::new("virsh")
        .arg("-c")
        .arg(libvirt(lab, host).uri())
        .args(["domstate", vm])
        .output()
        .expect("run virsh");
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// Define and start the test guest as a persistent libvirt domain on
/// `host`; its console appends to a file in the lab directory.
fn start_domain(lab: &TestLab, host: &str, vm: &str, cmdline: &str) -> PathBuf {
    let console = lab.dir.path().join(format!("{vm}.console"));
    let kernel = lab.lab.images_dir.join(&lab.lab.guest_image);
    let xml = lab_libvirt::domain_xml(vm, &kernel, &console, 128, cmdline);
    let path = lab.dir.path().join(format!("{vm}.xml"));
    std::fs::write(&path, xml).expect("write domain xml");
    virsh(lab, host, &["define", path.to_str().expect("utf8")]);
    virsh(lab, host, &["start", vm]);
    wait_console(&console, Duration::from_secs(120), "READY and a clean sweep", |l| {
        console::is_ready(l) && console::clean_sweeps(l) >= 1
    });
    console
}

fn sweeps_after(log: &Path, skip: usize, n: usize) -> Vec<console::ConsoleLine> {
    wait_console(log, Duration::from_secs(90), "sweeps on the destination", |l| {
        l.iter()
            .skip(skip)
            .filter(|x| matches!(x.line, ferry_guest::GuestLine::Sweep { .. }))
            .count()
            >= n
    })
}

#[test]
fn a_libvirt_domain_moves_through_ferry_and_runs_once() {
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    let log = start_domain(&lab, "host1", "lv", "fill_mib=32 dirty=16 hb_ms=20 tlbflush=1");

    // Ferry sees libvirt's domain as a VM of host1.
    let vms = lab.vms("host1");
    let listed = vms.iter().find(|v| v["name"] == "lv").unwrap_or_else(|| panic!("{vms:?}"));
    assert_eq!(listed["state"], "running", "{listed}");
    assert_eq!(listed["memory_mib"], 128, "{listed}");

    let before = console::read_console(&log).expect("console");
    let (ok, rec) = lab.ferry_json(&["migrate", "lv", "--to", "host2", "--host", "host1"]);
    assert!(ok, "migration failed: {rec}");
    assert_eq!(rec["state"], "completed", "{rec}");
    assert!(rec["bytes"].as_u64().unwrap_or(0) > 32 << 20, "less than the guest's memory: {rec}");
    let id = rec["id"].as_str().expect("id").to_owned();

    // Exactly one copy: libvirt runs it on host2 and no longer on host1
    // (a persistent domain's definition moved with it).
    assert_eq!(domstate(&lab, "host2", "lv").as_deref(), Some("running"));
    assert_eq!(domstate(&lab, "host1", "lv"), None, "host1 still has the domain");
    assert!(lab.vms("host1").iter().all(|v| v["name"] != "lv"));
    assert!(lab.vms("host2").iter().any(|v| v["name"] == "lv"));

    // Both agents signed for the same bytes.
    let (ok, dst) = lab.ferry_json(&["migrations", "show", &id, "--host", "host2"]);
    assert!(ok, "{dst}");
    assert_eq!(dst["state"], "completed", "{dst}");
    assert_eq!((&dst["digest"], &dst["bytes"]), (&rec["digest"], &rec["bytes"]));

    // The guest went on where it was: its heartbeat continues and its
    // memory checks clean after the move.
    let after = sweeps_after(&log, before.len(), 2);
    let c = console::analyze(&before, &after[before.len()..]);
    assert!(c.heartbeat_continued, "heartbeat did not continue: {c:?}");
    assert!(c.memory_consistent(), "guest memory check failed: {c:?}");

    // And it comes back the same way.
    let (ok, back) = lab.ferry_json(&["migrate", "lv", "--to", "host1", "--host", "host2"]);
    assert!(ok, "migration back failed: {back}");
    assert_eq!(domstate(&lab, "host1", "lv").as_deref(), Some("running"));
    assert_eq!(domstate(&lab, "host2", "lv"), None);
}
