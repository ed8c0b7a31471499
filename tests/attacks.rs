//! R4 and the "attack on the migration module" threat, attacked for real
//! (docs/architecture.md threat table, issue 6): a man in the middle on loopback that
//! reads, flips, truncates and stalls the migration stream between two real
//! agents running real QEMU; an authenticated peer sending malformed frames;
//! and a flood of unauthenticated connections during a migration.
//!
//! Each test holds [`SERIAL`]: they run QEMU under TCG on a small machine,
//! and the stall test measures a timeout.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use ferry_guest::GuestLine;
use serde_json::{json, Value};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn console_path(vm: &Value) -> PathBuf {
    PathBuf::from(vm["console_log"].as_str().expect("console_log"))
}

/// `ferry migrate g --to host2 --host host1`: (success, output, wall time).
fn migrate(lab: &TestLab) -> (bool, String, Duration) {
    let t = Instant::now();
    let o = lab.ferry(&["migrate", "g", "--to", "host2", "--host", "host1", "--json"]);
    (o.status.success(), text(&o), t.elapsed())
}

/// The guest's memory checker never saw a bad page on this console.
fn assert_memory_consistent(log: &Path) {
    let lines = ferry_cli::console::read_console(log).expect("console");
    for l in &lines {
        match l.line {
            GuestLine::Corrupt { .. } => {
                panic!("guest memory corrupted: {:?} in {}", l.line, log.display())
            }
            GuestLine::Sweep { errors, .. } if errors > 0 => {
                panic!("a sweep found {errors} bad pages in {}", log.display())
            }
            _ => {}
        }
    }
}

/// After a failed migration: the source copy runs again (heartbeats move
/// on), it is the only copy, the destination kept no QEMU and no VM, and
/// the guest's memory checks are clean.
fn assert_source_resumed(lab: &TestLab, log: &Path) {
    wait_until(Duration::from_secs(20), "the source copy to run again", || {
        lab.vm_state("host1", "g").as_deref() == Some("running")
    });
    assert_guest_runs(log);
    assert_eq!(lab.running_on("g"), ["host1"]);
    wait_until(Duration::from_secs(15), "no QEMU left on host2", || {
        live_qemus_under(&lab.host("host2").state_dir).is_empty()
    });
    assert!(lab.vms("host2").is_empty(), "host2 still lists a VM");
    assert_memory_consistent(log);
}

/// Every migration record on `host` (state, error).
fn records(lab: &TestLab, host: &str) -> Vec<(String, String)> {
    let (ok, list) = lab.ferry_json(&["migrations", "list", "--host", host]);
    assert!(ok, "migrations list on {host}: {list}");
    list["migrations"]
        .as_array()
        .expect("migrations")
        .iter()
        .map(|m| {
            (
                m["state"].as_str().unwrap_or("").to_owned(),
                m["error"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

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
    route_peer_via(&lab, "host1", "host2", mitm.addr);
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
    route_peer_via(&lab, "host1", "host2", mitm.addr);
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
    route_peer_via(&lab, "host1", "host2", mitm.addr);
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

// ------------------------------------------------------------------ malformed frames

/// What the attacker, a [`RogueSource`] holding host1's real certificate,
/// key, TPM and AK, sends after the protocol greeting.
enum Send {
    Raw(Vec<u8>),
    /// Raw bytes, then close our sending side (TLS close_notify).
    RawThenClose(Vec<u8>),
    /// Messages sent without attesting first.
    Unattested(fn(&mut RogueSource) -> Result<(), String>),
    /// Messages sent after a real, verified attestation on this connection.
    Attested(fn(&mut RogueSource) -> Result<(), String>),
    /// After attestation, a valid signed Offer and host2's signed Accept:
    /// what the closure sends, given the offer body and a valid QEMU
    /// migration stream of the offered VM.
    AfterAccept(fn(&mut RogueSource, &Value, &[u8]) -> Result<(), String>),
}

/// `bytes` as data frames of at most 1 MiB, then end-of-data.
fn data_frames(bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes.len() + bytes.len() / 1024 + 64);
    for chunk in bytes.chunks(1 << 20) {
        v.extend(frame(2, chunk));
    }
    v.extend(frame(3, b""));
    v
}

/// A genuine QEMU migration stream of the VM that `RogueSource::offer_body`
/// offers (q35, 256 MiB, 1 vCPU, the test guest), made by a QEMU the test
/// starts itself: the destination's QEMU loads it completely, so what
/// decides is the signed commit.
fn valid_qemu_stream(lab: &TestLab) -> Vec<u8> {
    let dir = lab.dir.path().join("rogue-stream");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut q = PlainQemu::start(&dir, "rogue", 256, "fill_mib=8 hb_ms=10", false);
    wait_until(Duration::from_secs(60), "READY on the stream's QEMU", || {
        q.serial_text().contains("READY")
    });
    let out = dir.join("stream.bin");
    q.qmp.cmd("migrate", json!({"uri": format!("exec:cat > {}", out.display())}));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = q.qmp.cmd("query-migrate", json!({}));
        match st["status"].as_str() {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => panic!("could not make a QEMU stream: {st}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "QEMU stream not done: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(q);
    std::fs::read(&out).expect("stream")
}

/// A fresh UUIDv7 string (what a source would use as a migration id).
fn uuid_v7() -> String {
    ferry_types::MigrationId::new().to_string()
}

fn pseudo_random(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// Sign `body` as an offer and send it; the signature is valid, so what
/// host2 refuses is the content.
fn offer_with(
    r: &mut RogueSource,
    edit: impl FnOnce(&RogueSource, &mut Value),
) -> Result<(), String> {
    let mut body = r.offer_body("evil");
    edit(r, &mut body);
    r.send_offer(body).map(drop)
}

/// Malformed input from a peer that holds a valid host certificate: each
/// connection is closed (or the migration aborted) with the cause in the
/// agent's log; the agent neither panics nor grows, and answers afterwards.
/// Offers go through real attestation and carry real signatures by host1,
/// so what is refused is the content, not a missing step.
#[test]
fn malformed_frames_from_an_authenticated_peer_are_refused() {
    let _g = serial();
    let t0 = Instant::now();
    const IO_MS: u64 = 2000;
    let lab = TestLab::up(2, 0);
    append_migration_config(&lab, "host2", &format!("io_timeout_ms = {IO_MS}"));
    lab.restart_agent("host2");
    let h2 = lab.host("host2");
    let ca = ferry_audit::CaTrust::load(&lab.lab.ca).expect("CA");
    let pid = lab.agent_pid("host2");
    let agent_log = h2.log.clone();

    let nested =
        format!("{{\"type\":\"abort\",\"migration_id\":\"x\",\"reason\":{}", "[".repeat(60_000));
    let big_garbage = vec![0xffu8; ferry_channel_max_control()];
    let cases: Vec<(&str, Send, &[&str])> = vec![
        (
            "invalid frame kind",
            Send::Raw([vec![9, 0, 0, 0, 0, 0, 0, 4], b"abcd".to_vec()].concat()),
            &["invalid frame kind 9"],
        ),
        ("frame kind 0", Send::Raw(vec![0; 8]), &["invalid frame kind 0"]),
        (
            "reserved header bytes set",
            Send::Raw([vec![1, 0, 7, 0, 0, 0, 0, 2], b"{}".to_vec()].concat()),
            &["reserved header bytes"],
        ),
        (
            "huge control length",
            Send::Raw(vec![1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            &["exceeds the maximum"],
        ),
        (
            "huge data length",
            Send::Raw(vec![2, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff]),
            &["exceeds the maximum"],
        ),
        (
            "end-of-data with a payload",
            Send::Raw(vec![3, 0, 0, 0, 0, 0, 0, 1, 0]),
            &["exceeds the maximum"],
        ),
        (
            "non-JSON control frame",
            Send::Raw(frame(1, b"this is not json")),
            &["malformed control message"],
        ),
        (
            "64 KiB of non-UTF-8 control frame",
            Send::Raw(frame(1, &big_garbage)),
            &["malformed control message"],
        ),
        ("60,000-deep nested JSON", Send::Raw(frame(1, nested.as_bytes())), &["recursion limit"]),
        (
            "unknown message type",
            Send::Raw(control(&json!({"type": "launch_qemu", "argv": ["rm", "-rf", "/"]}))),
            &["unknown variant"],
        ),
        (
            "data frame before any offer",
            Send::Raw(frame(2, &[0x5a; 16])),
            &["expected a control frame"],
        ),
        ("end-of-data before any offer", Send::Raw(frame(3, b"")), &["expected a control frame"]),
        // The old, unsigned receipt shape is no longer a message at all.
        (
            "unsigned receipt before any offer",
            Send::Raw(control(
                &json!({"type": "receipt", "migration_id": uuid_v7(), "bytes": 1, "digest": "00".repeat(32)}),
            )),
            &["peer sent no valid message", "unknown field"],
        ),
        (
            "truncated frame, then close",
            Send::RawThenClose([vec![1, 0, 0, 0, 0, 0, 0, 100], b"{\"type\":".to_vec()].concat()),
            &["peer closed the connection"],
        ),
        (
            "truncated frame, then silence",
            Send::Raw([vec![1, 0, 0, 0, 0, 0, 0, 100], b"{\"type\":".to_vec()].concat()),
            &["timed out"],
        ),
        (
            "signed receipt before any offer",
            Send::Unattested(|r| {
                let body = r.offer_body("evil");
                let receipt = r.stream_body(&body, 1, ferry_types::Digest32([0; 32]));
                r.send_signed("receipt", &receipt).map(drop)
            }),
            &["unexpected first message"],
        ),
        (
            "valid signed offer without attestation",
            Send::Unattested(|r| {
                let body = r.offer_body("evil");
                r.send_offer(body).map(drop)
            }),
            &["offer without attestation refused"],
        ),
        (
            "offer with an out-of-limits VM spec",
            Send::Attested(|r| offer_with(r, |_, o| o["spec"]["memory_mib"] = json!(u32::MAX))),
            &["refusing migration", "memory_mib 4294967295"],
        ),
        (
            "offer with a VM name that is a path",
            Send::Attested(|r| {
                offer_with(r, |_, o| {
                    o["vm"] = json!("../../etc");
                    o["spec"]["name"] = json!("../../etc");
                })
            }),
            &["refusing migration", "offer signature", "../../etc"],
        ),
        (
            "offer bound to another connection",
            Send::Attested(|r| {
                offer_with(r, |r, o| {
                    let other = ferry_agent::protocol::offer_binding(&[0x42; 32], &r.id);
                    o["channel_binding"] = json!(other);
                })
            }),
            &["refusing migration", "not bound to this connection"],
        ),
        (
            "offer for another migration than the attested one",
            Send::Attested(|r| {
                offer_with(r, |r, o| {
                    let other = ferry_types::MigrationId::new();
                    o["migration_id"] = json!(other);
                    o["channel_binding"] =
                        json!(ferry_agent::protocol::offer_binding(&r.exporter, &other));
                })
            }),
            &["refusing migration", "on a connection attested for"],
        ),
        (
            "offer signed by host1 claiming source host3",
            Send::Attested(|r| offer_with(r, |_, o| o["source"] = json!("host3"))),
            &["refusing migration", "claims source host3"],
        ),
        (
            "offer whose signature is over another body",
            Send::Attested(|r| {
                let body = r.offer_body("evil");
                let mut signed = r.sign("offer", &body);
                let mut other = body.clone();
                other["spec"]["memory_mib"] = json!(512);
                signed.body = other.to_string();
                r.send_signed_message("offer", &signed)
            }),
            &["refusing migration", "offer signature", "signature does not match"],
        ),
        // After Accept: host2 has launched an incoming QEMU; none may run.
        (
            "offer, a genuine QEMU stream, then a signed commit with another digest",
            Send::AfterAccept(|r, offer, stream| {
                r.write_raw(&data_frames(stream))?;
                let commit =
                    r.stream_body(offer, stream.len() as u64, ferry_types::Digest32([0x5a; 32]));
                r.send_signed("commit", &commit).map(drop)
            }),
            &["aborting incoming migration", "digest mismatch"],
        ),
        (
            "offer, a genuine QEMU stream, then a signed commit with another byte count",
            Send::AfterAccept(|r, offer, stream| {
                r.write_raw(&data_frames(stream))?;
                let digest = ferry_types::Digest32(*blake3::hash(stream).as_bytes());
                let commit = r.stream_body(offer, stream.len() as u64 + 1, digest);
                r.send_signed("commit", &commit).map(drop)
            }),
            &["aborting incoming migration", "byte count mismatch"],
        ),
        (
            "offer, a genuine QEMU stream, then a commit bound to another connection",
            Send::AfterAccept(|r, offer, stream| {
                r.write_raw(&data_frames(stream))?;
                let digest = ferry_types::Digest32(*blake3::hash(stream).as_bytes());
                let mut commit = r.stream_body(offer, stream.len() as u64, digest);
                commit["channel_binding"] =
                    json!(ferry_agent::protocol::offer_binding(&[0x42; 32], &r.id));
                r.send_signed("commit", &commit).map(drop)
            }),
            &["aborting incoming migration", "invalid commit", "bound to another connection"],
        ),
        (
            "offer, then a hostile VM-state stream and a signed commit",
            Send::AfterAccept(|r, offer, _| {
                let mut v = frame(2, &pseudo_random(1 << 20, 7));
                v.extend(frame(3, b""));
                r.write_raw(&v)?;
                let commit = r.stream_body(offer, 1 << 20, ferry_types::Digest32([0; 32]));
                r.send_signed("commit", &commit).map(drop)
            }),
            &["aborting incoming migration"],
        ),
        (
            "offer, then a non-JSON control frame mid-transfer",
            Send::AfterAccept(|r, _, _| {
                let mut v = frame(2, &pseudo_random(4096, 9));
                v.extend(frame(1, b"\x00\x01garbage"));
                r.write_raw(&v)
            }),
            &["malformed control message during the transfer"],
        ),
    ];

    let accepted = cases.iter().filter(|(_, s, _)| matches!(s, Send::AfterAccept(_))).count();
    let stream = valid_qemu_stream(&lab);
    eprintln!("a genuine QEMU stream of the offered VM: {} bytes", stream.len());

    let mut max_rss = 0u64;
    for (name, send, expect) in cases {
        let log_before = std::fs::metadata(&agent_log).map(|m| m.len()).unwrap_or(0);
        let t = Instant::now();
        let mut r = RogueSource::connect(&lab, "host1", "host2")
            .unwrap_or_else(|e| panic!("{name}: connect as host1: {e}"));
        let mut received: Vec<String> = Vec::new();
        // A write may fail once the agent has given up on us: that is fine,
        // the assertions below are about how it gave up.
        let sent = match send {
            Send::Raw(b) => r.write_raw(&b),
            Send::RawThenClose(b) => r.write_raw(&b).and_then(|()| r.close_write()),
            Send::Unattested(f) => f(&mut r),
            Send::Attested(f) => {
                let theirs = r
                    .attest()
                    .unwrap_or_else(|e| panic!("{name}: real attestation as host1 failed: {e}"));
                assert!(theirs["evidence"].is_object(), "{name}: host2 sent no quote: {theirs}");
                f(&mut r)
            }
            Send::AfterAccept(f) => {
                r.attest()
                    .unwrap_or_else(|e| panic!("{name}: real attestation as host1 failed: {e}"));
                let offer = r.offer_body("evil");
                r.send_offer(offer.clone()).expect("offer");
                let answer =
                    r.read().unwrap_or_else(|e| panic!("{name}: no answer to a valid offer: {e}"));
                assert_eq!(
                    answer["type"], "accept",
                    "{name}: a valid offer was not accepted: {answer}"
                );
                let signed: ferry_audit::Signed =
                    serde_json::from_value(answer["signed"].clone()).expect("signed accept");
                let (_, signer) = signed
                    .verify::<Value>("accept", &ca)
                    .unwrap_or_else(|e| panic!("{name}: the Accept does not verify: {e}"));
                assert!(
                    signer.to_string().ends_with("/host/host2"),
                    "{name}: Accept signed by {signer}"
                );
                received.push(answer.to_string());
                f(&mut r, &offer, &stream)
            }
        };
        let (answers, closed_by) = r.read_until_closed();
        received.extend(answers.iter().map(Value::to_string));
        drop(r);
        let took = t.elapsed();
        assert!(
            !closed_by.contains("timed out"),
            "{name}: the agent kept the connection open ({closed_by})"
        );
        assert!(
            lab.agent_alive_and_answers("host2"),
            "{name}: host2's agent is gone or does not answer"
        );
        let rss = rss_kib(pid).expect("rss");
        max_rss = max_rss.max(rss);
        assert!(rss < 200 * 1024, "{name}: host2's agent uses {rss} KiB");
        // The cause is named in the agent's log.
        let new_log = || {
            let text = std::fs::read(&agent_log).unwrap_or_default();
            strip_ansi(&String::from_utf8_lossy(&text[log_before as usize..]))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !expect.iter().all(|e| new_log().to_lowercase().contains(&e.to_lowercase())) {
            assert!(
                Instant::now() < deadline,
                "{name}: host2's log does not name the cause {expect:?}:\n{}",
                new_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let cause = new_log()
            .lines()
            .filter(|l| !l.contains("operator request"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
            .join(" | ");
        assert!(
            received.iter().all(|r| !r.contains("\"completed\"") && !r.contains("\"receipt\"")),
            "{name}: {received:?}"
        );
        let short: Vec<String> = received.iter().map(|r| r.chars().take(160).collect()).collect();
        eprintln!(
            "{name}: closed after {} ms ({closed_by}); send: {sent:?}; agent said {short:?}; RSS {} KiB\n    log: {}",
            took.as_millis(),
            rss,
            cause.chars().take(600).collect::<String>()
        );
        wait_until(Duration::from_secs(10), "no QEMU left on host2", || {
            live_qemus_under(&h2.state_dir).is_empty()
        });
    }
    let text = String::from_utf8_lossy(&std::fs::read(&agent_log).unwrap_or_default()).into_owned();
    assert!(!text.contains("panicked"), "host2's agent panicked:\n{text}");
    let dest = records(&lab, "host2");
    assert_eq!(dest.len(), accepted, "{accepted} offers were accepted: {dest:?}");
    assert!(dest.iter().all(|(s, _)| s == "aborted"), "{dest:?}");
    assert!(lab.vms("host2").is_empty());
    eprintln!("max agent RSS {max_rss} KiB; whole test {} ms", t0.elapsed().as_millis());
}

/// The agent's log without terminal colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn ferry_channel_max_control() -> usize {
    64 * 1024
}

trait Answers {
    fn agent_alive_and_answers(&self, host: &str) -> bool;
}

impl Answers for TestLab {
    fn agent_alive_and_answers(&self, host: &str) -> bool {
        pid_alive(self.agent_pid(host)) && self.ferry_json(&["status", "--host", host]).0
    }
}

// ------------------------------------------------------------------ flood

const TLS_FLOOD: &str = r#"
import json, socket, ssl, sys, threading
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
counts = {"refused_cert_required": 0, "refused_protocol": 0, "refused_other": 0, "closed": 0, "answered": 0}
reasons = {}
lock = threading.Lock()
def one(i):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if i % 10 == 0:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    key = "closed"
    try:
        with socket.create_connection((host, port), timeout=20) as raw:
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"\x01\x00\x00\x00\x00\x00\x00\x0e" + b'{"protocol":1}')
                data = s.recv(4096)
                key = "answered" if data else "closed"
    except ssl.SSLError as e:
        r = str(e)
        with lock:
            reasons[r[:80]] = reasons.get(r[:80], 0) + 1
        if "CERTIFICATE_REQUIRED" in r.upper() or "CERTIFICATE REQUIRED" in r.upper():
            key = "refused_cert_required"
        elif "PROTOCOL" in r.upper() or "VERSION" in r.upper():
            key = "refused_protocol"
        else:
            key = "refused_other"
    except (ConnectionResetError, BrokenPipeError) as e:
        key = "closed"
    with lock:
        counts[key] += 1
def worker(start):
    for i in range(start, n, 8):
        one(i)
ts = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps({"counts": counts, "reasons": reasons}))
"#;

/// How the agent answered one garbage connection: `true` if it refused in
/// the handshake (closed, or sent only a TLS alert record).
fn garbage_connection(addr: SocketAddr, i: u32) -> Result<bool, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20))).map_err(|e| e.to_string())?;
    let payload: Vec<u8> = match i % 4 {
        0 => pseudo_random(64 + (i as usize % 512), i),
        1 => b"GET / HTTP/1.1\r\nHost: host2\r\n\r\n".to_vec(),
        // A TLS handshake record that claims far more than it carries.
        2 => [vec![0x16, 0x03, 0x01, 0xff, 0xff], pseudo_random(200, i)].concat(),
        // A Ferry frame without TLS.
        _ => frame(1, b"{\"protocol\":1}"),
    };
    let _ = s.write_all(&payload);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    Ok(got.is_empty() || got[0] == 0x15)
}

/// 1,000 unauthenticated connections (garbage, silence, TLS without a
/// client certificate, TLS 1.2) hit the destination while it receives a
/// migration: all are refused in the handshake, the migration completes,
/// and the agent answers afterwards.
#[test]
fn a_thousand_unauthenticated_connections_during_a_migration() {
    let _g = serial();
    let t0 = Instant::now();
    // 24 MiB/s and a slowly dirtying guest: the transfer lasts ~8 s and
    // converges (at dirty=64, i.e. 256 MB/s, it never would).
    let lab = TestLab::up(2, 24);
    let vm = lab.start_guest("host1", "g", 256, "fill_mib=192 dirty=1 hb_ms=10");
    let log = console_path(&vm);
    let h2 = lab.host("host2");
    let addr = h2.addr;
    let pid = lab.agent_pid("host2");
    let log_before = std::fs::metadata(&h2.log).map(|m| m.len()).unwrap_or(0);

    let mut child = spawn_migrate(&lab);
    wait_until(Duration::from_secs(60), "the incoming VM on host2", || {
        lab.vms("host2").iter().any(|v| v["name"] == "g")
    });
    let flood_start = Instant::now();
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the migration ended before the flood began"
    );

    // RSS sampler.
    let max_rss = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (m, st) = (max_rss.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                if let Some(r) = rss_kib(pid) {
                    m.fetch_max(r, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // 100 silent connections, held open (slowloris).
    let idle: Vec<TcpStream> =
        (0..100).map(|_| TcpStream::connect(addr).expect("idle connect")).collect();
    // 400 garbage connections from 8 threads.
    let garbage: Vec<_> = (0..8u32)
        .map(|t| {
            std::thread::spawn(move || {
                (0..50u32).map(|k| garbage_connection(addr, t * 50 + k)).collect::<Vec<_>>()
            })
        })
        .collect();
    // 500 TLS connections without a client certificate (50 of them TLS 1.2 only).
    let tls = Command::new("python3")
        .args(["-c", TLS_FLOOD, "127.0.0.1", &addr.port().to_string(), "500"])
        .output()
        .expect("python3");
    assert!(tls.status.success(), "TLS flood script failed: {}", text(&tls));
    let tls_result: Value = serde_json::from_slice(&tls.stdout).expect("flood json");
    let garbage: Vec<Result<bool, String>> =
        garbage.into_iter().flat_map(|h| h.join().expect("garbage thread")).collect();
    let flood_ms = flood_start.elapsed().as_millis();
    let still_running = child.try_wait().expect("try_wait").is_none();

    let deadline = Instant::now() + Duration::from_secs(240);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the migration under flood did not finish within 240 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = child.wait_with_output().expect("migrate");
    let migrated_ms = flood_start.elapsed().as_millis();
    assert!(o.status.success(), "the migration under flood failed: {}", text(&o));
    assert_eq!(lab.running_on("g"), ["host2"]);

    // The silent connections are dropped by the handshake timeout.
    let mut idle_closed = 0;
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
        let mut b = [0u8; 16];
        if matches!(s.read(&mut b), Ok(0) | Err(_)) {
            idle_closed += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");

    let garbage_refused = garbage.iter().filter(|r| matches!(r, Ok(true))).count();
    let counts = &tls_result["counts"];
    let tls_refused: u64 = ["refused_cert_required", "refused_protocol", "refused_other", "closed"]
        .iter()
        .map(|k| counts[k].as_u64().unwrap_or(0))
        .sum();
    eprintln!(
        "flood: {} ms for 1000 connections (migration still running at its end: {still_running}); migration done {} ms after the flood began; garbage refused {garbage_refused}/400; \
         TLS {tls_result}; idle closed {idle_closed}/100; max agent RSS {} KiB",
        flood_ms,
        migrated_ms,
        max_rss.load(Ordering::Relaxed)
    );
    assert_eq!(garbage_refused, 400, "garbage connections got more than a TLS alert: {garbage:?}");
    assert_eq!(
        counts["answered"].as_u64(),
        Some(0),
        "a TLS client without a certificate got application data: {tls_result}"
    );
    assert_eq!(tls_refused, 500, "{tls_result}");
    assert!(
        counts["refused_cert_required"].as_u64().unwrap_or(0) >= 400,
        "TLS 1.3 clients without a certificate were not refused for it: {tls_result}"
    );
    assert_eq!(idle_closed, 100, "silent connections were not dropped by the handshake timeout");
    assert!(
        max_rss.load(Ordering::Relaxed) < 200 * 1024,
        "agent RSS grew to {} KiB",
        max_rss.load(Ordering::Relaxed)
    );
    assert!(lab.agent_alive_and_answers("host2"));
    // Every one was refused before any Ferry parser: the agent logs each
    // as a refused connection, at the TLS layer.
    let agent_text = std::fs::read(&h2.log).unwrap_or_default();
    let new = String::from_utf8_lossy(&agent_text[log_before as usize..]).into_owned();
    let refused = new.lines().filter(|l| l.contains("connection refused")).count();
    let tls_layer = new
        .lines()
        .filter(|l| {
            l.contains("connection refused")
                && (l.contains("TLS handshake") || l.contains("certificate"))
        })
        .count();
    eprintln!("host2 logged {refused} refused connections (rate-limited), {tls_layer} of them at the TLS layer");
    assert!(refused >= 1, "host2 logged no refused connection");
    assert_eq!(refused, tls_layer, "some connections were refused after the TLS handshake");
    // Each one is counted, though peers cannot flood the log.
    let failures = metric(&scrape(h2.metrics), "ferry_tls_handshake_failures_total");
    assert!(failures >= 1000, "host2 counted only {failures} failed handshakes");
    assert!(!new.contains("panicked"));
    assert_guest_runs(&PathBuf::from(lab.vms("host2")[0]["console_log"].as_str().expect("log")));
    assert_memory_consistent(&log);
    eprintln!("whole test {} ms", t0.elapsed().as_millis());
}
