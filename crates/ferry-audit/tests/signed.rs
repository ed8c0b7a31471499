//! Signed protocol messages: round trip and every way one must be refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::{cluster, Body};
use ferry_audit::{AuditError, CaTrust, LogHead, MessageFault, Signed, Signer, VerifyError};
use ferry_identity::{CaDir, Validity};

fn body() -> Body {
    Body {
        migration_id: "0190f5c2-0000-7000-8000-000000000001".into(),
        source: "spiffe://ferry.test/host/src-host".into(),
        destination: "spiffe://ferry.test/host/dst-host".into(),
        vm: "vm-1".into(),
        channel_binding: "cd".repeat(32),
        digests: vec![],
        log_head: LogHead { seq: 3, hash: "00".repeat(32) },
    }
}

fn fault(r: Result<(Body, ferry_types::SpiffeId), AuditError>) -> MessageFault {
    match r {
        Err(AuditError::Verify(e)) => match *e {
            VerifyError::Message { fault, .. } => fault,
            other => panic!("unexpected {other}"),
        },
        Err(e) => panic!("unexpected {e}"),
        Ok(_) => panic!("a bad message was accepted"),
    }
}

#[test]
fn round_trip() {
    let c = cluster();
    let msg = Signed::sign("offer", &body(), &c.src_signer()).unwrap();
    let (b, who): (Body, ferry_types::SpiffeId) = msg.verify("offer", &c.ca).unwrap();
    assert_eq!(b, body());
    assert_eq!(who.to_string(), "spiffe://ferry.test/host/src-host");
    // The message survives its own JSON encoding unchanged.
    let back: Signed = serde_json::from_str(&serde_json::to_string(&msg).unwrap()).unwrap();
    assert_eq!(back, msg);
}

#[test]
fn flipped_bit_in_body_or_signature_is_refused() {
    let c = cluster();
    let msg = Signed::sign("offer", &body(), &c.src_signer()).unwrap();

    let mut m = msg.clone();
    m.body = m.body.replacen("vm-1", "vm-3", 1); // '1' ^ 0x02 = '3': one bit
    assert_eq!(fault(m.verify("offer", &c.ca)), MessageFault::BadSignature);

    let mut sig = B64.decode(&msg.signature).unwrap();
    let last = sig.len() - 1;
    sig[last] ^= 1;
    let mut m = msg.clone();
    m.signature = B64.encode(sig);
    assert_eq!(fault(m.verify("offer", &c.ca)), MessageFault::BadSignature);
}

#[test]
fn high_s_twin_of_a_valid_signature_is_refused() {
    // ECDSA malleability: (r, n - s) verifies too, but Ferry accepts only low-S.
    let c = cluster();
    let msg = Signed::sign("offer", &body(), &c.src_signer()).unwrap();
    let sig = p256::ecdsa::Signature::from_der(&B64.decode(&msg.signature).unwrap()).unwrap();
    let (r, s) = sig.split_scalars();
    let twin = p256::ecdsa::Signature::from_scalars(r, -*s).unwrap();
    let mut m = msg;
    m.signature = B64.encode(twin.to_der().as_bytes());
    assert_eq!(fault(m.verify("offer", &c.ca)), MessageFault::BadSignature);
}

#[test]
fn signer_from_another_ca_is_refused() {
    let c = cluster();
    let other = CaDir::init(&c.path("other-ca"), &"ferry.test".parse().unwrap(), 365).unwrap();
    let rogue = other
        .issue_host(&"src-host".parse().unwrap(), Validity::days(30), &c.path("rogue"))
        .unwrap();
    let rogue = Signer::load(&rogue.cert, &rogue.key).unwrap();
    let msg = Signed::sign("offer", &body(), &rogue).unwrap();
    assert!(matches!(fault(msg.verify("offer", &c.ca)), MessageFault::Untrusted(_)));
    // ... and it verifies under its own CA, so the refusal is about trust.
    let other_trust = CaTrust::load(&other.cert_path()).unwrap();
    msg.verify::<Body>("offer", &other_trust).unwrap();
}

#[test]
fn expired_signer_is_refused() {
    let c = cluster();
    let now = time::OffsetDateTime::now_utc();
    let v = Validity {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
    };
    let old = c.ca_dir.issue_host(&"old-host".parse().unwrap(), v, &c.path("old")).unwrap();
    let msg = Signed::sign("offer", &body(), &Signer::load(&old.cert, &old.key).unwrap()).unwrap();
    let f = fault(msg.verify("offer", &c.ca));
    assert!(matches!(&f, MessageFault::Untrusted(why) if why.contains("xpired")), "{f:?}");
    // It was valid five days ago: evidence made then still verifies at that time.
    msg.verify_at::<Body>("offer", &c.ca, now - time::Duration::days(5)).unwrap();
}

#[test]
fn kind_mismatch_is_refused() {
    let c = cluster();
    let accept = Signed::sign("accept", &body(), &c.dst_signer()).unwrap();
    // Presented as a Receipt: refused on the label...
    assert!(matches!(fault(accept.verify("receipt", &c.ca)), MessageFault::WrongKind { .. }));
    // ... and relabelled, refused by the signature, which covers the kind.
    let mut relabelled = accept;
    relabelled.kind = "receipt".into();
    assert_eq!(fault(relabelled.verify("receipt", &c.ca)), MessageFault::BadSignature);
}

#[test]
fn unknown_fields_and_bad_kinds_are_refused() {
    let c = cluster();
    let msg = Signed::sign("offer", &body(), &c.src_signer()).unwrap();
    let mut v = serde_json::to_value(&msg).unwrap();
    v["extra"] = serde_json::json!(1);
    assert!(serde_json::from_value::<Signed>(v).is_err());
    assert!(matches!(
        Signed::sign("of\0fer", &body(), &c.src_signer()),
        Err(AuditError::BadKind { .. })
    ));
}

#[test]
fn key_of_another_certificate_is_refused_at_load() {
    let c = cluster();
    let err = Signer::load(&c.src.cert, &c.dst.key).unwrap_err();
    assert!(matches!(err, AuditError::KeyMismatch { .. }), "{err}");
}

#[test]
fn operator_certificate_cannot_sign() {
    let c = cluster();
    let op = c
        .ca_dir
        .issue_operator(&"alice".parse().unwrap(), "admin", Validity::days(1), &c.path("op"))
        .unwrap();
    assert!(matches!(Signer::load(&op.cert, &op.key), Err(AuditError::Invalid { .. })));
}
