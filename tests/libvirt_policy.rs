//! Policy and admission control decide for libvirt's domains exactly as for
//! Ferry's own VMs (tests/policy.rs): the domain's labels come from its
//! `<metadata>`, the destination decides with what it knows, and a refused
//! migration leaves the domain running where it was and nothing defined on
//! the destination.

mod common;

use common::*;

/// `ferry migrate` of `vm` is refused, naming one of `causes`; libvirt runs
/// the domain on `from` still, and `to` has no domain of that name.
fn refused(lab: &TestLab, vm: &str, from: &str, to: &str, causes: &[&str]) -> String {
    let (ok, out) = migrate_domain(lab, vm, from, to);
    assert!(!ok, "migration of {vm} {from}->{to} succeeded: {out}");
    assert!(causes.iter().any(|c| out.contains(c)), "error does not name {causes:?}: {out}");
    assert_eq!(domstate(lab, from, vm).as_deref(), Some("running"), "{vm} left {from}");
    assert_eq!(domstate(lab, to, vm), None, "{to} has a domain {vm}");
    out
}

/// Anti-co-location, which only the destination can decide (it knows its
/// residents): a domain that must not share a host with tenant red's.
#[test]
fn the_destinations_policy_refuses_a_libvirt_domain() {
    let t0 = std::time::Instant::now();
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    let small = "fill_mib=4 dirty=0 hb_ms=50 tlbflush=1";
    start_domain_with(&lab, "host2", "reddb", 128, "tenant='red' security-level='1'", small);
    let web = "tenant='lab' security-level='1' anti-affinity='red'";
    start_domain_with(&lab, "host1", "blueweb", 128, web, small);
    let out = refused(&lab, "blueweb", "host1", "host2", &["anti-co-location"]);
    assert!(out.contains("host2 refused"), "the destination should decide: {out}");
    let m = scrape(lab.host("host2").metrics);
    assert!(metric(&m, "ferry_refusals_total{reason=\"policy\"}") >= 1, "{m}");
    eprintln!("libvirt policy refusal: whole test {} ms", t0.elapsed().as_millis());
}

/// Admission control: host2 has room for 128 MiB only, whatever the
/// source believed; it refuses at the Offer, before libvirt's Prepare.
#[test]
fn the_destinations_admission_control_refuses_a_libvirt_domain() {
    let t0 = std::time::Instant::now();
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    lab.edit_config("host2", "[admission]\n", "[admission]\ncapacity_memory_mib = 128\n");
    lab.restart_agent("host2");
    let log =
        start_domain_with(&lab, "host1", "big", 256, LAB_LABELS, "fill_mib=8 hb_ms=50 tlbflush=1");
    let out = refused(&lab, "big", "host1", "host2", &["needs 256 MiB"]);
    assert!(out.contains("admission"), "{out}");
    assert!(
        virsh(&lab, "host2", &["list", "--all", "--name"]).is_empty(),
        "host2 defined a domain"
    );
    assert_guest_runs(&log);
    eprintln!("libvirt admission refusal: whole test {} ms", t0.elapsed().as_millis());
}
