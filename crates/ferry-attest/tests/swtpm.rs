//! Attestation against real swtpm instances: real EK certificates, real
//! credential activation, real quotes. Each test manufactures its own TPMs
//! in a temporary directory and stops them on drop.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry_attest::*;
use ferry_types::{HostName, MigrationId};
use sha2::{Digest, Sha256};

struct Host {
    name: HostName,
    tpm: Swtpm,
    blob: AkBlob,
    enrolled: EnrolledAk,
}

struct Lab {
    dir: tempfile::TempDir,
    ca: PathBuf,
    registry: PathBuf,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Swtpm::manufacturer_ca_init(&dir.path().join("ca")).expect("CA");
        let registry = dir.path().join("registry");
        Lab { dir, ca, registry }
    }

    /// Provision and start a TPM for `name` without enrolling it.
    fn tpm(&self, name: &str) -> Swtpm {
        let state = self.dir.path().join(name);
        Swtpm::provision(&state, &self.dir.path().join("ca")).expect("provision");
        Swtpm::start_on_free_port(&state).expect("start swtpm")
    }

    fn host(&self, name: &str) -> Host {
        let t = Instant::now();
        let tpm = self.tpm(name);
        let provisioned = t.elapsed();
        let host: HostName = name.parse().expect("host name");
        let t = Instant::now();
        let (blob, enrolled) =
            enroll(&tpm.tcti(), &host, std::slice::from_ref(&self.ca)).expect("enroll");
        println!("{name}: provision+start {provisioned:?}, enroll {:?}", t.elapsed());
        let blob_path = self.dir.path().join(name).join("ak.json");
        blob.save(&blob_path).expect("save blob");
        assert_eq!(AkBlob::load(&blob_path).expect("load blob"), blob);
        AkRegistry::insert(&self.registry, &enrolled).expect("registry insert");
        Host { name: host, tpm, blob, enrolled }
    }

    /// All hosts in class "lab" with the first host's current PCR values.
    fn refs(&self, hosts: &[&Host]) -> ReferenceValues {
        let values = read_pcrs(&hosts[0].tpm.tcti(), &DEFAULT_PCR_SELECTION).expect("read pcrs");
        let mut refs = ReferenceValues::new();
        refs.set_class("lab", values).expect("class");
        for h in hosts {
            refs.assign(h.name.clone(), "lab");
        }
        let path = self.dir.path().join("reference.toml");
        refs.save(&path).expect("save refs");
        ReferenceValues::load(&path).expect("load refs")
    }
}

fn qd(role: QuoteRole) -> ([u8; 32], MigrationId, [u8; 32]) {
    let exporter = [0x5a; 32];
    let id = MigrationId::new();
    (exporter, id, qualifying_data(&exporter, &id, role))
}

fn quote(host: &Host, qd: &[u8; 32]) -> Evidence {
    let mut a = Attester::open(&host.tpm.tcti(), &host.blob).expect("open attester");
    a.quote(&DEFAULT_PCR_SELECTION, qd).expect("quote")
}

#[test]
fn quote_round_trip_verifies_and_is_fast() {
    let lab = Lab::new();
    let alpha = lab.host("alpha");
    let refs = lab.refs(&[&alpha]);
    let registry = AkRegistry::load(&lab.registry).expect("registry");
    let ak = registry.require(&alpha.name).expect("enrolled");
    assert_eq!(ak, &alpha.enrolled);
    let (_, _, q) = qd(QuoteRole::Destination);

    let start = Instant::now();
    let mut attester = Attester::open(&alpha.tpm.tcti(), &alpha.blob).expect("open");
    let opened = start.elapsed();
    let evidence = attester.quote(&DEFAULT_PCR_SELECTION, &q).expect("quote");
    let wire = evidence.to_json().expect("encode");
    let received = Evidence::from_json(&wire).expect("decode");
    let verified = verify(&received, ak, &alpha.name, &q, &refs).expect("verify");
    let total = start.elapsed();
    assert_eq!(verified.host, alpha.name);
    assert_eq!(verified.pcrs, DEFAULT_PCR_SELECTION.to_vec());

    let n = 20;
    let t = Instant::now();
    for _ in 0..n {
        attester.quote(&DEFAULT_PCR_SELECTION, &q).expect("quote");
    }
    let per_quote = t.elapsed() / n;
    let t = Instant::now();
    for _ in 0..n {
        verify(&received, ak, &alpha.name, &q, &refs).expect("verify");
    }
    let per_verify = t.elapsed() / n;
    println!(
        "swtpm attestation: open {opened:?}, open→verified {total:?}, quote(PCR 0-7) {per_quote:?}, verify {per_verify:?}, evidence {} bytes JSON",
        wire.len()
    );
}

#[test]
fn extended_pcr_is_refused_naming_host_pcr_and_values() {
    let lab = Lab::new();
    let alpha = lab.host("alpha");
    let refs = lab.refs(&[&alpha]);
    let before = read_pcrs(&alpha.tpm.tcti(), &[7]).expect("read")[&7];
    extend_pcr(&alpha.tpm.tcti(), 7, b"unexpected bootloader").expect("extend");
    let measurement = Sha256::digest(b"unexpected bootloader");
    let mut h = Sha256::new();
    h.update(before);
    h.update(measurement);
    let after: [u8; 32] = h.finalize().into();

    let (_, _, q) = qd(QuoteRole::Source);
    let e = quote(&alpha, &q);
    let err = verify(&e, &alpha.enrolled, &alpha.name, &q, &refs).expect_err("must refuse");
    match &err {
        AttestError::PcrMismatch { host, pcr, expected, actual } => {
            assert_eq!(host, &alpha.name);
            assert_eq!(*pcr, 7);
            assert_eq!(expected, &hex::encode(before));
            assert_eq!(actual, &hex::encode(after));
        }
        other => panic!("expected PcrMismatch, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("alpha") && msg.contains("PCR 7"), "{msg}");
}

#[test]
fn replayed_relayed_or_reflected_quote_is_a_binding_mismatch() {
    let lab = Lab::new();
    let alpha = lab.host("alpha");
    let refs = lab.refs(&[&alpha]);
    let (exporter, id, q) = qd(QuoteRole::Destination);
    let e = quote(&alpha, &q);
    verify(&e, &alpha.enrolled, &alpha.name, &q, &refs).expect("genuine");

    // Relayed to another connection: other exporter. Replayed into another
    // migration: other id. Reflected: other role.
    let relayed = qualifying_data(&[0xa5; 32], &id, QuoteRole::Destination);
    let replayed = qualifying_data(&exporter, &MigrationId::new(), QuoteRole::Destination);
    let reflected = qualifying_data(&exporter, &id, QuoteRole::Source);
    for other in [relayed, replayed, reflected] {
        let err = verify(&e, &alpha.enrolled, &alpha.name, &other, &refs).expect_err("must refuse");
        assert!(
            matches!(err, AttestError::BindingMismatch { ref host } if host == &alpha.name),
            "{err}"
        );
    }
}

#[test]
fn evidence_from_another_hosts_ak_or_an_unenrolled_ak_is_refused() {
    let lab = Lab::new();
    let alpha = lab.host("alpha");
    let beta = lab.host("beta");
    let refs = lab.refs(&[&alpha, &beta]);
    let registry = AkRegistry::load(&lab.registry).expect("registry");
    assert_eq!(registry.len(), 2);
    let (_, _, q) = qd(QuoteRole::Destination);
    let e = quote(&alpha, &q);

    // alpha's quote presented by a peer whose certificate says "beta".
    let err = verify(&e, registry.require(&beta.name).expect("beta"), &beta.name, &q, &refs)
        .expect_err("refuse");
    assert!(matches!(err, AttestError::BadSignature { ref host } if host == &beta.name), "{err}");
    // alpha's AK record handed over for beta.
    let err = verify(&e, &alpha.enrolled, &beta.name, &q, &refs).expect_err("refuse");
    assert!(matches!(err, AttestError::AkHostMismatch { .. }), "{err}");
    // A host that never enrolled.
    let gamma: HostName = "gamma".parse().expect("name");
    assert!(matches!(registry.require(&gamma), Err(AttestError::NotEnrolled { .. })));

    // An AK created in alpha's TPM but never activated: its quotes do not
    // verify under alpha's enrolled AK.
    let (rogue, _) = request_enrollment(&alpha.tpm.tcti(), &alpha.name).expect("create AK");
    let mut a = Attester::open(&alpha.tpm.tcti(), &rogue).expect("open");
    let e = a.quote(&DEFAULT_PCR_SELECTION, &q).expect("quote");
    let err = verify(&e, &alpha.enrolled, &alpha.name, &q, &refs).expect_err("refuse");
    assert!(matches!(err, AttestError::BadSignature { .. }), "{err}");
}

#[test]
fn ak_from_another_tpm_than_the_ek_is_not_enrolled() {
    let lab = Lab::new();
    let a = lab.tpm("tpm-a");
    let b = lab.tpm("tpm-b");
    let host: HostName = "alpha".parse().expect("name");
    let (_, req_a) = request_enrollment(&a.tcti(), &host).expect("request A");
    let (blob_b, req_b) = request_enrollment(&b.tcti(), &host).expect("request B");

    // The host claims TPM A's EK but its AK lives in TPM B.
    let forged = EnrollmentRequest {
        host: host.clone(),
        ek_cert_der: req_a.ek_cert_der.clone(),
        ak_public: req_b.ak_public.clone(),
    };
    let (challenge, pending) =
        make_credential(&forged, std::slice::from_ref(&lab.ca)).expect("challenge");
    let err = activate_credential(&b.tcti(), &host, &blob_b, &challenge)
        .expect_err("TPM B cannot open it");
    assert!(matches!(err, AttestError::ActivationFailed { .. }), "{err}");
    // TPM A has the EK but cannot load B's AK.
    assert!(activate_credential(&a.tcti(), &host, &blob_b, &challenge).is_err());
    // Guessing the answer fails too.
    let err = check_activation(pending, &ActivationResponse { secret: vec![0; 32] })
        .expect_err("wrong secret");
    assert!(matches!(err, AttestError::ActivationFailed { .. }), "{err}");
}

#[test]
fn ek_certificate_from_an_untrusted_manufacturer_is_refused() {
    let lab = Lab::new();
    let tpm = lab.tpm("alpha");
    let other_ca = Swtpm::manufacturer_ca_init(&lab.dir.path().join("other-ca")).expect("other CA");
    let host: HostName = "alpha".parse().expect("name");
    let err = enroll(&tpm.tcti(), &host, &[other_ca]).expect_err("untrusted EK");
    assert!(matches!(err, AttestError::UntrustedEk { .. }), "{err}");
    assert!(err.to_string().contains("EK certificate not trusted"), "{err}");
    let err = enroll(&tpm.tcti(), &host, &[]).expect_err("no CA");
    assert!(matches!(err, AttestError::UntrustedEk { .. }), "{err}");
}

#[test]
fn tampered_or_oversized_evidence_is_refused() {
    let lab = Lab::new();
    let alpha = lab.host("alpha");
    let refs = lab.refs(&[&alpha]);
    let (_, _, q) = qd(QuoteRole::Source);
    let e = quote(&alpha, &q);
    verify(&e, &alpha.enrolled, &alpha.name, &q, &refs).expect("genuine");

    for i in [0, 6, e.attest.len() / 2, e.attest.len() - 1] {
        let mut t = e.clone();
        t.attest[i] ^= 1;
        let err = verify(&t, &alpha.enrolled, &alpha.name, &q, &refs).expect_err("tampered attest");
        assert!(matches!(err, AttestError::BadSignature { .. }), "byte {i}: {err}");
    }
    let mut t = e.clone();
    let last = t.signature.len() - 1;
    t.signature[last] ^= 1;
    assert!(matches!(
        verify(&t, &alpha.enrolled, &alpha.name, &q, &refs),
        Err(AttestError::BadSignature { .. })
    ));
    // A PCR value changed on the wire: the signed digest no longer matches.
    let mut t = e.clone();
    if let Some(v) = t.pcrs.get_mut(&0) {
        v[0] ^= 1;
    }
    assert!(matches!(
        verify(&t, &alpha.enrolled, &alpha.name, &q, &refs),
        Err(AttestError::PcrDigestMismatch { .. })
    ));
    // A PCR dropped from the report: selection mismatch.
    let mut t = e.clone();
    t.pcrs.remove(&7);
    assert!(matches!(
        verify(&t, &alpha.enrolled, &alpha.name, &q, &refs),
        Err(AttestError::SelectionMismatch { .. })
    ));
    // A quote over fewer PCRs than the policy names.
    let mut a = Attester::open(&alpha.tpm.tcti(), &alpha.blob).expect("open");
    let short = a.quote(&[0, 1], &q).expect("quote");
    assert!(matches!(
        verify(&short, &alpha.enrolled, &alpha.name, &q, &refs),
        Err(AttestError::SelectionMismatch { .. })
    ));
    // Oversized fields constructed in memory, and oversized JSON on the wire.
    let mut t = e.clone();
    t.attest = vec![0; MAX_ATTEST + 1];
    assert!(matches!(
        verify(&t, &alpha.enrolled, &alpha.name, &q, &refs),
        Err(AttestError::TooLarge { .. })
    ));
    let mut json = e.to_json().expect("json");
    json.resize(MAX_EVIDENCE_JSON + 1, b' ');
    assert!(matches!(Evidence::from_json(&json), Err(AttestError::TooLarge { .. })));
    assert!(matches!(Evidence::from_json(b"{\"attest\":1}"), Err(AttestError::Malformed { .. })));
}

#[test]
fn registry_refuses_a_record_filed_under_another_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ak = EnrolledAk {
        host: "alpha".parse().expect("name"),
        ak_public: vec![4; 65],
        ak_name: vec![0, 0x0b],
        ek_cert_sha256: "00".into(),
    };
    AkRegistry::insert(dir.path(), &ak).expect("insert");
    std::fs::rename(dir.path().join("alpha.json"), dir.path().join("beta.json")).expect("rename");
    assert!(matches!(AkRegistry::load(dir.path()), Err(AttestError::Config { .. })));
    assert!(AkRegistry::load(Path::new("/nonexistent/registry")).expect("empty").is_empty());
}
