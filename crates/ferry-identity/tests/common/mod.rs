//! Shared helpers for the integration tests: throwaway CAs and a real
//! TLS handshake over loopback TCP.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_identity::{server_name, CaDir, Identity, IssuedCert, Validity};
use ferry_types::{HostName, OperatorName, TrustDomain};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

pub struct Cluster {
    pub tmp: TempDir,
    pub ca: CaDir,
    pub domain: TrustDomain,
}

impl Cluster {
    pub fn new(domain: &str) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let domain: TrustDomain = domain.parse().unwrap();
        let ca = CaDir::init(&tmp.path().join("ca"), &domain, 30).unwrap();
        Cluster { tmp, ca, domain }
    }

    pub fn out(&self) -> PathBuf {
        self.tmp.path().join("certs")
    }

    pub fn issue_host(&self, name: &str, validity: Validity) -> IssuedCert {
        self.ca.issue_host(&host(name), validity, &self.out()).unwrap()
    }

    pub fn issue_operator(&self, name: &str, role: &str) -> IssuedCert {
        let name: OperatorName = name.parse().unwrap();
        self.ca.issue_operator(&name, role, Validity::days(1), &self.out()).unwrap()
    }

    /// Load an issued certificate with this cluster's CA and CRL.
    pub fn load(&self, issued: &IssuedCert) -> Identity {
        Identity::load(&issued.cert, &issued.key, &self.ca.cert_path(), Some(&self.ca.crl_path()))
            .unwrap()
    }

    pub fn host_identity(&self, name: &str) -> Identity {
        self.load(&self.issue_host(name, Validity::days(1)))
    }
}

pub fn host(name: &str) -> HostName {
    name.parse().unwrap()
}

pub fn expired() -> Validity {
    let now = time::OffsetDateTime::now_utc();
    Validity { not_before: now - time::Duration::days(2), not_after: now - time::Duration::days(1) }
}

/// What each side saw.
pub struct Outcome {
    pub server: io::Result<server::TlsStream<TcpStream>>,
    pub client: io::Result<client::TlsStream<TcpStream>>,
}

/// One real handshake over loopback. After the handshake each side writes
/// one byte and reads the other's: in TLS 1.3 the client's `connect()`
/// returns before the server has judged the client certificate, so a refusal
/// of the client only shows on the client's first read.
pub async fn handshake(
    server_cfg: Arc<rustls::ServerConfig>,
    client_cfg: Arc<rustls::ClientConfig>,
    expect: &str,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsAcceptor::from(server_cfg).accept(tcp).await?;
        tls.write_all(b"S").await?;
        tls.flush().await?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await?;
        Ok::<_, io::Error>(tls)
    });
    let name = server_name(&host(expect)).unwrap();
    let cli = async move {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = TlsConnector::from(client_cfg).connect(name, tcp).await?;
        tls.write_all(b"C").await?;
        tls.flush().await?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await?;
        Ok::<_, io::Error>(tls)
    };
    let limit = Duration::from_secs(10);
    let client = tokio::time::timeout(limit, cli).await.expect("client timed out");
    // A client that gave up must not leave the server waiting on its read.
    let server = tokio::time::timeout(limit, srv).await.expect("server timed out").unwrap();
    Outcome { server, client }
}

pub fn err_text<T>(r: &io::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected a TLS failure, got success"),
        Err(e) => {
            let text = ferry_identity::describe_tls_error(e);
            // Shown with --nocapture: the raw rustls error next to ours.
            eprintln!("raw: {e:?}\n  -> {text}");
            text
        }
    }
}
