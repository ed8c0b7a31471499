//! libvirt's domains under Ferry, for real: each lab host runs its own
//! libvirtd (in its own mount namespace) and its agent with
//! `[vmm] backend = "libvirt"`. libvirt keeps the domain and runs its own
//! peer-to-peer migration; every byte between the hosts travels through the
//! agents' attested, authorized, signed and digested channel, and the VM
//! runs on the destination only after the digests matched.

mod common;

use common::*;
use ferry_cli::console;

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
    assert!(rec["bytes"].as_u64().unwrap_or(0) > 32 << 20, "less than the guest's memory: {rec}");
    assert!(lab.vms("host1").iter().all(|v| v["name"] != "lv"));
    assert!(lab.vms("host2").iter().any(|v| v["name"] == "lv"));
    // Exactly one copy (a persistent domain's definition moved with it),
    // both agents signed for the same bytes, and the guest went on.
    assert_domain_moved(&lab, "lv", ("host1", "host2"), &rec, (&log, &before));
    // The downtime in the source's record is libvirt's, read by host2's
    // agent, which leaves the statistics to the operator as libvirt kept them.
    let kept = virsh(&lab, "host2", &["domjobinfo", "lv", "--completed"]);
    let downtime = kept.lines().find(|l| l.starts_with("Total downtime:")).unwrap_or_default();
    let libvirt_ms: u64 =
        downtime.split_whitespace().nth(2).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(libvirt_ms > 0, "host2's libvirt no longer has the job's statistics: {kept}");
    assert_eq!(rec["qemu_downtime_ms"].as_u64(), Some(libvirt_ms), "{rec}\n{kept}");

    // And it comes back the same way.
    let (ok, back) = lab.ferry_json(&["migrate", "lv", "--to", "host1", "--host", "host2"]);
    assert!(ok, "migration back failed: {back}");
    assert_eq!(domstate(&lab, "host1", "lv").as_deref(), Some("running"));
    assert_eq!(domstate(&lab, "host2", "lv"), None);
}
