//! A peer that opens a connection with the wrong message is told why, as
//! long as its message named a migration (tests/attacks.rs covers the
//! frames that name nothing: those connections just close); a peer on
//! another protocol version, or a host outside `[peers]`, gets no further
//! than the greeting (docs/protocol.md, "Connections" and "Greeting").

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn first_message_is_refused(
    lab: &TestLab,
    what: &str,
    send: fn(&mut RogueSource) -> Result<(), String>,
    expect: &str,
) {
    let mut r = RogueSource::connect(lab, "host1", "host2")
        .unwrap_or_else(|e| panic!("{what}: connect as host1: {e}"));
    send(&mut r).unwrap_or_else(|e| panic!("{what}: send: {e}"));
    let (answers, _) = r.read_until_closed();
    let [answer] = answers.as_slice() else {
        panic!("{what}: expected one refusal, got {answers:?}")
    };
    assert_eq!(answer["type"], "refuse", "{what}: {answer}");
    assert_eq!(answer["migration_id"], Value::String(r.id.to_string()), "{what}: {answer}");
    let reason = answer["reason"].as_str().unwrap_or("");
    assert!(reason.contains(expect), "{what}: the reason does not say {expect:?}: {answer}");
}

#[test]
fn an_out_of_turn_first_message_gets_a_refusal_that_names_the_problem() {
    let lab = TestLab::up(2, 0);
    first_message_is_refused(
        &lab,
        "a signed offer before attesting",
        |r| {
            let body = r.offer_body("evil");
            r.send_offer(body).map(drop)
        },
        "must follow a verified attestation",
    );
    first_message_is_refused(
        &lab,
        "a signed receipt as the first message",
        |r| {
            let body = r.offer_body("evil");
            let receipt = r.stream_body(&body, 1, ferry_types::Digest32([0; 32]));
            r.send_signed("receipt", &receipt).map(drop)
        },
        "receipt cannot open a connection",
    );
    // What a newer source might send: this version names the field it cannot read.
    first_message_is_refused(
        &lab,
        "an attest message with an unknown field",
        |r| {
            r.send(&json!({"type": "attest", "migration_id": r.id, "evidence": null, "protocol_version": 9}))
        },
        "unknown field `protocol_version`",
    );
    // Nothing was started on host2.
    assert!(lab.vms("host2").is_empty());
}

/// Open mTLS to host2 with `cert`/`key`, greet with `version`, send `first`,
/// and return every control message host2 sends until it closes (its Hello
/// first) and how the connection ended.
fn exchange(
    lab: &TestLab,
    cert: &Path,
    key: &Path,
    version: u32,
    first: &Value,
) -> (Vec<Value>, String) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let id = ferry_identity::Identity::load(cert, key, &lab.lab.ca, Some(&lab.lab.crl))
            .expect("identity");
        let cfg = ferry_identity::client_config(&id).expect("client config");
        let h2 = lab.host("host2");
        let t = Duration::from_secs(10);
        let (stream, _) =
            ferry_agent::net::connect(h2.addr, None, None, &h2.name, cfg, id.domain(), t)
                .await
                .expect("mTLS to host2");
        let (r, w) = ferry_agent::net::take_over(stream).expect("take the records over");
        let mut reader = ferry_agent::net::Reader::new(r, t);
        let mut writer = ferry_agent::net::Writer::new(w, t);
        let hello = ferry_agent::protocol::Hello { protocol: version };
        writer.write_control(&hello).await.expect("hello");
        let mut answers = vec![reader.read_control::<Value>().await.expect("host2's hello")];
        // host2 may already have closed; what it answers is what counts.
        let _ = writer.write_control(first).await;
        loop {
            match reader.read_control::<Value>().await {
                Ok(v) => answers.push(v),
                Err(e) => return (answers, ferry_agent::report(&e)),
            }
        }
    })
}

/// The listening side of the greeting: a peer on another protocol version
/// is refused before its first message is read, and a host with a valid
/// certificate of this CA that is not in `[peers]` is answered with a
/// denial naming the table. A peer that is in `[peers]` and speaks this
/// version, sending the same message, gets a real answer.
#[test]
fn other_protocol_versions_and_hosts_outside_peers_are_refused() {
    let lab = TestLab::up(2, 0);
    let h1 = lab.host("host1");
    let ours = ferry_agent::protocol::PROTOCOL_VERSION;
    let query =
        json!({"type": "query", "migration_id": ferry_types::MigrationId::new(), "vm": "g"});

    let (answers, _) = exchange(&lab, &h1.cert, &h1.key, ours, &query);
    assert_eq!(answers.len(), 2, "control: {answers:?}");
    assert_eq!(answers[0]["protocol"], ours, "{answers:?}");
    assert_eq!(answers[1]["type"], "query_reply", "{answers:?}");
    // Never offered here: host2 records the id as aborted and signs that,
    // so it can never accept this id later.
    assert_eq!(answers[1]["outcome"], "aborted", "{answers:?}");
    assert_eq!(answers[1]["signed"]["kind"], "abort", "{answers:?}");

    // Refusal log lines are rate-limited to one a second: keep this one apart.
    std::thread::sleep(Duration::from_millis(1100));
    let (answers, ended) = exchange(&lab, &h1.cert, &h1.key, ours + 1, &query);
    let [hello] = answers.as_slice() else {
        panic!("a peer on protocol {} got answers beyond the greeting: {answers:?}", ours + 1)
    };
    assert_eq!(hello["protocol"], ours, "host2 must say which version it speaks: {hello}");
    let refused = format!("peer speaks protocol {}, we speak {ours}", ours + 1);
    wait_until(Duration::from_secs(10), "host2 to log the version refusal", || {
        std::fs::read_to_string(&lab.host("host2").log).unwrap_or_default().contains(&refused)
    });
    eprintln!("another protocol version: closed after the greeting ({ended})");

    // A genuine certificate of this CA for a host host2 does not know.
    let ca = lab.lab.ca_dir.to_str().expect("utf8");
    let out = lab.dir.path().join("host9");
    let out = out.to_str().expect("utf8");
    let o = run(&["ca", "issue", "host", "host9", "--ca", ca, "--out", out, "--json"], None);
    assert!(o.status.success(), "issue host9: {}", text(&o));
    let issued: Value = serde_json::from_slice(&o.stdout).expect("json");
    let (cert, key) =
        (issued["cert"].as_str().expect("cert"), issued["key"].as_str().expect("key"));
    let (answers, _) = exchange(&lab, Path::new(cert), Path::new(key), ours, &query);
    assert_eq!(answers.len(), 2, "host9: {answers:?}");
    assert_eq!(answers[1]["type"], "error", "{answers:?}");
    assert_eq!(answers[1]["kind"], "denied", "{answers:?}");
    let message = answers[1]["message"].as_str().unwrap_or("");
    assert!(message.contains("host9") && message.contains("[peers]"), "{message}");
    let m = scrape(lab.host("host2").metrics);
    assert_eq!(metric(&m, "ferry_refusals_total{reason=\"unknown_peer\"}"), 1, "{m}");
}
