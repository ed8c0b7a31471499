//! libvirt's daemon-to-daemon connection is read-write libvirt API on the
//! destination. A source (here a rogue one, with a real host identity, a
//! real quote and a signed Offer that the destination accepted) may use it
//! for its migration only: anything else is refused before the
//! destination's libvirtd sees a byte, and the migration fails.

mod common;

use common::*;
use ferry_libvirt::rpc::{message, MessageType, KEEPALIVE_PROGRAM, REMOTE_PROGRAM};
use serde_json::json;

/// libvirt's `REMOTE_PROC_DOMAIN_DESTROY`.
const DOMAIN_DESTROY: i32 = 12;

#[test]
fn a_source_cannot_use_libvirts_control_connection_beyond_its_migration() {
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    start_domain(&lab, "host2", "victim", "fill_mib=8 hb_ms=50 tlbflush=1");

    // An attested, signed Offer that host2 accepts.
    let mut rogue = RogueSource::connect(&lab, "host1", "host2").expect("connect");
    rogue.attest().expect("attest");
    let offer = rogue.offer_body("lv");
    rogue.send_offer(offer).expect("offer");
    let accept = rogue.read().expect("answer");
    assert_eq!(accept["type"], "accept", "{accept}");

    // A control connection for another host's migration is refused.
    let mut stranger = RogueSource::connect(&lab, "host1", "host2").expect("connect");
    stranger
        .send(&json!({"type": "control_join", "migration_id": ferry_types::MigrationId::new()}))
        .expect("join");
    let (_, closed) = stranger.read_until_closed();
    assert!(!closed.contains("timed out"), "a join for no migration stayed open: {closed}");

    // The migration's own control connection: a keepalive passes, then a
    // call that is no part of a migration cuts it.
    let mut control = RogueSource::connect(&lab, "host1", "host2").expect("connect");
    let join = json!({"type": "control_join", "migration_id": rogue.id});
    control.send(&join).expect("join");
    let ping = message(KEEPALIVE_PROGRAM, 1, MessageType::Message, 0, &[]);
    control.write_raw(&frame(2, &ping)).expect("ping");
    // The domain's name as libvirt's XDR string, then its UUID and id.
    let mut body = Vec::new();
    body.extend_from_slice(&6u32.to_be_bytes());
    body.extend_from_slice(b"victim\0\0");
    body.extend_from_slice(&[0u8; 16]);
    body.extend_from_slice(&(-1i32).to_be_bytes());
    let destroy = message(REMOTE_PROGRAM, DOMAIN_DESTROY, MessageType::Call, 1, &body);
    control.write_raw(&frame(2, &destroy)).expect("destroy");
    let (_, closed) = control.read_until_closed();
    assert!(!closed.contains("timed out"), "the control connection stayed open: {closed}");

    // libvirtd never saw the call: the victim runs on.
    assert_eq!(domstate(&lab, "host2", "victim").as_deref(), Some("running"));
    // And the migration failed, saying why.
    wait_until(std::time::Duration::from_secs(30), "the migration to fail", || {
        let (_, rec) =
            lab.ferry_json(&["migrations", "show", &rogue.id.to_string(), "--host", "host2"]);
        rec["state"] == "aborted"
    });
    let (_, rec) =
        lab.ferry_json(&["migrations", "show", &rogue.id.to_string(), "--host", "host2"]);
    assert!(rec.to_string().contains("procedure 12 is not part of a migration"), "{rec}");
    // The refused call is on record as its own kind, and counted.
    let audit = std::fs::read_to_string(lab.host("host2").state_dir.join("audit.log"))
        .expect("host2 audit log");
    let refused: Vec<&str> =
        audit.lines().filter(|l| l.contains("\"control_call_refused\"")).collect();
    assert_eq!(refused.len(), 1, "{audit}");
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
