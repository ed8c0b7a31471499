//! Real mutually authenticated TLS over loopback: who gets in, who does not,
//! and what the error says on each side.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{err_text, expired, handshake, host, Cluster};
use ferry_identity::{
    authenticate_host, channel_binding, client_config, peer_identity, server_config, IdentityError,
    PeerIdentity, RevokeTarget, TlsConfigs, Validity,
};
use rustls::ProtocolVersion;

#[tokio::test]
async fn hosts_of_one_ca_connect_over_tls13_and_know_each_other() {
    let c = Cluster::new("ferry.test");
    let a = c.host_identity("host-a");
    let b = c.host_identity("host-b");
    let out = handshake(server_config(&b).unwrap(), client_config(&a).unwrap(), "host-b").await;
    let srv = out.server.expect("server side failed");
    let cli = out.client.expect("client side failed");

    let cconn = cli.get_ref().1;
    let sconn = srv.get_ref().1;
    assert_eq!(cconn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(sconn.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    assert_eq!(cconn.alpn_protocol(), Some(&b"ferry/1"[..]));

    // Each side sees the other's SPIFFE identity.
    assert_eq!(peer_identity(cconn, &c.domain).unwrap(), PeerIdentity::Host(host("host-b")));
    assert_eq!(peer_identity(sconn, &c.domain).unwrap(), PeerIdentity::Host(host("host-a")));

    let ok = authenticate_host(cconn, &c.domain, &host("host-b")).unwrap();
    assert_eq!(ok.host(), &host("host-b"));
    assert_eq!(
        authenticate_host(sconn, &c.domain, &host("host-a")).unwrap().host(),
        &host("host-a")
    );

    // A genuine certificate of *another* host is refused, naming both.
    let err = authenticate_host(sconn, &c.domain, &host("host-z")).unwrap_err();
    assert!(matches!(err, IdentityError::WrongHost { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("host-a") && msg.contains("host-z"), "{msg}");

    // Our trust domain is part of the check.
    let other: ferry_types::TrustDomain = "other.test".parse().unwrap();
    let err = peer_identity(cconn, &other).unwrap_err();
    assert!(matches!(err, IdentityError::PeerDomain { .. }), "{err:?}");
}

#[tokio::test]
async fn channel_binding_is_equal_on_both_ends_and_per_context() {
    let c = Cluster::new("ferry.test");
    let a = c.host_identity("host-a");
    let b = c.host_identity("host-b");
    let out = handshake(server_config(&b).unwrap(), client_config(&a).unwrap(), "host-b").await;
    let (srv, cli) = (out.server.unwrap(), out.client.unwrap());
    let label = b"EXPORTER-ferry-attestation";
    let x = channel_binding(cli.get_ref().1, label, b"mig-1").unwrap();
    let y = channel_binding(srv.get_ref().1, label, b"mig-1").unwrap();
    assert_eq!(x, y);
    assert_ne!(x, [0u8; 32]);
    assert_ne!(x, channel_binding(cli.get_ref().1, label, b"mig-2").unwrap());

    // A second connection between the same hosts binds to different values.
    let out2 = handshake(server_config(&b).unwrap(), client_config(&a).unwrap(), "host-b").await;
    let z = channel_binding(out2.client.unwrap().get_ref().1, label, b"mig-1").unwrap();
    assert_ne!(x, z);
}

#[tokio::test]
async fn operator_identity_carries_the_role_and_is_not_a_host() {
    let c = Cluster::new("ferry.test");
    let agent = c.host_identity("host-a");
    let op = c.load(&c.issue_operator("alice", "migrator"));
    assert_eq!(op.role(), Some("migrator"));
    let out =
        handshake(server_config(&agent).unwrap(), client_config(&op).unwrap(), "host-a").await;
    let srv = out.server.expect("server side failed");
    out.client.expect("client side failed");
    let sconn = srv.get_ref().1;
    assert_eq!(
        peer_identity(sconn, &c.domain).unwrap(),
        PeerIdentity::Operator { name: "alice".parse().unwrap(), role: "migrator".into() }
    );
    let err = authenticate_host(sconn, &c.domain, &host("host-a")).unwrap_err();
    assert!(matches!(err, IdentityError::NotAHost { .. }), "{err:?}");
}

#[tokio::test]
async fn operator_certificate_cannot_serve_as_an_agent() {
    let c = Cluster::new("ferry.test");
    let a = c.host_identity("host-a");
    let op = c.load(&c.issue_operator("alice", "migrator"));
    // EKU clientAuth only: the client's verifier refuses it as a server.
    let out = handshake(server_config(&op).unwrap(), client_config(&a).unwrap(), "alice").await;
    let cli = err_text(&out.client);
    assert!(cli.contains("not valid for this use") || cli.contains("not for the host"), "{cli}");
    assert!(out.server.is_err());
}

#[tokio::test]
async fn client_from_another_ca_is_refused_by_the_server() {
    let ours = Cluster::new("ferry.test");
    let theirs = Cluster::new("ferry.test");
    let server = ours.host_identity("host-b");
    // Same names, same trust domain, but another CA: the client trusts our CA
    // (so it accepts the server) while its own certificate is foreign.
    let issued = theirs.issue_host("host-a", Validity::days(1));
    let intruder =
        ferry_identity::Identity::load(&issued.cert, &issued.key, &ours.ca.cert_path(), None)
            .unwrap();
    let out =
        handshake(server_config(&server).unwrap(), client_config(&intruder).unwrap(), "host-b")
            .await;
    let srv = err_text(&out.server);
    assert!(srv.contains("unknown CA"), "server: {srv}");
    let cli = err_text(&out.client);
    assert!(cli.contains("refused our certificate") && cli.contains("unknown CA"), "client: {cli}");
}

#[tokio::test]
async fn server_from_another_ca_is_refused_by_the_client() {
    let ours = Cluster::new("ferry.test");
    let theirs = Cluster::new("ferry.test");
    let client = ours.host_identity("host-a");
    let issued = theirs.issue_host("host-b", Validity::days(1));
    let impostor =
        ferry_identity::Identity::load(&issued.cert, &issued.key, &ours.ca.cert_path(), None)
            .unwrap();
    let out =
        handshake(server_config(&impostor).unwrap(), client_config(&client).unwrap(), "host-b")
            .await;
    let cli = err_text(&out.client);
    assert!(
        cli.contains("unknown CA") && cli.contains("not issued by this cluster's CA"),
        "client: {cli}"
    );
    let srv = err_text(&out.server);
    assert!(srv.contains("refused our certificate") && srv.contains("unknown CA"), "server: {srv}");
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let c = Cluster::new("ferry.test");
    let server = c.host_identity("host-b");
    let old = c.load(&c.issue_host("host-a", expired()));
    let out =
        handshake(server_config(&server).unwrap(), client_config(&old).unwrap(), "host-b").await;
    let srv = err_text(&out.server);
    assert!(srv.contains("expired") && srv.contains("not after"), "server: {srv}");
    let cli = err_text(&out.client);
    assert!(cli.contains("refused our certificate") && cli.contains("expired"), "client: {cli}");
}

#[tokio::test]
async fn expired_server_certificate_is_refused() {
    let c = Cluster::new("ferry.test");
    let client = c.host_identity("host-a");
    let old = c.load(&c.issue_host("host-b", expired()));
    let out =
        handshake(server_config(&old).unwrap(), client_config(&client).unwrap(), "host-b").await;
    let cli = err_text(&out.client);
    assert!(cli.contains("expired") && cli.contains("not after"), "client: {cli}");
    let srv = err_text(&out.server);
    assert!(srv.contains("refused our certificate") && srv.contains("expired"), "server: {srv}");
}

#[tokio::test]
async fn revoked_client_is_refused_at_the_next_connection_without_restart() {
    let c = Cluster::new("ferry.test");
    let server = TlsConfigs::new(c.host_identity("host-b")).unwrap();
    let issued = c.issue_host("host-a", Validity::days(1));
    let client = TlsConfigs::new(c.load(&issued)).unwrap();

    let first = handshake(server.server().unwrap(), client.client().unwrap(), "host-b").await;
    first.server.expect("before revocation the server accepts");
    first.client.expect("before revocation the client gets in");

    c.ca.revoke(RevokeTarget::CertFile(issued.cert.clone())).unwrap();

    // Same TlsConfigs object, new connection: the new CRL is in force.
    let second = handshake(server.server().unwrap(), client.client().unwrap(), "host-b").await;
    let srv = err_text(&second.server);
    assert!(srv.contains("revoked"), "server: {srv}");
    let cli = err_text(&second.client);
    assert!(cli.contains("refused our certificate") && cli.contains("revoked"), "client: {cli}");
}

#[tokio::test]
async fn revoked_server_is_refused_by_the_client_without_restart() {
    let c = Cluster::new("ferry.test");
    let issued = c.issue_host("host-b", Validity::days(1));
    let server = TlsConfigs::new(c.load(&issued)).unwrap();
    let client = TlsConfigs::new(c.host_identity("host-a")).unwrap();
    let first = handshake(server.server().unwrap(), client.client().unwrap(), "host-b").await;
    first.client.expect("before revocation the client connects");

    c.ca.revoke(RevokeTarget::Serial(issued.serial.to_uppercase())).unwrap();

    let second = handshake(server.server().unwrap(), client.client().unwrap(), "host-b").await;
    let cli = err_text(&second.client);
    assert!(cli.contains("revoked"), "client: {cli}");
    let srv = err_text(&second.server);
    assert!(srv.contains("refused our certificate") && srv.contains("revoked"), "server: {srv}");
}

#[tokio::test]
async fn unreadable_crl_fails_closed() {
    let c = Cluster::new("ferry.test");
    let server = TlsConfigs::new(c.host_identity("host-b")).unwrap();
    assert!(server.server().is_ok());
    std::fs::write(c.ca.crl_path(), b"not a crl").unwrap();
    let err = server.server().unwrap_err();
    assert!(err.to_string().contains("crl.pem"), "{err}");
}

fn ca_roots(c: &Cluster) -> rustls::RootCertStore {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(c.ca.cert_path()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let c = Cluster::new("ferry.test");
    let server = c.host_identity("host-b");
    let mut anon = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(ca_roots(&c))
        .with_no_client_auth();
    anon.alpn_protocols = vec![b"ferry/1".to_vec()];
    let out = handshake(server_config(&server).unwrap(), std::sync::Arc::new(anon), "host-b").await;
    let srv = err_text(&out.server);
    assert!(srv.contains("presented no certificate"), "server: {srv}");
    let cli = err_text(&out.client);
    assert!(cli.contains("requires a client certificate"), "client: {cli}");
}

#[tokio::test]
async fn tls12_only_client_cannot_connect() {
    use rustls_pki_types::pem::PemObject;
    let c = Cluster::new("ferry.test");
    let server = c.host_identity("host-b");
    // A TLS 1.2-only client that is otherwise a good cluster member (our CA,
    // a valid host certificate): only the version can be the reason.
    let issued = c.issue_host("host-a", Validity::days(1));
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&issued.cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&issued.key).unwrap();
    let mut tls12 = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(ca_roots(&c))
        .with_client_auth_cert(chain, key)
        .unwrap();
    tls12.alpn_protocols = vec![b"ferry/1".to_vec()];
    let out =
        handshake(server_config(&server).unwrap(), std::sync::Arc::new(tls12), "host-b").await;
    let srv = err_text(&out.server);
    assert!(srv.contains("TLS 1.3"), "server: {srv}");
    let cli = err_text(&out.client);
    assert!(cli.contains("TLS version") || cli.contains("TLS 1.3"), "client: {cli}");
}

#[tokio::test]
async fn server_with_a_valid_certificate_for_another_host_is_refused() {
    let c = Cluster::new("ferry.test");
    let client = c.host_identity("host-a");
    let wrong = c.host_identity("host-c");
    // The operator asked for host-b; a hijacked route leads to host-c.
    let out =
        handshake(server_config(&wrong).unwrap(), client_config(&client).unwrap(), "host-b").await;
    let cli = err_text(&out.client);
    assert!(cli.contains("host-c") && cli.contains("host-b"), "client: {cli}");
    assert!(out.server.is_err());
}
