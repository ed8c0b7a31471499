//! Every refusal of an offer, of admission and of the resume gate.

use std::time::Instant;

use ferry_attest::QuoteRole;
use ferry_audit::LogHead;
use ferry_types::{Digest32, HostName, MigrationId};

use super::*;
use crate::attestation::{Attestation, PeerAttested};
use crate::testing::tls;

fn host(s: &str) -> HostName {
    s.parse().unwrap()
}

/// host2's view of a connection from host1, attested (insecurely: these
/// tests are about the offer, not the platform) for migration `id`.
fn attested(dir: &std::path::Path, id: MigrationId) -> PeerAttested {
    let pair = tls::pair(dir, "host1", "host2");
    Attestation::new(None)
        .verify_peer(pair.client, None, id, QuoteRole::Source, Instant::now())
        .unwrap()
}

fn offer(peer: &PeerAttested) -> OfferBody {
    let id = *peer.migration();
    OfferBody {
        migration_id: id,
        source: host("host1"),
        destination: host("host2"),
        vm: "web".parse().unwrap(),
        channel_binding: offer_binding(peer.binding().as_bytes(), &id),
        log_head: LogHead { seq: 1, hash: "00".repeat(32) },
        spec: crate::testing::lab::spec("web"),
        labels: ferry_policy::VmLabels { tenant: "default".into(), ..Default::default() },
        not_after_unix_ms: id.created_unix_ms() + 60_000,
        streams: 1,
        postcopy: false,
    }
}

fn check(edit: impl FnOnce(&mut OfferBody), now_offset: i64) -> Result<CheckedOffer, Refusal> {
    let dir = tempfile::tempdir().unwrap();
    let peer = attested(dir.path(), MigrationId::new());
    let mut o = offer(&peer);
    edit(&mut o);
    let this = host("host2");
    let now = (crate::records::now_unix_ms() as i64 + now_offset) as u64;
    let ctx = OfferContext { this_host: &this, now_unix_ms: now, offer_validity_ms: 60_000 };
    check_offer(&ctx, &peer, o)
}

fn refused(edit: impl FnOnce(&mut OfferBody), now_offset: i64) -> Refusal {
    check(edit, now_offset).expect_err("accepted")
}

#[test]
fn a_well_formed_offer_passes_and_carries_its_plan() {
    let c = check(|o| o.streams = 3, 0).unwrap();
    assert_eq!(c.plan().streams().get(), 3);
}

#[test]
fn every_refusal_names_its_cause() {
    type Edit = Box<dyn FnOnce(&mut OfferBody)>;
    let cases: Vec<(&str, Edit, i64, &str)> = vec![
        ("misaddressed", Box::new(|o| o.destination = host("host3")), 0, "addressed to host3"),
        ("source_mismatch", Box::new(|o| o.source = host("host3")), 0, "claims source host3"),
        ("binding", Box::new(|o| o.migration_id = MigrationId::new()), 0, "attested for"),
        ("binding", Box::new(|o| o.channel_binding = Digest32([9; 32])), 0, "replayed or relayed"),
        ("window", Box::new(|_| {}), -120_000, "from the future"),
        ("window", Box::new(|_| {}), 120_000, "expired"),
        ("window", Box::new(|o| o.not_after_unix_ms = 0), 0, "expired"),
        ("spec", Box::new(|o| o.spec.memory_mib = 0), 0, "invalid VM spec"),
        ("spec", Box::new(|o| o.vm = "db".parse().unwrap()), 0, "carries the spec of web"),
        ("streams", Box::new(|o| o.streams = 0), 0, "0 streams"),
        ("streams", Box::new(|o| o.streams = 9), 0, "9 streams"),
        (
            "streams",
            Box::new(|o| {
                o.streams = 2;
                o.postcopy = true
            }),
            0,
            "post-copy",
        ),
        ("labels", Box::new(|o| o.labels.tenant = String::new()), 0, "VM labels"),
    ];
    for (code, edit, offset, words) in cases {
        let r = refused(edit, offset);
        assert_eq!(r.code, code, "{r:?}");
        assert!(r.reason.contains(words), "{code}: {}", r.reason);
    }
}

#[test]
fn admission_needs_the_decision_and_a_free_name() {
    let dir = tempfile::tempdir().unwrap();
    let peer = attested(dir.path(), MigrationId::new());
    let this = host("host2");
    let ctx = OfferContext {
        this_host: &this,
        now_unix_ms: crate::records::now_unix_ms(),
        offer_validity_ms: 60_000,
    };
    let checked = || check_offer(&ctx, &peer, offer(&peer)).unwrap();
    let denied: Result<(), _> = Err(Refusal::new("policy", "policy denies host2 receiving web"));
    assert_eq!(admit(checked(), denied, true, &this).unwrap_err().code, "policy");
    let admission = ferry_policy::Admission::new(Default::default());
    let ticket = || {
        admission
            .try_admit(&host("host1"), &"web".parse().unwrap(), 64, 1, 0, 0, Instant::now())
            .unwrap()
    };
    let taken = admit(checked(), Ok(ticket()), false, &this).unwrap_err();
    assert_eq!(taken.code, "name_conflict");
    assert!(admit(checked(), Ok(ticket()), true, &this).is_ok());
}

#[test]
fn the_vm_runs_only_when_qemu_bytes_and_digest_agree() {
    let sum = |bytes, d| StreamSum { bytes, digest: Digest32([d; 32]) };
    assert!(resume_verdict(sum(10, 1), sum(10, 1), Ok(())).is_ok());
    let e = resume_verdict(sum(10, 1), sum(10, 1), Err("failed".into())).unwrap_err();
    assert!(e.contains("did not complete"), "{e}");
    let e = resume_verdict(sum(10, 1), sum(11, 1), Ok(())).unwrap_err();
    assert!(e.contains("byte count mismatch"), "{e}");
    let e = resume_verdict(sum(10, 1), sum(10, 2), Ok(())).unwrap_err();
    assert!(e.contains("digest mismatch"), "{e}");
}
