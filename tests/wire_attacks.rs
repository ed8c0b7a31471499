//! R4 attacked for real (docs/architecture.md, threat table): a man in
//! the middle on loopback that reads, flips, truncates and stalls the
//! migration stream between two real agents running real QEMU.
//!
//! Each test holds `SERIAL`: they run QEMU under TCG on a small machine,
//! and the stall test measures a timeout.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

// ------------------------------------------------------------------ passive

/// Passive sniffing: a guest holds a secret marker; the wire of a Ferry
/// migration never shows it, the wire of a plain QEMU migration of the
/// same guest does (so the search would find it if it leaked).
#[test]
fn a_passive_sniffer_never_sees_guest_memory() {
    let _g = serial();
    let t0 = Instant::now();
    let token = random_token();
    let marker = format!("FERRY-SECRET-{token}");
    let append = format!("fill_mib=64 dirty=16 hb_ms=10 marker={marker}");

    let lab = TestLab::up(2, 0);
    lab.start_guest("host1", "g", 256, &append);
    let cap = lab.dir.path().join("ferry-wire");
    let mitm = Mitm::start(lab.host("host2").addr, Tamper::None, Some(cap.clone()));
    lab.route_peer("host1", "host2", mitm.addr);
    lab.restart_agent("host1");
    let (ok, out, took) = migrate(&lab);
    assert!(ok, "migration through the sniffer failed: {out}");
    assert_eq!(lab.running_on("g"), ["host2"]);
    let seen = mitm.log();
    eprintln!(
        "ferry: migrated in {} ms; sniffer saw {} bytes up, {} down",
        took.as_millis(),
        seen.bytes_up,
        seen.bytes_down
    );
    assert!(
        seen.bytes_up > 64 << 20,
        "the sniffer did not see the VM's state ({} bytes)",
        seen.bytes_up
    );
    for sfx in [".up", ".down"] {
        let p = PathBuf::from(format!("{}{sfx}", cap.display()));
        assert!(
            !file_contains(&p, marker.as_bytes()),
            "the marker leaked onto the wire ({})",
            p.display()
        );
        assert!(
            !file_contains(&p, token.as_bytes()),
            "the marker's random part leaked onto the wire ({})",
            p.display()
        );
        assert!(
            !file_contains(&p, b"FERRY-SECRET-"),
            "the marker's prefix leaked onto the wire ({})",
            p.display()
        );
    }
    drop(mitm);
    let ferry_ms = t0.elapsed().as_millis();

    // Control: plain QEMU over TCP through the same kind of sniffer.
    let dir = lab.dir.path().join("plain");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut src = PlainQemu::start(&dir, "src", 256, &append, false);
    wait_until(Duration::from_secs(120), "READY on the plain source", || {
        src.serial_text().contains("READY")
    });
    let mut dst = PlainQemu::start(&dir, "dst", 256, &append, true);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    dst.qmp.cmd("migrate-incoming", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let plain_cap = dir.join("plain-wire");
    let sniffer = Mitm::start(
        SocketAddr::from(([127, 0, 0, 1], port)),
        Tamper::None,
        Some(plain_cap.clone()),
    );
    src.qmp.cmd("migrate-set-parameters", json!({"max-bandwidth": 64u64 << 30}));
    src.qmp.cmd("migrate", json!({"uri": format!("tcp:{}", sniffer.addr)}));
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s = src.qmp.cmd("query-migrate", json!({}));
        match s["status"].as_str() {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => panic!("plain migration failed: {s}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "plain migration did not finish: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let up = PathBuf::from(format!("{}.up", plain_cap.display()));
    assert!(
        file_contains(&up, marker.as_bytes()),
        "control failed: the plain QEMU stream does not contain the marker"
    );
    eprintln!(
        "plain QEMU control: marker found in {} bytes of clear text; ferry part {} ms, whole test {} ms",
        sniffer.log().bytes_up,
        ferry_ms,
        t0.elapsed().as_millis()
    );
}

// ------------------------------------------------------------------ active

/// The middle of a logged record's body.
fn mid(r: &RecordSeen) -> u64 {
    r.offset + 5 + u64::from(r.len) / 2
}

/// The record after the first application-data record of `len` bytes (the
/// protocol greeting, `Hello{protocol:1}`: 22 plaintext bytes + type + tag).
fn record_after_hello(records: &[RecordSeen]) -> Option<RecordSeen> {
    const HELLO_RECORD: u16 = 8 + 14 + 1 + 16;
    let i = records.iter().position(|r| r.content_type == 0x17 && r.len == HELLO_RECORD)?;
    records.get(i + 1).copied()
}

/// Active tampering: one bit flipped in the handshake, in the control
/// messages, early and late in the VM state. Every migration fails, the
/// destination never resumes the VM (no QEMU left, record aborted), the
/// source copy runs on with consistent memory. Then the same path, with
/// the flips off, migrates: the tampering, not the proxy, made them fail.
#[test]
fn a_flipped_bit_anywhere_aborts_and_the_source_resumes() {
    let _g = serial();
    let t0 = Instant::now();
    let lab = TestLab::up(2, 0);
    let vm = lab.start_guest("host1", "g", 256, "fill_mib=128 dirty=64 hb_ms=10");
    let log = console_path(&vm);
    let mitm = Mitm::start(lab.host("host2").addr, Tamper::None, None);
    lab.route_peer("host1", "host2", mitm.addr);
    lab.restart_agent("host1");

    let attempt = |name: &str, tamper: Tamper| {
        mitm.set_tamper(tamper);
        let (ok, out, took) = migrate(&lab);
        let seen = mitm.log();
        assert!(!ok, "{name}: a tampered migration succeeded: {out}");
        assert_eq!(
            seen.flipped.len(),
            1,
            "{name}: the bit was not flipped ({seen:?}); migrate said: {out}"
        );
        let t = Instant::now();
        assert_source_resumed(&lab, &log);
        let err: Value =
            serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or(Value::Null);
        eprintln!(
            "flip {name} at {:?}: refused in {} ms, source checked running {} ms later; error: {}",
            seen.flipped[0],
            took.as_millis(),
            t.elapsed().as_millis(),
            err.get("error").map(Value::to_string).unwrap_or_else(|| out
                .trim()
                .chars()
                .take(300)
                .collect())
        );
        mitm.log()
    };

    // Early data first: its connection shows the record layout that the
    // handshake and control-message flips below aim at.
    let layout = attempt(
        "data, early (1 MiB)",
        Tamper::FlipBit { dir: Dir::Up, offset: 1 << 20, mask: 0x10 },
    );
    let first_app = |rs: &[RecordSeen]| rs.iter().find(|r| r.content_type == 0x17).copied();
    let client_flight = first_app(&layout.records_up).expect("no encrypted upstream record");
    let server_flight = first_app(&layout.records_down).expect("no encrypted downstream record");
    let offer = record_after_hello(&layout.records_up)
        .unwrap_or_else(|| panic!("no Offer record in {:?}", layout.records_up));
    let accept = record_after_hello(&layout.records_down)
        .unwrap_or_else(|| panic!("no Accept record in {:?}", layout.records_down));
    assert!((200..4000).contains(&offer.len), "unexpected Offer record {offer:?}");
    eprintln!("layout: client flight {client_flight:?}, server flight {server_flight:?}, offer {offer:?}, accept {accept:?}");

    let cases = [
        ("handshake, ClientHello", Tamper::FlipBit { dir: Dir::Up, offset: 100, mask: 0x01 }),
        ("handshake, ServerHello", Tamper::FlipBit { dir: Dir::Down, offset: 60, mask: 0x01 }),
        (
            "handshake, server's encrypted flight",
            Tamper::FlipBit { dir: Dir::Down, offset: mid(&server_flight), mask: 0x04 },
        ),
        (
            "handshake, client's certificate flight",
            Tamper::FlipBit { dir: Dir::Up, offset: mid(&client_flight), mask: 0x04 },
        ),
        ("control, Offer", Tamper::FlipBit { dir: Dir::Up, offset: mid(&offer), mask: 0x02 }),
        ("control, Accept", Tamper::FlipBit { dir: Dir::Down, offset: mid(&accept), mask: 0x02 }),
        (
            "data, late (120 MiB of a 128 MiB fill)",
            Tamper::FlipBit { dir: Dir::Up, offset: 120 << 20, mask: 0x80 },
        ),
    ];
    for (name, t) in cases {
        attempt(name, t);
    }

    // The destination never completed (so never resumed) any of them.
    let dest = records(&lab, "host2");
    assert!(!dest.is_empty(), "host2 recorded nothing");
    assert!(dest.iter().all(|(s, _)| s == "aborted"), "host2 records: {dest:?}");
    let src = records(&lab, "host1");
    assert_eq!(src.len(), 1 + cases.len(), "host1 records: {src:?}");
    assert!(src.iter().all(|(s, _)| s == "aborted"), "host1 records: {src:?}");

    // Control: the same path without tampering works.
    mitm.set_tamper(Tamper::None);
    let (ok, out, took) = migrate(&lab);
    assert!(ok, "an untampered migration through the proxy failed: {out}");
    assert_eq!(lab.running_on("g"), ["host2"]);
    eprintln!(
        "untampered control migrated in {} ms; whole test {} ms",
        took.as_millis(),
        t0.elapsed().as_millis()
    );
}

/// A bit flipped after the source sent its Commit (in the Commit itself:
/// the first record after the end-of-data frame's 25-byte record). The
/// destination's TLS refuses the record and it discards the incoming VM;
/// the source has committed, hears nothing, and is in doubt. With no
/// operator command it asks the destination by itself, gets its signed
/// "aborted" and runs the VM again within seconds.
#[test]
fn a_bit_flipped_after_the_commit_settles_itself_and_the_source_resumes() {
    let _g = serial();
    let lab = TestLab::up(2, 0);
    let mitm = Mitm::start(lab.host("host2").addr, Tamper::None, None);
    lab.route_peer("host1", "host2", mitm.addr);
    lab.restart_agent("host1");
    // An untampered migration of a VM of the same name length shows the
    // Commit's record: the last upstream record, after the 25-byte one.
    lab.start_guest("host1", "c", 128, "fill_mib=16 dirty=4 hb_ms=10");
    let o = lab.ferry(&["migrate", "c", "--to", "host2", "--host", "host1", "--json"]);
    assert!(o.status.success(), "the control migration failed: {}", text(&o));
    let tail = mitm.log().tail_up;
    let [.., end, commit] = tail.as_slice() else { panic!("no records seen: {tail:?}") };
    assert_eq!(end.len, 25, "the end-of-data record is not where expected: {tail:?}");
    let len = (commit.len - 16, commit.len + 16);
    let o = lab.ferry(&["vm", "stop", "c", "--host", "host2"]);
    assert!(o.status.success(), "{}", text(&o));
    let vm = lab.start_guest("host1", "g", 256, "fill_mib=64 dirty=16 hb_ms=10");
    let log = console_path(&vm);
    mitm.set_tamper(Tamper::FlipAfterRecord { dir: Dir::Up, after_len: 25, len, mask: 0x40 });
    let (ok, out, took) = migrate(&lab);
    let seen = mitm.log();
    assert!(!ok, "a tampered migration succeeded: {out}");
    assert_eq!(seen.flipped.len(), 1, "the Commit was not flipped ({seen:?}): {out}");
    assert!(out.contains("once the destination was asked"), "{out}");
    // No operator command: the agent settled it, and the VM runs on host1.
    assert_source_resumed(&lab, &log);
    let src = records(&lab, "host1");
    assert_eq!(src.last().map(|r| r.0.as_str()), Some("aborted"), "host1 records: {src:?}");
    let dst = records(&lab, "host2");
    assert_eq!(dst.last().map(|r| r.0.as_str()), Some("aborted"), "host2 records: {dst:?}");
    let audit =
        std::fs::read_to_string(lab.host("host1").state_dir.join("audit.log")).unwrap_or_default();
    for kind in ["\"commit_sent\"", "\"in_doubt\"", "\"resolve_attempt\"", "\"rolled_back\""] {
        assert!(audit.contains(kind), "host1's audit log has no {kind} record");
    }
    eprintln!(
        "flip after the commit at {:?}: settled and running on host1 after {} ms",
        seen.flipped[0],
        took.as_millis()
    );
}

// ------------------------------------------------------------------ truncate / stall

/// Truncation and stalls: a stream cut mid-record, and a stream that
/// stops moving without closing (in the VM state and in the handshake).
/// Each aborts, a stall only after the configured timeout, and the source
/// copy resumes.
#[test]
fn truncated_or_stalled_streams_abort_and_the_source_resumes() {
    let _g = serial();
    let t0 = Instant::now();
    const IO_MS: u64 = 3000;
    const CONNECT_MS: u64 = 2000;
    let lab = TestLab::up(2, 0);
    let vm = lab.start_guest("host1", "g", 256, "fill_mib=128 dirty=64 hb_ms=10");
    let log = console_path(&vm);
    let mitm = Mitm::start(lab.host("host2").addr, Tamper::None, None);
    lab.route_peer("host1", "host2", mitm.addr);
    let settings = format!("io_timeout_ms = {IO_MS}\nconnect_timeout_ms = {CONNECT_MS}");
    append_migration_config(&lab, "host1", &settings);
    append_migration_config(&lab, "host2", &settings);
    lab.restart_agent("host1");
    lab.restart_agent("host2");

    // (name, tamper, the timeout that must elapse first, if any)
    let cases = [
        ("truncated after 32 MiB", Tamper::Truncate { after: (32 << 20) + 7 }, None),
        ("stalled after 32 MiB", Tamper::Stall { after: 32 << 20 }, Some(IO_MS)),
        ("stalled in the ClientHello", Tamper::Stall { after: 100 }, Some(CONNECT_MS)),
    ];
    for (name, tamper, timeout_ms) in cases {
        mitm.set_tamper(tamper);
        let (ok, out, _) = migrate(&lab);
        let at = mitm.log().fault_at.unwrap_or_else(|| panic!("{name}: the fault never fired"));
        let after = at.elapsed();
        assert!(!ok, "{name}: migration succeeded: {out}");
        if let Some(ms) = timeout_ms {
            assert!(
                after >= Duration::from_millis(ms - 100),
                "{name}: gave up {after:?} after the stall, before the {ms} ms timeout"
            );
        }
        let limit = Duration::from_millis(timeout_ms.unwrap_or(0) + 15_000);
        assert!(after < limit, "{name}: took {after:?} after the fault to fail");
        assert_source_resumed(&lab, &log);
        let err: Value =
            serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or(Value::Null);
        eprintln!(
            "{name}: failed {} ms after the fault; error: {}",
            after.as_millis(),
            err.get("error").map(Value::to_string).unwrap_or_else(|| out
                .trim()
                .chars()
                .take(300)
                .collect())
        );
        mitm.close_all();
    }
    assert!(records(&lab, "host2").iter().all(|(s, _)| s == "aborted"));

    mitm.set_tamper(Tamper::None);
    let (ok, out, took) = migrate(&lab);
    assert!(ok, "an unhindered migration with the short timeouts failed: {out}");
    assert_eq!(lab.running_on("g"), ["host2"]);
    eprintln!(
        "unhindered control migrated in {} ms; whole test {} ms",
        took.as_millis(),
        t0.elapsed().as_millis()
    );
}
