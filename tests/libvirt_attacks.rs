//! libvirt's daemon-to-daemon connection is read-write libvirt API on the
//! destination. A source (here a rogue one, with a real host identity, a
//! real quote and a signed Offer that the destination accepted) may use it
//! for its migration only: anything else is refused before the
//! destination's libvirtd sees a byte, and the migration fails.

mod common;

use common::*;
use ferry_libvirt::filter::{LIVE, PEER2PEER};
use ferry_libvirt::rpc::{message, MessageType, KEEPALIVE_PROGRAM};
use ferry_libvirt::xdr::{Encoder, Param, ParamValue};
use serde_json::json;

/// libvirt's `REMOTE_PROC_DOMAIN_DESTROY`, `_DEFINE_XML` and
/// `_MIGRATE_PREPARE3_PARAMS`.
const DOMAIN_DESTROY: i32 = 12;
const DOMAIN_DEFINE_XML: i32 = 11;
const DOMAIN_MIGRATE_PREPARE3_PARAMS: i32 = 303;

#[test]
fn a_source_cannot_use_libvirts_control_connection_beyond_its_migration() {
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    start_domain(&lab, "host2", "victim", "fill_mib=8 hb_ms=50 tlbflush=1");

    let (rogue, mut control) = rogue_control(&lab, "lv");

    // A control connection for another host's migration is refused.
    let mut stranger = RogueSource::connect(&lab, "host1", "host2").expect("connect");
    stranger
        .send(&json!({"type": "control_join", "migration_id": ferry_types::MigrationId::new()}))
        .expect("join");
    let (_, closed) = stranger.read_until_closed();
    assert!(!closed.contains("timed out"), "a join for no migration stayed open: {closed}");

    // The migration's own control connection: a keepalive passes, then a
    // call that is no part of a migration cuts it.
    let ping = message(KEEPALIVE_PROGRAM, 1, MessageType::Message, 0, &[]);
    control.write_raw(&frame(2, &ping)).expect("ping");
    // The domain's name as libvirt's XDR string, then its UUID and id.
    let mut body = Vec::new();
    body.extend_from_slice(&6u32.to_be_bytes());
    body.extend_from_slice(b"victim\0\0");
    body.extend_from_slice(&[0u8; 16]);
    body.extend_from_slice(&(-1i32).to_be_bytes());
    control.write_raw(&libvirt_call(DOMAIN_DESTROY, 1, &body)).expect("destroy");
    let (_, closed) = control.read_until_closed();
    assert!(!closed.contains("timed out"), "the control connection stayed open: {closed}");

    // libvirtd never saw the call: the victim runs on.
    assert_eq!(domstate(&lab, "host2", "victim").as_deref(), Some("running"));
    // And the migration failed, saying why.
    let rec = aborted_on_host2(&lab, &rogue.id.to_string());
    assert!(rec.to_string().contains("procedure 12 is not part of a migration"), "{rec}");
    // The refused call is on record as its own kind, and counted.
    let refused = control_calls_refused(&lab);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].contains(&rogue.id.to_string()), "{}", refused[0]);
    assert!(refused[0].contains("procedure 12"), "{}", refused[0]);
    let counted =
        metric(&scrape(lab.host("host2").metrics), "ferry_refusals_total{reason=\"control_call\"}");
    assert_eq!(counted, 1);
}

/// Whatever connects to a migration's local sockets on the source is
/// carried to the destination and signed for as the VM. A local process
/// that connects during a migration (root but not libvirt's daemon, and
/// another user) is refused, audited and counted, and the migration goes
/// on: its bytes were never read.
#[test]
fn a_local_process_on_the_migration_sockets_is_refused_and_the_migration_goes_on() {
    let t0 = std::time::Instant::now();
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    start_domain(&lab, "host1", "lv", "fill_mib=48 dirty=16 hb_ms=20 tlbflush=1");
    let migrate = spawn_migrate_domain(&lab, "lv", "host1", "host2");
    let dir = wait_migration_sockets(&migration_socket_dir(&lab, "host1"));
    // The stream socket is taken only after the destination's Prepare: the
    // intruders are there first. (The control socket is libvirt's within
    // milliseconds; an intruder that comes later waits unaccepted.)
    let mut intruders = vec![
        local_intruder(&dir.join("mig.sock"), None),
        local_intruder(&dir.join("mig.sock"), Some(65534)),
        local_intruder(&dir.join("ctl.sock"), None),
    ];
    let out = migrate.wait_with_output().expect("migrate");
    for i in &mut intruders {
        let _ = i.kill();
        let _ = i.wait();
    }
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the migration did not go on: {said}");
    assert_eq!(domstate(&lab, "host2", "lv").as_deref(), Some("running"));
    assert_eq!(domstate(&lab, "host1", "lv"), None);

    let audit = std::fs::read_to_string(lab.host("host1").state_dir.join("audit.log"))
        .expect("host1 audit log");
    let refused: Vec<&str> =
        audit.lines().filter(|l| l.contains("\"local_connection_refused\"")).collect();
    assert!(refused.len() >= 2, "not every intruder was audited: {refused:?}");
    assert!(refused.iter().any(|l| l.contains("uid 0,")), "root intruder: {refused:?}");
    assert!(refused.iter().any(|l| l.contains("uid 65534,")), "other user: {refused:?}");
    let counted = metric(
        &scrape(lab.host("host1").metrics),
        "ferry_refusals_total{reason=\"local_connection\"}",
    );
    assert_eq!(counted as usize, refused.len(), "metric and audit disagree");
    eprintln!("local intruders: whole test {} ms", t0.elapsed().as_millis());
}

/// The rogue source asks host2's libvirtd to define a domain (then, on
/// another migration, to prepare one that is not the domain its Offer
/// signed for: twice the memory). Both are refused before libvirtd sees a
/// byte, audited, and nothing is defined on host2.
#[test]
fn a_rogue_define_or_a_prepare_for_another_domain_is_refused_and_nothing_is_defined() {
    let t0 = std::time::Instant::now();
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    let xml = |mib: u32| {
        format!(
            "<domain type='qemu'><name>lv</name><uuid>5b0c6c3e-4f39-4a7e-9a52-6b8f7c1d2e3f</uuid>\
             <memory unit='MiB'>{mib}</memory><vcpu>1</vcpu><os><type arch='x86_64' \
             machine='q35'>hvm</type><kernel>ferry-guest.elf</kernel>\
             <cmdline>fill_mib=8 hb_ms=10</cmdline></os></domain>"
        )
    };

    let (rogue, mut control) = rogue_control(&lab, "lv");
    let mut define = Encoder::default();
    define.string(&xml(256));
    control.write_raw(&libvirt_call(DOMAIN_DEFINE_XML, 1, &define.out)).expect("define");
    let (_, closed) = control.read_until_closed();
    assert!(!closed.contains("timed out"), "the control connection stayed open: {closed}");
    let rec = aborted_on_host2(&lab, &rogue.id.to_string());
    assert!(rec.to_string().contains("procedure 11 is not part of a migration"), "{rec}");

    let (rogue, mut control) = rogue_control(&lab, "lv");
    let uri = format!("unix:///run/ferry/{}/mig.sock", rogue.id);
    let string =
        |field: &str, v: &str| Param { field: field.into(), value: ParamValue::String(v.into()) };
    let mut prepare = Encoder::default();
    prepare
        .params(&[string("destination_xml", &xml(512)), string("migrate_uri", &uri)])
        .opaque(b"<qemu-migration/>")
        .u32(LIVE | PEER2PEER);
    let call = libvirt_call(DOMAIN_MIGRATE_PREPARE3_PARAMS, 1, &prepare.out);
    control.write_raw(&call).expect("prepare");
    let (_, closed) = control.read_until_closed();
    assert!(!closed.contains("timed out"), "the control connection stayed open: {closed}");
    let rec = aborted_on_host2(&lab, &rogue.id.to_string());
    assert!(rec.to_string().contains("512 MiB"), "{rec}");

    assert!(
        virsh(&lab, "host2", &["list", "--all", "--name"]).is_empty(),
        "host2 defined a domain"
    );
    let refused = control_calls_refused(&lab);
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused[1].contains("512 MiB"), "{}", refused[1]);
    eprintln!("rogue define and prepare: whole test {} ms", t0.elapsed().as_millis());
}
