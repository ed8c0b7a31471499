//! R5 (replay resistance) attacked for real: real agents, real QEMU, real
//! TPMs (swtpm).
//!
//! - A recorded Offer replayed, on the same connection or a new one, and the
//!   same migration id re-offered with a fresh binding, before and after the
//!   destination restarts: refused.
//! - A whole recorded session replayed through a proxy: the TLS handshake fails.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

// ------------------------------------------------------------------ offers

/// A recorded Offer replayed on the same connection and on new ones, the
/// same migration id re-offered with a fresh valid binding, and all of it
/// again after the destination agent restarted: every one is refused, and
/// none launches anything on the destination.
#[test]
fn a_recorded_offer_replayed_is_refused_even_after_a_restart() {
    let _g = serial();
    let t0 = Instant::now();
    let lab = TestLab::up(2, 0);
    lab.start_guest("host1", "g", 256, "fill_mib=16 dirty=4 hb_ms=10");
    let rec = migrate_ok(&lab);
    let id = rec["id"].as_str().expect("id").to_owned();
    let mid: ferry_types::MigrationId = id.parse().expect("migration id");
    // The real Offer host1 signed, as its audit log recorded it; host2
    // recorded the very same bytes.
    let offer = recorded_message(&audit_log(&lab, "host1"), "offer_sent", &id);
    assert_eq!(offer, recorded_message(&audit_log(&lab, "host2"), "offer_received", &id));
    let offer_body: Value = serde_json::from_str(&offer.body).expect("offer body");
    let h2 = lab.host("host2");
    let qemus = live_qemus_under(&h2.state_dir);
    assert_eq!(qemus.len(), 1, "host2 should run exactly the migrated VM");
    let records_before = migration_records(&lab, "host2").len();

    // On the same connection: a rogue source's own valid offer, accepted,
    // then sent again mid-transfer. host2 aborts that migration.
    {
        let mut r = RogueSource::connect(&lab, "host1", "host2").expect("connect as host1");
        r.attest().expect("attest");
        let signed = r.send_offer(r.offer_body("evil")).expect("offer");
        let accept = r.read().expect("answer");
        assert_eq!(accept["type"], "accept", "{accept}");
        r.send_signed_message("offer", &signed).expect("replay on the same connection");
        let (answers, _) = r.read_until_closed();
        assert!(answers.iter().any(|a| a["type"] == "abort"), "host2 did not abort: {answers:?}");
        let reason = answers
            .iter()
            .find(|a| a["type"] == "abort")
            .map(|a| a["reason"].to_string())
            .unwrap_or_default();
        assert!(reason.contains("unexpected offer"), "{reason}");
        eprintln!("offer replayed on its own connection: host2 aborted ({reason})");
        wait_until(Duration::from_secs(10), "the incoming QEMU gone", || {
            live_qemus_under(&h2.state_dir) == qemus
        });
    }
    let records_base = records_before + 1;

    let replay_round = |round: &str| {
        // The recorded offer, verbatim, on a new connection that attested
        // for the same migration id with host1's real TPM.
        let binding_before = host2_refusals(&lab, "binding");
        let mut r = RogueSource::connect(&lab, "host1", "host2").expect("connect as host1");
        r.set_migration_id(mid);
        r.attest().expect("real attestation for the recorded id");
        r.send_signed_message("offer", &offer).expect("send the recorded offer");
        let why = refusal(&mut r);
        assert!(
            why.contains("not bound to this connection"),
            "{round}: recorded offer refused for another reason: {why}"
        );
        assert_eq!(host2_refusals(&lab, "binding"), binding_before + 1);
        eprintln!("{round}: recorded offer on a new connection refused: {why}");

        // The same id, re-offered by host1 with this connection's binding:
        // a perfectly formed offer for a migration id already used.
        let replay_before = host2_refusals(&lab, "replay");
        let mut r = RogueSource::connect(&lab, "host1", "host2").expect("connect as host1");
        r.set_migration_id(mid);
        r.attest().expect("real attestation for the recorded id");
        let mut body = offer_body.clone();
        body["channel_binding"] = json!(r.binding());
        r.send_offer(body).expect("send the re-bound offer");
        let why = refusal(&mut r);
        assert!(
            why.contains("already used"),
            "{round}: re-bound offer refused for another reason: {why}"
        );
        assert_eq!(host2_refusals(&lab, "replay"), replay_before + 1);
        eprintln!("{round}: same id with a fresh binding refused: {why}");

        assert_eq!(live_qemus_under(&h2.state_dir), qemus, "{round}: host2 launched a QEMU");
        assert_eq!(
            migration_records(&lab, "host2").len(),
            records_base,
            "{round}: host2 recorded a new migration"
        );
        let vms: Vec<Value> = lab.vms("host2").iter().map(|v| v["name"].clone()).collect();
        assert_eq!(vms, [json!("g")], "{round}");
    };
    replay_round("before restart");
    // The seen-set is durable: a restarted destination still refuses.
    lab.restart_agent("host2");
    replay_round("after host2 restarted");
    let elapsed = mid.created_unix_ms().abs_diff(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64,
    );
    // The refusals above must be the seen-set's, not the validity window's.
    assert!(elapsed < 60_000, "the test outlived the offer's validity window ({elapsed} ms)");
    assert_eq!(lab.running_on("g"), ["host2"]);
    eprintln!("whole test {} ms", t0.elapsed().as_millis());
}

// ------------------------------------------------------------------ sessions

/// A whole session recorded by a man in the middle (every byte the source
/// sent to the destination) and replayed on a fresh TCP connection after
/// the migration: the TLS handshake fails (new server randomness and key
/// share: the recorded client Finished and CertificateVerify cannot match),
/// nothing is launched or recorded, and the refusal is counted.
#[test]
fn a_whole_recorded_session_replayed_through_a_proxy_is_refused() {
    let _g = serial();
    let t0 = Instant::now();
    let lab = TestLab::up(2, 0);
    lab.start_guest("host1", "g", 256, "fill_mib=16 dirty=4 hb_ms=10");
    let cap = lab.dir.path().join("session");
    let mitm = Mitm::start(lab.host("host2").addr, Tamper::None, Some(cap.clone()));
    lab.route_peer("host1", "host2", mitm.addr);
    lab.restart_agent("host1");
    migrate_ok(&lab);
    drop(mitm);
    let recorded = std::fs::read(format!("{}.up", cap.display())).expect("capture");
    assert!(recorded.len() > 1 << 20, "the capture holds no session ({} bytes)", recorded.len());
    assert_eq!(recorded[0], 0x16, "the capture does not start with a TLS handshake record");

    let h2 = lab.host("host2");
    let failures_before = metric(&scrape(h2.metrics), "ferry_tls_handshake_failures_total");
    let records_before = migration_records(&lab, "host2");
    let qemus = live_qemus_under(&h2.state_dir);
    let log_before = std::fs::metadata(&h2.log).map(|m| m.len()).unwrap_or(0);

    // Replay, at the pace of the original, into the destination itself.
    let mut s = TcpStream::connect(h2.addr).expect("connect to host2");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let reader = {
        let mut s = s.try_clone().expect("clone");
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            got
        })
    };
    let mut sent = 0usize;
    let mut write_error = None;
    for chunk in recorded.chunks(16 * 1024) {
        match s.write_all(chunk) {
            Ok(()) => sent += chunk.len(),
            Err(e) => {
                write_error = Some(e.to_string());
                break;
            }
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let got = reader.join().expect("reader");
    // What came back: the server's new handshake flight, then an alert; no
    // application data (the server never finishes a handshake with us).
    let mut types = Vec::new();
    let mut i = 0;
    while i + 5 <= got.len() {
        types.push(got[i]);
        i += 5 + u16::from_be_bytes([got[i + 3], got[i + 4]]) as usize;
    }
    eprintln!(
        "replayed {sent} of {} recorded bytes (write ended: {write_error:?}); host2 sent {} bytes in records of types {types:?}",
        recorded.len(),
        got.len()
    );

    wait_until(Duration::from_secs(10), "the refusal to be counted", || {
        metric(&scrape(h2.metrics), "ferry_tls_handshake_failures_total") > failures_before
    });
    let text =
        String::from_utf8_lossy(&std::fs::read(&h2.log).unwrap_or_default()[log_before as usize..])
            .into_owned();
    let refused: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("connection refused") && l.contains("TLS handshake failed"))
        .collect();
    // Refusal logs are rate-limited (one line per second); the counter above
    // is the exact record, the log at most one line.
    assert!(refused.len() <= 1, "host2 logged more than one refused handshake:\n{text}");
    if let Some(line) = refused.first() {
        eprintln!("host2: {}", line.trim());
    }
    assert!(
        !text.contains("peer=host1"),
        "the replayed session reached the peer protocol:\n{text}"
    );
    assert_eq!(
        migration_records(&lab, "host2"),
        records_before,
        "the replay created a migration record"
    );
    assert_eq!(live_qemus_under(&h2.state_dir), qemus, "the replay launched a QEMU");
    assert_eq!(lab.running_on("g"), ["host2"]);
    eprintln!("whole test {} ms", t0.elapsed().as_millis());
}
