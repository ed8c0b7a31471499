//! Lab hosts that run libvirt (`ferry lab up --backend libvirt`): virsh
//! against a host's own libvirtd, and the test guest as a libvirt domain.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_cli::console;
use ferry_cli::lab_libvirt::{self, LabLibvirt};

use super::{text, wait_console, wait_until, TestLab};

pub fn libvirt<'a>(lab: &'a TestLab, host: &str) -> &'a LabLibvirt {
    lab.host(host).libvirt.as_ref().expect("the host runs libvirt")
}

pub fn virsh(lab: &TestLab, host: &str, args: &[&str]) -> String {
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
pub fn domstate(lab: &TestLab, host: &str, vm: &str) -> Option<String> {
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
pub fn start_domain(lab: &TestLab, host: &str, vm: &str, cmdline: &str) -> PathBuf {
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

pub fn sweeps_after(log: &Path, skip: usize, n: usize) -> Vec<console::ConsoleLine> {
    wait_console(log, Duration::from_secs(90), "sweeps on the destination", |l| {
        l.iter()
            .skip(skip)
            .filter(|x| matches!(x.line, ferry_guest::GuestLine::Sweep { .. }))
            .count()
            >= n
    })
}

/// `ferry migrate VM --to TO --host FROM --json`: (success, output).
pub fn migrate_domain(lab: &TestLab, vm: &str, from: &str, to: &str) -> (bool, String) {
    let o = lab.ferry(&["migrate", vm, "--to", to, "--host", from, "--json"]);
    (o.status.success(), text(&o))
}

/// After a failed migration of `vm` from `from` to `to`: libvirt runs the
/// domain on `from` again (and the guest with it, memory intact), and `to`
/// has no domain of that name, running or not.
pub fn assert_domain_stayed(lab: &TestLab, vm: &str, from: &str, to: &str, log: &Path) {
    wait_until(Duration::from_secs(30), "the source domain to run again", || {
        domstate(lab, from, vm).as_deref() == Some("running")
    });
    wait_until(Duration::from_secs(30), "no domain left on the destination", || {
        domstate(lab, to, vm).is_none()
    });
    super::assert_guest_runs(log);
    super::assert_memory_consistent(log);
}
