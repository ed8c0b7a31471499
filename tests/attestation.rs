//! R1 with real TPMs (swtpm): both platforms prove their PCRs with quotes
//! bound to the migration's TLS channel; a tampered platform on either side,
//! or an AK that is not enrolled, stops the migration before any VM byte
//! moves, with an error that names the host and the PCR.

mod common;

use std::path::PathBuf;

use common::*;

fn tcti(lab: &TestLab, host: &str) -> String {
    lab.host(host).tpm.as_ref().expect("lab host has a TPM").tcti.clone()
}

fn extend(lab: &TestLab, host: &str, pcr: u8) {
    let o = run(&["attest", "extend", "--tcti", &tcti(lab, host), "--pcr", &pcr.to_string()], None);
    assert!(o.status.success(), "extend failed: {}", text(&o));
}

fn refused(lab: &TestLab, log: &std::path::Path, expect: &[&str]) -> String {
    let o = lab.ferry(&["migrate", "g", "--to", "host2", "--host", "host1"]);
    let out = text(&o);
    assert!(!o.status.success(), "migration succeeded: {out}");
    for e in expect {
        assert!(out.contains(e), "error does not name {e:?}: {out}");
    }
    assert_eq!(lab.vm_state("host1", "g").as_deref(), Some("running"));
    assert_guest_runs(log);
    assert!(lab.vms("host2").is_empty(), "the destination holds a VM");
    assert!(
        live_qemus_under(&lab.host("host2").state_dir).is_empty(),
        "the destination launched QEMU"
    );
    out
}

#[test]
fn attested_platforms_migrate_and_record_it() {
    let lab = TestLab::up(2, 0);
    lab.start_guest("host1", "g", 256, "fill_mib=64 dirty=16 hb_ms=10");
    let (ok, rec) = lab.ferry_json(&["migrate", "g", "--to", "host2", "--host", "host1"]);
    assert!(ok, "{rec}");
    assert_eq!(rec["attestation"]["peer_verified"], true, "{rec}");
    assert_eq!(rec["attestation"]["quoted"], true, "{rec}");
    assert_eq!(rec["insecure"], serde_json::json!([]), "{rec}");
    let setup = rec["setup_ms"].as_u64().expect("setup_ms");
    eprintln!(
        "setup (connect + TLS + mutual attestation): {setup} ms; attestation {} ms",
        rec["attestation"]["ms"]
    );
    let (_, dst) =
        lab.ferry_json(&["migrations", "show", rec["id"].as_str().expect("id"), "--host", "host2"]);
    assert_eq!(dst["attestation"]["peer_verified"], true, "{dst}");
}

#[test]
fn a_tampered_destination_is_refused_before_any_vm_byte_moves() {
    let lab = TestLab::up(2, 0);
    let vm = lab.start_guest("host1", "g", 256, "fill_mib=64 dirty=16 hb_ms=10");
    let log = PathBuf::from(vm["console_log"].as_str().expect("log"));
    extend(&lab, "host2", 7);
    let out = refused(&lab, &log, &["host2", "PCR 7"]);
    let m = scrape(lab.host("host1").metrics);
    assert_eq!(metric(&m, "ferry_attestation_failures_total"), 1, "{m}\n{out}");
}

#[test]
fn a_tampered_source_is_refused_by_the_destination() {
    let lab = TestLab::up(2, 0);
    let vm = lab.start_guest("host1", "g", 256, "fill_mib=64 dirty=16 hb_ms=10");
    let log = PathBuf::from(vm["console_log"].as_str().expect("log"));
    extend(&lab, "host1", 0);
    refused(&lab, &log, &["host1", "PCR 0", "refused"]);
    let m = scrape(lab.host("host2").metrics);
    assert_eq!(metric(&m, "ferry_refusals_total{reason=\"attestation\"}"), 1, "{m}");
}

#[test]
fn an_unenrolled_attestation_key_is_refused() {
    let lab = TestLab::up(2, 0);
    let vm = lab.start_guest("host1", "g", 256, "fill_mib=64 dirty=16 hb_ms=10");
    let log = PathBuf::from(vm["console_log"].as_str().expect("log"));
    let registry = lab.lab.ak_registry.clone().expect("registry");
    std::fs::remove_file(registry.join("host2.json")).expect("unenrol host2");
    refused(&lab, &log, &["host2", "enrolled"]);
}

/// Without a TPM a host is refused, unless the peer itself runs with the
/// explicit insecure setting; then the migration is marked.
#[test]
fn hosts_without_attestation_are_refused_unless_insecure_is_explicit() {
    let lab = TestLab::up(2, 0);
    let vm = lab.start_guest("host1", "g", 256, "fill_mib=64 dirty=16 hb_ms=10");
    let log = PathBuf::from(vm["console_log"].as_str().expect("log"));
    let cfg = lab.host("host2").config.clone();
    let original = std::fs::read_to_string(&cfg).expect("cfg");
    let start = original.find("[attestation]").expect("section");
    std::fs::write(
        &cfg,
        format!("{}[attestation]\ninsecure_disabled = true\n", &original[..start]),
    )
    .expect("cfg");
    lab.restart_agent("host2");
    assert!(
        std::fs::read_to_string(&lab.host("host2").log).expect("log").contains("INSECURE"),
        "no start-up warning"
    );
    refused(&lab, &log, &["host2", "no TPM quote"]);

    // host1 explicitly insecure too: allowed, and marked on both records.
    let cfg1 = lab.host("host1").config.clone();
    let original1 = std::fs::read_to_string(&cfg1).expect("cfg");
    let start1 = original1.find("[attestation]").expect("section");
    std::fs::write(
        &cfg1,
        format!("{}[attestation]\ninsecure_disabled = true\n", &original1[..start1]),
    )
    .expect("cfg");
    lab.restart_agent("host1");
    let (ok, rec) = lab.ferry_json(&["migrate", "g", "--to", "host2", "--host", "host1"]);
    assert!(ok, "{rec}");
    assert!(
        rec["insecure"].as_array().is_some_and(|a| !a.is_empty()),
        "insecure migration not marked: {rec}"
    );

    // Policy sees the platforms as unattested: above security level 0 the
    // sample policy refuses the move before anything starts.
    let o = lab.ferry(&[
        "vm",
        "start",
        "--host",
        "host1",
        "--name",
        "guarded",
        "--kernel",
        "ferry-guest.elf",
        "--cmdline",
        "fill_mib=16 hb_ms=10",
        "--security-level",
        "1",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let (ok, v) = lab.ferry_json(&["migrate", "guarded", "--to", "host2", "--host", "host1"]);
    assert!(!ok, "{v}");
    assert_eq!(v["kind"], "denied", "{v}");
    assert!(v["message"].as_str().unwrap_or("").contains("attested"), "{v}");
    assert_eq!(lab.running_on("guarded"), ["host1"]);
}
