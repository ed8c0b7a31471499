//! The CA directory: init, issue, revoke, and errors that name their file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{host, Cluster};
use ferry_identity::{current_crl_number, CaDir, Identity, IdentityError, RevokeTarget, Validity};
use ferry_types::SpiffeId;
use x509_parser::extensions::{GeneralName, ParsedExtension};

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_lays_out_the_directory() {
    let c = Cluster::new("ferry.test");
    let dir = c.ca.dir();
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(dir), 0o700);
    assert!(dir.join("ca.pem").exists());
    assert_eq!(current_crl_number(&c.ca.crl_path()).unwrap(), 1);
    assert!(c.ca.issued().unwrap().is_empty());
    assert_eq!(c.ca.trust_domain().unwrap(), c.domain);
    // open() finds the same CA.
    assert_eq!(CaDir::open(dir).unwrap().trust_domain().unwrap(), c.domain);
}

#[test]
fn init_refuses_to_overwrite_a_ca() {
    let c = Cluster::new("ferry.test");
    let before = std::fs::read(c.ca.cert_path()).unwrap();
    let key_before = std::fs::read(c.ca.dir().join("ca.key")).unwrap();
    let err = CaDir::init(c.ca.dir(), &c.domain, 30).unwrap_err();
    assert!(matches!(err, IdentityError::CaExists { .. }), "{err:?}");
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(c.ca.cert_path()).unwrap(), before);
    assert_eq!(std::fs::read(c.ca.dir().join("ca.key")).unwrap(), key_before);
}

#[test]
fn open_of_a_missing_ca_names_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let err = CaDir::open(&tmp.path().join("nope")).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn host_certificate_has_both_sans_and_both_ekus() {
    let c = Cluster::new("ferry.test");
    let issued = c.issue_host("host-a", Validity::days(3));
    assert_eq!(issued.spiffe, SpiffeId::Host { domain: c.domain.clone(), name: host("host-a") });
    assert_eq!(mode(&issued.key), 0o600);
    let pem = std::fs::read(&issued.cert).unwrap();
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = p.parse_x509().unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    assert!(san
        .general_names
        .iter()
        .any(|g| matches!(g, GeneralName::URI(u) if *u == "spiffe://ferry.test/host/host-a")));
    assert!(san
        .general_names
        .iter()
        .any(|g| matches!(g, GeneralName::DNSName(d) if *d == "host-a")));
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!cert.is_ca());
    assert_eq!(ferry_identity::serial_hex(cert.raw_serial()), issued.serial);
    // ECDSA P-256 keys.
    assert_eq!(
        cert.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );
    // Recorded in the registry.
    let reg = c.ca.issued().unwrap();
    let rec = &reg[&issued.serial];
    assert_eq!(rec.spiffe, "spiffe://ferry.test/host/host-a");
    assert!(rec.revoked.is_none());
    // The identity loads and knows itself.
    let id = c.load(&issued);
    assert_eq!(id.spiffe(), &issued.spiffe);
    assert_eq!(id.serial(), issued.serial);
}

#[test]
fn operator_certificate_carries_its_role_and_client_auth_only() {
    let c = Cluster::new("ferry.test");
    let issued = c.issue_operator("alice", "migrator");
    let pem = std::fs::read(&issued.cert).unwrap();
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = p.parse_x509().unwrap();
    let ou: Vec<_> =
        cert.subject().iter_organizational_unit().map(|o| o.as_str().unwrap()).collect();
    assert_eq!(ou, ["migrator"]);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    let has_dns = cert.extensions().iter().any(|e| match e.parsed_extension() {
        ParsedExtension::SubjectAlternativeName(s) => {
            s.general_names.iter().any(|g| matches!(g, GeneralName::DNSName(_)))
        }
        _ => false,
    });
    assert!(!has_dns, "operator certificates carry no DNS name");

    for bad in ["", "Admin", "a b", "ops,cn=root", "x_y"] {
        let err =
            c.ca.issue_operator(&"bob".parse().unwrap(), bad, Validity::days(1), &c.out())
                .unwrap_err();
        assert!(matches!(err, IdentityError::InvalidRole { .. }), "{bad:?}: {err:?}");
    }
}

#[test]
fn revoke_lists_the_serial_and_bumps_the_crl_number() {
    let c = Cluster::new("ferry.test");
    let a = c.issue_host("host-a", Validity::days(1));
    let b = c.issue_host("host-b", Validity::days(1));
    c.ca.revoke(RevokeTarget::CertFile(a.cert.clone())).unwrap();
    assert_eq!(current_crl_number(&c.ca.crl_path()).unwrap(), 2);
    let crl_listed = |serial: &str| {
        let pem = std::fs::read(c.ca.crl_path()).unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&p.contents).unwrap();
        let listed = crl
            .iter_revoked_certificates()
            .any(|r| ferry_identity::serial_hex(r.raw_serial()) == serial);
        listed
    };
    assert!(crl_listed(&a.serial));
    assert!(!crl_listed(&b.serial));

    // By serial, in a person's spelling.
    let colons: String = b
        .serial
        .as_bytes()
        .chunks(2)
        .map(|p| std::str::from_utf8(p).unwrap().to_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    c.ca.revoke(RevokeTarget::Serial(colons)).unwrap();
    assert_eq!(current_crl_number(&c.ca.crl_path()).unwrap(), 3);
    assert!(crl_listed(&a.serial) && crl_listed(&b.serial));
    let reg = c.ca.issued().unwrap();
    assert!(reg[&a.serial].revoked.is_some() && reg[&b.serial].revoked.is_some());

    // Unknown serials are an error, not a silent no-op.
    let err = c.ca.revoke(RevokeTarget::Serial("0badc0de".into())).unwrap_err();
    assert!(matches!(err, IdentityError::UnknownSerial { .. }), "{err:?}");
    assert!(err.to_string().contains("0badc0de"), "{err}");
    assert_eq!(current_crl_number(&c.ca.crl_path()).unwrap(), 3);
}

#[test]
fn bad_pem_paths_are_named_in_the_error() {
    let c = Cluster::new("ferry.test");
    let issued = c.issue_host("host-a", Validity::days(1));
    let missing = c.tmp.path().join("missing-cert.pem");
    let err = Identity::load(&missing, &issued.key, &c.ca.cert_path(), None).unwrap_err();
    assert!(matches!(err, IdentityError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("missing-cert.pem"), "{err}");

    let junk = c.tmp.path().join("junk.pem");
    std::fs::write(&junk, b"hello, not PEM\n").unwrap();
    let err = Identity::load(&issued.cert, &junk, &c.ca.cert_path(), None).unwrap_err();
    assert!(err.to_string().contains("junk.pem"), "{err}");
    let err = Identity::load(&issued.cert, &issued.key, &junk, None).unwrap_err();
    assert!(err.to_string().contains("junk.pem"), "{err}");
    let err =
        Identity::load(&issued.cert, &issued.key, &c.ca.cert_path(), Some(&junk)).unwrap_err();
    assert!(err.to_string().contains("junk.pem"), "{err}");
}

#[test]
fn a_key_that_is_not_the_certificates_is_refused_at_load() {
    let c = Cluster::new("ferry.test");
    let a = c.issue_host("host-a", Validity::days(1));
    let b = c.issue_host("host-b", Validity::days(1));
    let err = Identity::load(&a.cert, &b.key, &c.ca.cert_path(), None).unwrap_err();
    assert!(matches!(err, IdentityError::KeyMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("host-a.pem") && msg.contains("host-b.key"), "{msg}");
}

#[test]
fn a_certificate_of_another_trust_domain_does_not_load_with_our_ca() {
    let ours = Cluster::new("ferry.test");
    let theirs = Cluster::new("other.test");
    let issued = theirs.issue_host("host-a", Validity::days(1));
    let err = Identity::load(&issued.cert, &issued.key, &ours.ca.cert_path(), None).unwrap_err();
    assert!(matches!(err, IdentityError::DomainMismatch { .. }), "{err:?}");
}

#[test]
fn unusable_names_and_empty_validity_are_refused() {
    let c = Cluster::new("ferry.test");
    // A valid HostName that rustls would read as an IPv4-like name.
    let err = c.ca.issue_host(&host("1234"), Validity::days(1), &c.out()).unwrap_err();
    assert!(matches!(err, IdentityError::UnusableHostName { .. }), "{err:?}");
    let now = time::OffsetDateTime::now_utc();
    let empty = Validity { not_before: now, not_after: now };
    let err = c.ca.issue_host(&host("host-a"), empty, &c.out()).unwrap_err();
    assert!(matches!(err, IdentityError::EmptyValidity { .. }), "{err:?}");
}

/// An identity can load with a certificate of another CA or an expired one
/// (peers refuse it); `chain_problem` says which, so an agent can tell its
/// operator at start-up instead of at the first handshake.
#[test]
fn chain_problem_tells_a_foreign_or_expired_certificate() {
    let c = Cluster::new("ferry.test");
    assert_eq!(c.host_identity("host-a").chain_problem(), None);

    let other = Cluster::new("ferry.test");
    let foreign = other.issue_host("host-a", Validity::days(3));
    let id = Identity::load(&foreign.cert, &foreign.key, &c.ca.cert_path(), None).unwrap();
    match id.chain_problem() {
        Some(ferry_identity::ChainProblem::NotIssuedByCa(why)) => {
            assert!(why.contains("UnknownIssuer"), "{why}")
        }
        other => panic!("a certificate of another CA passed: {other:?}"),
    }

    let old = c.issue_host("host-b", common::expired());
    match c.load(&old).chain_problem() {
        Some(ferry_identity::ChainProblem::OutsideValidity(why)) => {
            assert!(why.contains("Expired"), "{why}")
        }
        other => panic!("an expired certificate passed: {other:?}"),
    }
}
