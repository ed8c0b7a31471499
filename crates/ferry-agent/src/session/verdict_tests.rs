//! Every answer a committed source can get, and what it may do with it.

use ferry_audit::{LogHead, Signed};
use ferry_types::{Digest32, MigrationId};

use super::*;

fn host() -> HostName {
    "host2".parse().unwrap()
}

fn signed(kind: &str) -> Signed {
    Signed {
        kind: kind.into(),
        body: "{}".into(),
        signer_cert: String::new(),
        signature: String::new(),
    }
}

fn sum(bytes: u64, d: u8) -> StreamSum {
    StreamSum { bytes, digest: Digest32([d; 32]) }
}

fn body(s: StreamSum) -> StreamBody {
    StreamBody {
        migration_id: MigrationId::new(),
        source: "host1".parse().unwrap(),
        destination: host(),
        vm: "web".parse().unwrap(),
        channel_binding: Digest32([0; 32]),
        log_head: LogHead { seq: 1, hash: "00".repeat(32) },
        bytes: s.bytes,
        digest: s.digest,
        qemu_downtime_ms: None,
    }
}

fn abort_body() -> AbortBody {
    let b = body(sum(0, 0));
    AbortBody {
        migration_id: b.migration_id,
        source: b.source,
        destination: b.destination,
        vm: b.vm,
        channel_binding: b.channel_binding,
        log_head: b.log_head,
        reason: "digest mismatch".into(),
    }
}

fn bad() -> EvidenceError {
    EvidenceError::WrongBinding
}

fn verdict(answer: Answer, receipt_sum: Option<StreamSum>, abort_ok: bool) -> Verdict {
    after_commit(
        &host(),
        answer,
        sum(100, 7),
        |_| receipt_sum.map(body).ok_or_else(bad),
        |_| if abort_ok { Ok(abort_body()) } else { Err(bad()) },
    )
}

fn receipt() -> Answer {
    Answer::Message(PeerMessage::Receipt { signed: signed("receipt") })
}

fn abort(signed_abort: bool) -> Answer {
    Answer::Message(PeerMessage::Abort {
        migration_id: MigrationId::new(),
        reason: "digest mismatch".into(),
        signed: signed_abort.then(|| signed("abort")),
    })
}

/// libvirt's source cannot read its guest's downtime; the destination
/// signs it into its Receipt and the source takes it from there. A Commit
/// (or an older agent's Receipt) has no such field and still reads.
#[test]
fn a_receipts_downtime_reaches_the_source_and_bodies_without_it_still_read() {
    let mut with = body(sum(100, 7));
    let without = serde_json::to_value(&with).unwrap();
    assert!(without.get("qemu_downtime_ms").is_none(), "{without}");
    assert_eq!(serde_json::from_value::<StreamBody>(without).unwrap(), with);
    with.qemu_downtime_ms = Some(42);
    let text = serde_json::to_string(&with).unwrap();
    assert_eq!(serde_json::from_str::<StreamBody>(&text).unwrap(), with);
    let check = |_: &Signed| Ok(with.clone());
    let v = after_commit(&host(), receipt(), sum(100, 7), check, |_| Ok(abort_body()));
    let Verdict::Completed { body, .. } = v else { panic!("{v:?}") };
    assert_eq!(body.qemu_downtime_ms, Some(42));
}

#[test]
fn only_a_valid_receipt_for_exactly_what_was_committed_completes() {
    assert!(matches!(verdict(receipt(), Some(sum(100, 7)), false), Verdict::Completed { .. }));
    let short = verdict(receipt(), Some(sum(99, 7)), false);
    assert!(
        matches!(short, Verdict::InDoubt(Error::Evidence { kind: "receipt", .. })),
        "{short:?}"
    );
    let other = verdict(receipt(), Some(sum(100, 8)), false);
    assert!(matches!(other, Verdict::InDoubt(Error::Evidence { .. })), "{other:?}");
    let forged = verdict(receipt(), None, false);
    assert!(matches!(forged, Verdict::InDoubt(Error::Evidence { .. })), "{forged:?}");
}

#[test]
fn only_a_signed_abort_lets_a_committed_source_resume() {
    assert!(matches!(verdict(abort(true), None, true), Verdict::Aborted { .. }));
    let unsigned = verdict(abort(false), None, true);
    assert!(matches!(unsigned, Verdict::InDoubt(Error::Unexpected { .. })), "{unsigned:?}");
    let forged = verdict(abort(true), None, false);
    assert!(
        matches!(forged, Verdict::InDoubt(Error::Evidence { kind: "abort", .. })),
        "{forged:?}"
    );
}

#[test]
fn silence_and_noise_leave_the_migration_in_doubt() {
    let ready = PeerMessage::PostcopyReady { migration_id: MigrationId::new() };
    let cases = [
        Answer::Message(ready),
        Answer::Broken("TLS alert bad_record_mac".into()),
        Answer::Closed,
        Answer::Timeout(Duration::from_secs(5)),
    ];
    for answer in cases {
        let v = verdict(answer, Some(sum(100, 7)), true);
        let Verdict::InDoubt(e) = v else { panic!("not in doubt: {v:?}") };
        assert_eq!(e.kind(), crate::protocol::ErrorKind::Peer, "{e}");
    }
}

fn query(
    outcome: DestinationOutcome,
    signed_word: Option<&str>,
    receipt_sum: Option<StreamSum>,
    abort_ok: bool,
) -> Result<(Event, Option<Signed>), Error> {
    after_query(
        &host(),
        outcome,
        signed_word.map(signed),
        sum(100, 7),
        ReplyChecks {
            receipt: |_: &Signed| receipt_sum.map(body).ok_or_else(bad),
            handover: |_: &Signed| receipt_sum.map(body).ok_or_else(bad),
            abort: |_: &Signed| if abort_ok { Ok(abort_body()) } else { Err(bad()) },
        },
    )
}

#[test]
fn an_in_doubt_source_believes_only_signed_answers() {
    use DestinationOutcome::*;
    let ok = |o| query(o, Some("x"), Some(sum(100, 7)), true).map(|(e, _)| e).unwrap();
    for o in [Completed, Aborted, Unknown, PostcopyActive, InProgress] {
        assert_eq!(ok(o), Event::Resolved(o));
    }
    // Unsigned, forged or for other bytes: still in doubt.
    for o in [Completed, Aborted, Unknown, PostcopyActive] {
        assert!(query(o, None, Some(sum(100, 7)), true).is_err(), "{o:?} unsigned");
    }
    assert!(query(Completed, Some("r"), Some(sum(100, 6)), true).is_err());
    assert!(query(PostcopyActive, Some("h"), None, true).is_err());
    assert!(query(Aborted, Some("a"), None, false).is_err());
    assert!(query(Unknown, Some("a"), None, false).is_err());
    // In progress needs no signature: it changes nothing.
    assert_eq!(query(InProgress, None, None, false).unwrap().0, Event::Resolved(InProgress));
}
