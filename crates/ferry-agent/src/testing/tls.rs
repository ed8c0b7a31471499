//! A real TLS 1.3 handshake between two host identities, in memory, to
//! mint the proofs (PeerAuthenticated with its channel binding) that unit
//! tests of the checks need.

use std::path::Path;

use ferry_identity::{CaDir, Identity, PeerAuthenticated, Validity};
use ferry_types::{HostName, TrustDomain};
use rustls::{ClientConnection, ServerConnection};

/// What each end of one connection knows about the other.
pub struct Pair {
    /// The client's proof about the server.
    pub server: PeerAuthenticated,
    /// The server's proof about the client.
    pub client: PeerAuthenticated,
}

pub fn domain() -> TrustDomain {
    "ferry.test".parse().expect("domain")
}

/// Connect `client` to `server` (both host names) with certificates from a
/// fresh CA in `dir`.
pub fn pair(dir: &Path, client: &str, server: &str) -> Pair {
    let ca = CaDir::init(&dir.join("ca"), &domain(), 1).expect("CA");
    let load = |name: &str| {
        let host: HostName = name.parse().expect("host");
        let c = ca.issue_host(&host, Validity::days(1), &dir.join(name)).expect("cert");
        Identity::load(&c.cert, &c.key, &ca.cert_path(), None).expect("identity")
    };
    let (ci, si) = (load(client), load(server));
    let cc = ferry_identity::client_config(&ci).expect("client config");
    let sc = ferry_identity::server_config(&si).expect("server config");
    let server_host: HostName = server.parse().expect("host");
    let name = ferry_identity::server_name(&server_host).expect("server name");
    let mut c = ClientConnection::new(cc, name).expect("client");
    let mut s = ServerConnection::new(sc).expect("server");
    for _ in 0..10 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).expect("client writes");
        }
        s.read_tls(&mut buf.as_slice()).expect("server reads");
        s.process_new_packets().expect("server handshake");
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).expect("server writes");
        }
        c.read_tls(&mut buf.as_slice()).expect("client reads");
        c.process_new_packets().expect("client handshake");
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
    }
    let client_host: HostName = client.parse().expect("host");
    Pair {
        server: ferry_identity::authenticate_host(&c, &domain(), &server_host)
            .expect("server proof"),
        client: ferry_identity::authenticate_host(&s, &domain(), &client_host)
            .expect("client proof"),
    }
}

#[cfg(test)]
mod tests {
    /// Both ends of one connection hold the same binding, and it names the
    /// other end: what quotes and offers are bound to.
    #[test]
    fn both_ends_agree_on_the_binding() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = super::pair(dir.path(), "host1", "host2");
        assert_eq!(p.server.binding(), p.client.binding());
        assert_eq!((p.server.host().as_str(), p.client.host().as_str()), ("host2", "host1"));
        let other = super::pair(&dir.path().join("again"), "host1", "host2");
        assert_ne!(
            p.server.binding(),
            other.server.binding(),
            "another connection, another binding"
        );
    }
}
