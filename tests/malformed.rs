//! "Attack on the migration module" (docs/architecture.md, threat table):
//! an authenticated peer sends malformed frames and hostile messages to a
//! real agent; each is refused with its cause named, nothing runs, nothing
//! panics, and the agent stays small.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

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

fn ferry_channel_max_control() -> usize {
    64 * 1024
}
