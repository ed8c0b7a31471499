//! A libvirt domain migrated with multifd (`--streams 3`), for real: libvirt
//! asks QEMU for two parallel channels besides the main one; each channel
//! QEMU opens on the migration's socket becomes its own mTLS connection to
//! the destination, joined to the migration by id, and the signed Commit
//! and the gate cover all three streams.

mod common;

use common::*;
use ferry_cli::console;

/// On failure: the end of each agent's log and each host's QEMU log.
fn dump_logs(lab: &TestLab, vm: &str) {
    for h in ["host1", "host2"] {
        let l = std::fs::read_to_string(&lab.host(h).log).unwrap_or_default();
        eprintln!("==== {h} agent\n{}", &l[l.len().saturating_sub(6000)..]);
        let q = libvirt(lab, h).dir.join(format!("log/qemu/{vm}.log"));
        eprintln!("==== {h} qemu\n{}", std::fs::read_to_string(q).unwrap_or_default());
    }
}

#[test]
fn a_libvirt_domain_moves_on_three_streams_and_back() {
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    let log = start_domain(&lab, "host1", "lvm", "fill_mib=48 dirty=16 hb_ms=20 tlbflush=1");
    let before = console::read_console(&log).expect("console");

    let args = ["migrate", "lvm", "--to", "host2", "--host", "host1", "--streams", "3"];
    let (ok, rec) = lab.ferry_json(&args);
    if !ok {
        dump_logs(&lab, "lvm");
    }
    assert!(ok, "migration failed: {rec}");
    assert_eq!(rec["streams"], 3, "the record says how many streams: {rec}");
    assert!(rec["bytes"].as_u64().unwrap_or(0) > 48 << 20, "less than the guest's memory: {rec}");
    assert_domain_moved(&lab, "lvm", ("host1", "host2"), &rec, (&log, &before));

    let args = ["migrate", "lvm", "--to", "host1", "--host", "host2", "--streams", "3"];
    let (ok, back) = lab.ferry_json(&args);
    assert!(ok, "migration back failed: {back}");
    assert_eq!(domstate(&lab, "host1", "lvm").as_deref(), Some("running"));
    assert_eq!(domstate(&lab, "host2", "lvm"), None);
}

/// A bit flipped in one of the joined multifd streams (the man in the
/// middle between the agents, which relays each half-close as one, as
/// libvirt's streams need): its TLS record fails, so the destination never
/// opens the gate; libvirt fails the job, the source domain runs on, host2
/// has no domain, both records end aborted. The same path untampered
/// migrates on three streams.
#[test]
fn a_flipped_bit_in_a_joined_multifd_stream_keeps_the_domain_on_the_source() {
    let t0 = std::time::Instant::now();
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    let log = start_domain(&lab, "host1", "lvm", "fill_mib=48 dirty=16 hb_ms=20 tlbflush=1");
    let mitm = Mitm::start(lab.host("host2").addr, Tamper::None, None);
    lab.route_peer("host1", "host2", mitm.addr);
    lab.restart_agent("host1");
    let args = ["migrate", "lvm", "--to", "host2", "--host", "host1", "--streams", "3"];

    // The migration's first connection carries its session and QEMU's main
    // channel; the control connection and the multifd streams join later.
    let session = mitm.log().connections + 1;
    mitm.set_tamper(Tamper::FlipBit { dir: Dir::Up, offset: 8 << 20, mask: 0x10 });
    let (ok, rec) = lab.ferry_json(&args);
    let seen = mitm.log();
    if ok {
        dump_logs(&lab, "lvm");
    }
    assert!(!ok, "a tampered migration succeeded: {rec}");
    assert!(!seen.flipped.is_empty(), "no bit was flipped ({seen:?}): {rec}");
    assert!(
        seen.flipped_on.iter().all(|&c| c > session),
        "a flip landed outside the joined streams (session {session}, {seen:?})"
    );
    assert_domain_stayed(&lab, "lvm", "host1", "host2", &log);
    assert_refused_at_the_gate(&lab, "host1", "host2");
    eprintln!("flipped {:?} on connections {:?}: {rec}", seen.flipped, seen.flipped_on);

    // The tampering, not the proxy, failed it.
    mitm.set_tamper(Tamper::None);
    let before = console::read_console(&log).expect("console");
    let (ok, rec) = lab.ferry_json(&args);
    if !ok {
        dump_logs(&lab, "lvm");
    }
    assert!(ok, "an untampered multifd migration through the proxy failed: {rec}");
    assert_eq!(rec["streams"], 3, "{rec}");
    assert_domain_moved(&lab, "lvm", ("host1", "host2"), &rec, (&log, &before));
    eprintln!("bit flip in a multifd stream: whole test {} ms", t0.elapsed().as_millis());
}
