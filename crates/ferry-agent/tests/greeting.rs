//! The protocol greeting as a connecting agent sees it (docs/protocol.md,
//! "Greeting and protocol versions"): a server that answers with another
//! protocol version is refused with an error naming both versions. The
//! listening side is tested against a real agent in tests/peer_protocol.rs.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_agent::net::{self as client, ConnectError};
use ferry_agent::protocol::{Hello, PROTOCOL_VERSION};
use ferry_channel::{FrameReader, FrameWriter};
use ferry_identity::{CaDir, Identity, Validity};
use ferry_types::{HostName, TrustDomain};
use tokio::net::TcpListener;

const TIMEOUT: Duration = Duration::from_secs(10);

struct Cluster {
    _tmp: tempfile::TempDir,
    domain: TrustDomain,
    server: Identity,
    client: Identity,
}

/// A throwaway CA with host certificates for host2 (server) and host1 (client).
fn cluster() -> Cluster {
    let tmp = tempfile::tempdir().expect("tempdir");
    let domain: TrustDomain = "ferry.test".parse().expect("domain");
    let ca = CaDir::init(&tmp.path().join("ca"), &domain, 30).expect("CA");
    let out = tmp.path().join("certs");
    let identity = |name: &str| {
        let host: HostName = name.parse().expect("host name");
        let issued = ca.issue_host(&host, Validity::days(1), &out).expect("issue");
        Identity::load(&issued.cert, &issued.key, &ca.cert_path(), Some(&ca.crl_path()))
            .expect("identity")
    };
    Cluster { server: identity("host2"), client: identity("host1"), domain, _tmp: tmp }
}

/// A TLS server with host2's real certificate that answers the greeting
/// with `version`; it returns the version the client sent.
async fn server_speaking(c: &Cluster, version: u32) -> (SocketAddr, tokio::task::JoinHandle<u32>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = ferry_identity::server_config(&c.server).expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let tls = acceptor.accept(tcp).await.expect("TLS handshake");
        let (r, w) = tokio::io::split(tls);
        let (mut reader, mut writer) = (FrameReader::new(r, TIMEOUT), FrameWriter::new(w, TIMEOUT));
        let theirs: Hello = reader.read_control().await.expect("the client's hello");
        writer.write_control(&Hello { protocol: version }).await.expect("our hello");
        // Held open until the client has judged the greeting.
        let _ = reader.read_frame().await;
        theirs.protocol
    });
    (addr, task)
}

async fn greet(c: &Cluster, addr: SocketAddr) -> Result<(), ConnectError> {
    let host2: HostName = "host2".parse().expect("host name");
    let config = ferry_identity::client_config(&c.client).expect("client config");
    let (stream, _proof) = client::connect(addr, None, None, &host2, config, &c.domain, TIMEOUT)
        .await
        .expect("connect");
    client::greet(stream, &host2, addr, TIMEOUT).await.map(drop)
}

#[tokio::test]
async fn a_server_on_another_protocol_version_is_refused() {
    let c = cluster();

    // Control: the same server speaking our version is accepted, so the
    // refusal below is the version's doing.
    let (addr, server) = server_speaking(&c, PROTOCOL_VERSION).await;
    greet(&c, addr).await.expect("a server on our version was refused");
    assert_eq!(server.await.expect("server"), PROTOCOL_VERSION);

    let newer = PROTOCOL_VERSION + 1;
    let (addr, server) = server_speaking(&c, newer).await;
    let err = greet(&c, addr).await.expect_err("a server on another version was accepted");
    match &err {
        ConnectError::Version { host, theirs, ours } => {
            assert_eq!((host.as_str(), *theirs, *ours), ("host2", newer, PROTOCOL_VERSION));
        }
        other => panic!("refused for the wrong reason: {other}"),
    }
    let shown = err.to_string();
    assert!(
        shown.contains(&format!("version {newer}"))
            && shown.contains(&PROTOCOL_VERSION.to_string()),
        "the error does not name both versions: {shown}"
    );
    assert_eq!(server.await.expect("server"), PROTOCOL_VERSION, "we sent another version");
}
