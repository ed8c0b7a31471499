//! VMs with a vTPM, end to end with real agents, real QEMU (TCG) and real
//! swtpm: the guest's PCR 16 and NV counter survive each hop, the source
//! keeps no vTPM state, an old copy put back is refused at adoption, and a
//! destination that cannot host a vTPM is refused before any VM byte.

mod common;

use serde_json::Value;

use common::*;

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
    let home = console_of(&lab, "host1", "g");
    assert_vtpm_kept(&home);
    let back_id = back["id"].as_str().expect("id");
    let away = lab.host("host2").state_dir.join("departed").join(back_id).join("console.log");
    let c = ferry_cli::console::analyze(
        &ferry_cli::console::read_console(&away).expect("host2's console"),
        &ferry_cli::console::read_console(&home).expect("host1's console"),
    );
    assert!(c.heartbeat_continued && c.memory_consistent(), "the return hop: {c:?}");
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
    // Nor can a VM with a vTPM be started there.
    let o = lab.ferry(&[
        "vm",
        "start",
        "--host",
        "host2",
        "--name",
        "t",
        "--memory",
        "64",
        "--kernel",
        "ferry-guest.elf",
        "--tpm",
        "tis",
    ]);
    assert!(!o.status.success(), "started a vTPM VM without swtpm: {}", text(&o));
    assert!(text(&o).contains("this host cannot host a tis vTPM"), "{}", text(&o));
    assert!(lab.vms("host2").is_empty());
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
