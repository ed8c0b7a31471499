use std::path::Path;

use super::*;

fn host(s: &str) -> HostName {
    s.parse().expect("host name")
}

fn spiffe(name: &str) -> SpiffeId {
    SpiffeId::Host { domain: "ferry.test".parse().expect("domain"), name: host(name) }
}

#[test]
fn a_certificate_for_another_host_fails_and_says_how_to_get_the_right_one() {
    let cert = Path::new("/etc/ferry/host1.pem");
    let c = certificate(&host("host1"), cert, &Ok(spiffe("host1")));
    assert_eq!(c.verdict, Verdict::Ok);
    let c = certificate(&host("host1"), cert, &Ok(spiffe("host2")));
    assert_eq!(c.verdict, Verdict::Fail);
    assert!(c.detail.contains("host2") && c.detail.contains("[host] name is host1"), "{c:?}");
    assert!(c.fix.as_deref().is_some_and(|f| f.contains("ferry ca issue host host1")), "{c:?}");
    let c = certificate(&host("host1"), cert, &Err("no such file".into()));
    assert_eq!(c.verdict, Verdict::Fail);
    assert!(c.detail.contains("/etc/ferry/host1.pem: no such file"), "{c:?}");
}

#[test]
fn a_certificate_of_another_ca_fails_an_expired_one_warns() {
    let (cert, ca_pem) = (Path::new("h.pem"), Path::new("ca.pem"));
    assert_eq!(ca(cert, ca_pem, None).verdict, Verdict::Ok);
    let foreign = ChainProblem::NotIssuedByCa("UnknownIssuer".into());
    let c = ca(cert, ca_pem, Some(&foreign));
    assert_eq!(c.verdict, Verdict::Fail);
    assert!(c.detail.contains("not issued by the CA in ca.pem"), "{c:?}");
    let expired = ChainProblem::OutsideValidity("CertExpired".into());
    assert_eq!(ca(cert, ca_pem, Some(&expired)).verdict, Verdict::Warn);
}

#[test]
fn an_unreachable_tpm_fails_a_disabled_one_warns() {
    let c = tpm(&TpmFacts::Unreachable("cannot open the TPM at device:/dev/tpmrm0".into()));
    assert_eq!(c.verdict, Verdict::Fail);
    assert!(c.detail.contains("device:/dev/tpmrm0"), "{c:?}");
    let c = tpm(&TpmFacts::AkUnusable { ak: "/etc/ferry/ak.json".into(), why: "gone".into() });
    assert_eq!(c.verdict, Verdict::Fail);
    assert!(c.fix.as_deref().is_some_and(|f| f.contains("ferry host init")), "{c:?}");
    let c = tpm(&TpmFacts::Disabled);
    assert_eq!(c.verdict, Verdict::Warn);
    assert!(c.detail.starts_with("INSECURE"), "{c:?}");
    assert_eq!(tpm(&TpmFacts::Ready { tcti: "x".into() }).verdict, Verdict::Ok);
}

#[test]
fn gaps_in_the_attestation_files_are_named() {
    let me = host("host1");
    let good = AttestationFiles {
        registry: Ok(Some(vec![1])),
        own_ak: Some(vec![1]),
        peers_not_enrolled: vec![],
        has_reference_values: Ok(true),
    };
    assert_eq!(attestation_files(&me, &good).verdict, Verdict::Ok);
    let stale = AttestationFiles { own_ak: Some(vec![2]), ..good.clone() };
    let c = attestation_files(&me, &stale);
    assert_eq!(c.verdict, Verdict::Warn);
    assert!(c.detail.contains("not this host's AK"), "{c:?}");
    let gaps = AttestationFiles {
        registry: Ok(None),
        peers_not_enrolled: vec![host("host2")],
        has_reference_values: Ok(false),
        ..good.clone()
    };
    let c = attestation_files(&me, &gaps);
    assert_eq!(c.verdict, Verdict::Warn);
    for gap in ["no entry for host1", "no class for host1", "peer(s) host2"] {
        assert!(c.detail.contains(gap), "{gap}: {c:?}");
    }
    let broken = AttestationFiles { registry: Err("aks/x.json: bad".into()), ..good };
    assert_eq!(attestation_files(&me, &broken).verdict, Verdict::Fail);
}

#[test]
fn a_missing_images_directory_fails_an_empty_one_warns() {
    let dir = Path::new("/var/lib/ferry/images");
    let c = images(dir, &DirFacts::Missing);
    assert_eq!(c.verdict, Verdict::Fail);
    assert!(c.fix.as_deref().is_some_and(|f| f.contains("mkdir -p /var/lib/ferry/images")));
    assert_eq!(images(dir, &DirFacts::Entries(0)).verdict, Verdict::Warn);
    assert_eq!(images(dir, &DirFacts::Entries(2)).verdict, Verdict::Ok);
    assert_eq!(read_dir(Path::new("/nonexistent/ferry")), DirFacts::Missing);
}

#[test]
fn a_policy_without_this_host_or_its_peers_warns_with_an_example_entity() {
    let entities = Path::new("entities.json");
    let peers = [host("host2")];
    let known = Ok(vec!["host-a".to_owned(), "host2".to_owned()]);
    let c = policy_entities(&host("host1"), &peers, entities, &known);
    assert_eq!(c.verdict, Verdict::Warn);
    assert!(c.detail.contains("no Host entity for host1:"), "{c:?}");
    assert!(c.fix.as_deref().is_some_and(|f| f.contains("\"id\": \"host1\"")), "{c:?}");
    let known = Ok(vec!["host1".to_owned(), "host2".to_owned()]);
    assert_eq!(policy_entities(&host("host1"), &peers, entities, &known).verdict, Verdict::Ok);
    let broken = Err("entities.json:1:2: bad".to_owned());
    assert_eq!(policy_entities(&host("host1"), &peers, entities, &broken).verdict, Verdict::Fail);
}

#[test]
fn enforce_fails_with_every_failure_and_its_fix() {
    let checks = vec![
        tpm(&TpmFacts::Unreachable("no TPM at device:/dev/tpmrm0".into())),
        images(Path::new("/img"), &DirFacts::Missing),
        images(Path::new("/img"), &DirFacts::Entries(0)),
        tpm(&TpmFacts::Ready { tcti: "t".into() }),
    ];
    let e = enforce(&checks).expect_err("failures").to_string();
    assert!(e.contains("tpm: no TPM at device:/dev/tpmrm0"), "{e}");
    assert!(e.contains("images: /img does not exist") && e.contains("fix: create /img"), "{e}");
    assert_eq!(e.matches("\n    fix:").count(), 2, "only the two failures: {e}");
    assert!(enforce(&checks[2..]).is_ok());
}
