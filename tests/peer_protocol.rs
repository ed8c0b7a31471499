//! A peer that opens a connection with the wrong message is told why, as
//! long as its message named a migration (tests/attacks.rs covers the
//! frames that name nothing: those connections just close).

mod common;

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
