//! VMs with a vTPM, end to end with real agents, real QEMU (TCG) and real
//! swtpm: the guest's PCR 16 and NV counter survive each hop, the source
//! keeps no vTPM state, an old copy put back is refused at adoption, and a
//! destination that cannot host a vTPM is refused before any VM byte.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use ferry_cli::console::{self, ConsoleLine};
use ferry_guest::{expected_pcr16, GuestLine};
use serde_json::Value;

const MARKER: &str = "FERRY-VTPM-E2E";

/// Start the test guest with a vTPM (tpm-crb) that extends PCR 16 with
/// MARKER and bumps its NV counter at boot, then re-reads both every 300 ms.
fn start_tpm_guest(lab: &TestLab, host: &str, vm: &str) -> Value {
    let spec = serde_json::json!({
        "name": vm, "memory_mib": 64, "vcpus": 1, "machine": "q35", "tpm": "crb",
        "boot": {"type": "kernel", "kernel": "ferry-guest.elf",
                 "cmdline": format!("fill_mib=16 dirty=16 hb_ms=10 tlbflush=1 tpm={MARKER} tpm_ms=300")},
    });
    let path = lab.dir.path().join(format!("{vm}.spec.json"));
    std::fs::write(&path, spec.to_string()).expect("write spec");
    let (ok, v) =
        lab.ferry_json(&["vm", "start", "--host", host, "--spec", path.to_str().expect("utf8")]);
    assert!(ok, "vm start failed: {v}");
    assert_eq!(v["tpm"], "crb", "the agent reports the vTPM: {v}");
    let log = PathBuf::from(v["console_log"].as_str().expect("console_log"));
    wait_console(&log, Duration::from_secs(120), "READY, a TPM line, a clean sweep", |l| {
        console::is_ready(l) && !tpm_reads(l).is_empty() && console::clean_sweeps(l) >= 1
    });
    v
}

/// Every (PCR 16, NV counter) the guest printed, in order.
fn tpm_reads(lines: &[ConsoleLine]) -> Vec<(String, u64)> {
    lines
        .iter()
        .filter_map(|l| match &l.line {
            GuestLine::Tpm { pcr16, nv } => Some((pcr16.clone(), *nv)),
            _ => None,
        })
        .collect()
}

fn console_of(lab: &TestLab, host: &str, vm: &str) -> PathBuf {
    let v = lab.vms(host).into_iter().find(|v| v["name"] == vm).expect("VM listed");
    assert_eq!(v["tpm"], "crb", "vm list says which VMs have a vTPM: {v}");
    PathBuf::from(v["console_log"].as_str().expect("console_log"))
}

/// After a hop: the guest reads its vTPM again on `host` (fresh TPM lines
/// after the migration), and what it reads is what it had: the one PCR 16
/// extension of its boot and the counter of its one boot.
fn assert_vtpm_kept(log: &Path) {
    let before = tpm_reads(&console::read_console(log).expect("console")).len();
    let lines = wait_console(log, Duration::from_secs(60), "two new TPM lines", |l| {
        tpm_reads(l).len() >= before + 2
    });
    for (pcr, nv) in tpm_reads(&lines) {
        assert_eq!(pcr, expected_pcr16(MARKER), "PCR 16 changed");
        assert_eq!(nv, 1, "the NV counter changed");
    }
    assert!(
        !lines.iter().any(|l| matches!(&l.line, GuestLine::Other(s) if s.starts_with("TPM ERROR"))),
        "the guest's vTPM failed"
    );
}

/// vTPM state files (any entry under a `vtpm` directory) below `dir`.
fn vtpm_state_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.parent().is_some_and(|parent| parent.ends_with("vtpm")) {
                found.push(p);
            }
        }
    }
    found
}

fn audit_kinds(lab: &TestLab, host: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(audit_log(lab, host)).expect("audit log");
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("log line")["record"]["event"].clone())
        .filter(|e| e["kind"].as_str().is_some_and(|k| k.starts_with("vtpm")))
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else if p.is_file() {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}

#[test]
fn a_vtpm_moves_there_and_back_exists_once_and_an_old_copy_is_refused() {
    let lab = TestLab::up(2, 0);
    start_tpm_guest(&lab, "host1", "g");
    let host1_vms = lab.host("host1").state_dir.join("vms");
    assert!(!vtpm_state_under(&host1_vms).is_empty(), "swtpm keeps its state in the VM's dir");
    // What a backup of the source taken before the migration holds.
    let backup = lab.dir.path().join("backup-g");
    copy_dir(&host1_vms.join("g"), &backup);

    // host1 -> host2 under the guest's dirtying load.
    let (ok, rec) = lab.ferry_json(&["migrate", "g", "--to", "host2", "--host", "host1"]);
    assert!(ok, "migration failed: {rec}");
    let id = rec["id"].as_str().expect("id").to_owned();
    assert_eq!(rec["tpm"], "crb", "the record says the VM has a vTPM: {rec}");
    assert_eq!(lab.running_on("g"), ["host2"]);
    assert_moved_intact(&lab, "g", &id);
    assert_vtpm_kept(&console_of(&lab, "host2", "g"));
    // The source holds no vTPM state, not even with the departed VM's log.
    assert!(vtpm_state_under(&lab.host("host1").state_dir).is_empty(), "host1 kept vTPM state");
    let erased: Vec<Value> =
        audit_kinds(&lab, "host1").into_iter().filter(|e| e["kind"] == "vtpm_erased").collect();
    assert_eq!(erased.len(), 1, "{erased:?}");
    assert_eq!(erased[0]["migration_id"], id.as_str());
    assert!(erased[0]["detail"]["files"].as_u64().unwrap_or(0) >= 1, "{erased:?}");

    // The old copy put back on the source: adoption refuses it.
    copy_dir(&backup, &host1_vms.join("g"));
    lab.restart_agent("host1");
    assert!(lab.vm_state("host1", "g").is_none(), "the stale vTPM's VM was adopted");
    let log = std::fs::read_to_string(&lab.host("host1").log).expect("agent log");
    assert!(log.contains("refusing the vTPM state"), "no clear error in the agent log");
    assert!(log.contains(&id), "the error names the migration that moved the VM away");
    let refused: Vec<Value> =
        audit_kinds(&lab, "host1").into_iter().filter(|e| e["kind"] == "vtpm_refused").collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(host1_vms.join("g").join("vtpm").exists(), "refused, not silently removed");
    // ... and never reused: the VM cannot come back onto that state.
    let (ok, back) = lab.ferry_json(&["migrate", "g", "--to", "host1", "--host", "host2"]);
    assert!(!ok, "the VM came back onto the stale state: {back}");
    assert!(back.to_string().contains("never reuses"), "{back}");
    assert_eq!(lab.running_on("g"), ["host2"], "the failed return left the VM where it was");
    assert_vtpm_kept(&console_of(&lab, "host2", "g"));

    // The operator removes the stale copy; host2 -> host1 then works.
    std::fs::remove_dir_all(host1_vms.join("g")).expect("remove stale dir");
    let (ok, back) = lab.ferry_json(&["migrate", "g", "--to", "host1", "--host", "host2"]);
    assert!(ok, "return migration failed: {back}");
    assert_eq!(lab.running_on("g"), ["host1"]);
    assert_vtpm_kept(&console_of(&lab, "host1", "g"));
    assert!(vtpm_state_under(&lab.host("host2").state_dir).is_empty(), "host2 kept vTPM state");
    // A VM that came back has a new vTPM, which a restart adopts.
    lab.restart_agent("host1");
    assert_eq!(lab.vm_state("host1", "g").as_deref(), Some("running"));
}

#[test]
fn a_destination_that_cannot_host_a_vtpm_is_refused_before_any_vm_byte() {
    let lab = TestLab::up(2, 0);
    lab.edit_config("host2", "[qemu]\n", "[qemu]\nswtpm = \"/nonexistent/swtpm\"\n");
    lab.restart_agent("host2");
    let (ok, status) = lab.ferry_json(&["status", "--host", "host2"]);
    assert!(ok, "{status}");
    let vtpm = status["vtpm"]["problem"].as_str().unwrap_or("");
    assert!(vtpm.contains("/nonexistent/swtpm"), "status shows why: {status}");
    start_tpm_guest(&lab, "host1", "g");

    let (ok, out) = lab.ferry_json(&["migrate", "g", "--to", "host2", "--host", "host1"]);
    assert!(!ok, "migrated to a host without swtpm: {out}");
    let out = out.to_string();
    assert!(out.contains("host2 cannot host this VM's crb vTPM"), "{out}");
    assert!(out.contains("/nonexistent/swtpm"), "the reason is named: {out}");
    // Nothing was offered: host2 has no record, host1 moved no byte.
    assert!(migration_records(&lab, "host2").is_empty(), "host2 saw an offer");
    let recs = migration_records(&lab, "host1");
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].2, 0, "VM bytes moved: {recs:?}");
    assert!(
        audit_kinds(&lab, "host1").iter().any(|e| e["kind"] == "vtpm_preflight_failed"),
        "the source's audit log says why"
    );
    assert_eq!(lab.running_on("g"), ["host1"]);
    assert_vtpm_kept(&console_of(&lab, "host1", "g"));
}
