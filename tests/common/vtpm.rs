//! Helpers for the vTPM suites (tests/vtpm.rs, tests/vtpm_faults.rs): a
//! test guest with a vTPM, what it reads from it, where vTPM state lies.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_cli::console::{self, ConsoleLine};
use ferry_guest::{expected_pcr16, GuestLine};
use serde_json::Value;

use super::*;

pub const MARKER: &str = "FERRY-VTPM-E2E";

/// Start the test guest with a vTPM (tpm-crb) that extends PCR 16 with
/// MARKER and bumps its NV counter at boot, then re-reads both every 300 ms.
pub fn start_tpm_guest(lab: &TestLab, host: &str, vm: &str) -> Value {
    start_tpm_guest_sized(lab, host, vm, 64, 16)
}

/// The same with `memory_mib` of RAM of which the guest fills and dirties
/// `fill_mib`, started with the CLI's flags (`--tpm`).
pub fn start_tpm_guest_sized(
    lab: &TestLab,
    host: &str,
    vm: &str,
    memory_mib: u32,
    fill_mib: u32,
) -> Value {
    let cmdline =
        format!("fill_mib={fill_mib} dirty={fill_mib} hb_ms=10 tlbflush=1 tpm={MARKER} tpm_ms=300");
    let memory = memory_mib.to_string();
    let (ok, v) = lab.ferry_json(&[
        "vm",
        "start",
        "--host",
        host,
        "--name",
        vm,
        "--memory",
        &memory,
        "--kernel",
        "ferry-guest.elf",
        "--cmdline",
        &cmdline,
        "--tpm",
    ]);
    assert!(ok, "vm start failed: {v}");
    assert_eq!(v["tpm"], "crb", "the agent reports the vTPM: {v}");
    let log = PathBuf::from(v["console_log"].as_str().expect("console_log"));
    wait_console(&log, Duration::from_secs(120), "READY, a TPM line, a clean sweep", |l| {
        console::is_ready(l) && !tpm_reads(l).is_empty() && console::clean_sweeps(l) >= 1
    });
    v
}

/// Every (PCR 16, NV counter) the guest printed, in order.
pub fn tpm_reads(lines: &[ConsoleLine]) -> Vec<(String, u64)> {
    lines
        .iter()
        .filter_map(|l| match &l.line {
            GuestLine::Tpm { pcr16, nv } => Some((pcr16.clone(), *nv)),
            _ => None,
        })
        .collect()
}

pub fn console_of(lab: &TestLab, host: &str, vm: &str) -> PathBuf {
    let v = lab.vms(host).into_iter().find(|v| v["name"] == vm).expect("VM listed");
    assert_eq!(v["tpm"], "crb", "vm list says which VMs have a vTPM: {v}");
    PathBuf::from(v["console_log"].as_str().expect("console_log"))
}

/// After a hop: the guest reads its vTPM again on `host` (fresh TPM lines
/// after the migration), and what it reads is what it had: the one PCR 16
/// extension of its boot and the counter of its one boot.
pub fn assert_vtpm_kept(log: &Path) {
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
pub fn vtpm_state_under(dir: &Path) -> Vec<PathBuf> {
    entries_below(dir)
        .into_iter()
        .filter(|p| p.parent().is_some_and(|parent| parent.ends_with("vtpm")))
        .collect()
}

/// Every entry below `dir` that is not a directory, at any depth.
pub fn entries_below(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                found.push(p);
            }
        }
    }
    found
}

pub fn audit_kinds(lab: &TestLab, host: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(audit_log(lab, host)).expect("audit log");
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("log line")["record"]["event"].clone())
        .filter(|e| e["kind"].as_str().is_some_and(|k| k.starts_with("vtpm")))
        .collect()
}

pub fn copy_dir(from: &Path, to: &Path) {
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
