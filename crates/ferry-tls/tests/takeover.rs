//! Real rustls handshakes over loopback TCP with the cluster's configs, then
//! the record layer taken over on one side or both: the bytes, the suites,
//! the clean and unclean ends, against rustls itself.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use ferry_identity::{CaDir, CipherPolicy, Identity, TlsConfigs, Validity};
use ferry_tls::{take_over, Paced, RecordBatch, Suite, TcpReader, TcpWriter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Hosts {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    _dir: tempfile::TempDir,
}

fn hosts(ciphers: &[&str]) -> Hosts {
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::init(&dir.path().join("ca"), &"ferry.test".parse().unwrap(), 30).unwrap();
    let load = |name: &str| {
        let c = ca.issue_host(&name.parse().unwrap(), Validity::days(30), &dir.path().join(name));
        let c = c.unwrap();
        let id = Identity::load(&c.cert, &c.key, &ca.cert_path(), Some(&ca.crl_path())).unwrap();
        TlsConfigs::with_ciphers(id, CipherPolicy::from_names(ciphers).unwrap()).unwrap()
    };
    Hosts {
        client: load("src-host").client().unwrap(),
        server: load("dst-host").server().unwrap(),
        _dir: dir,
    }
}

type ClientTls = tokio_rustls::client::TlsStream<Paced<TcpStream>>;
type ServerTls = tokio_rustls::server::TlsStream<Paced<TcpStream>>;

async fn handshake(h: &Hosts) -> (ClientTls, ServerTls) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(h.server.clone());
    let server = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        acceptor.accept(Paced::new(tcp)).await.unwrap()
    });
    let connector = tokio_rustls::TlsConnector::from(h.client.clone());
    let name = ferry_identity::server_name(&"dst-host".parse().unwrap()).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client = connector.connect(name, Paced::new(tcp)).await.unwrap();
    (client, server.await.unwrap())
}

fn client_over(tls: ClientTls) -> (TcpReader, TcpWriter) {
    let (io, conn) = tls.into_inner();
    take_over(io, conn).unwrap()
}

fn server_over(tls: ServerTls) -> (TcpReader, TcpWriter) {
    let (io, conn) = tls.into_inner();
    take_over(io, conn).unwrap()
}

fn pseudo_random(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Send `data` the data path's way (one batch) after a small message, and
/// close with close_notify.
async fn send(w: &mut TcpWriter, data: &[u8]) {
    w.write_all(b"hello").await.unwrap();
    w.flush().await.unwrap();
    let mut batch = RecordBatch::new(64);
    let mut sent = 0;
    while sent < data.len() {
        batch.plan(0, (1 << 14) - sent % (1 << 14));
        let n = batch.copy_in(&data[sent..]);
        w.send_batch(&mut batch, n, |_| {}).await.unwrap();
        sent += n;
    }
    w.shutdown().await.unwrap();
}

fn expected(data: &[u8]) -> Vec<u8> {
    let mut want = b"hello".to_vec();
    want.extend_from_slice(data);
    want
}

#[tokio::test]
async fn both_sides_taken_over_carry_bytes_both_ways_with_every_suite() {
    for (name, suite) in [
        ("TLS_AES_128_GCM_SHA256", Suite::Aes128Gcm),
        ("TLS_AES_256_GCM_SHA384", Suite::Aes256Gcm),
        ("TLS_CHACHA20_POLY1305_SHA256", Suite::Chacha20Poly1305),
    ] {
        let h = hosts(&[name]);
        let (c, s) = handshake(&h).await;
        let ((mut cr, mut cw), (mut sr, mut sw)) = (client_over(c), server_over(s));
        assert_eq!(cw.suite(), suite);
        let up = pseudo_random(3 << 20);
        let down = pseudo_random(100_000);
        let (up2, down2) = (up.clone(), down.clone());
        let t1 = tokio::spawn(async move { send(&mut cw, &up2).await });
        let t2 = tokio::spawn(async move { send(&mut sw, &down2).await });
        let mut got_up = Vec::new();
        sr.read_to_end(&mut got_up).await.unwrap();
        let mut got_down = Vec::new();
        cr.read_to_end(&mut got_down).await.unwrap();
        t1.await.unwrap();
        t2.await.unwrap();
        assert_eq!(got_up, expected(&up), "{name} up");
        assert_eq!(got_down, expected(&down), "{name} down");
    }
}

/// One side taken over, the other plain rustls (tokio-rustls): our records
/// are rustls's records, and the default policy negotiates AES-128-GCM.
#[tokio::test]
async fn a_taken_over_side_and_plain_rustls_understand_each_other() {
    let h = hosts(&["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"]);
    let data = pseudo_random(1 << 20);

    // Server taken over, client rustls.
    let (mut c, s) = handshake(&h).await;
    let (mut sr, mut sw) = server_over(s);
    assert_eq!(sw.suite(), Suite::Aes128Gcm);
    c.write_all(&data).await.unwrap();
    c.shutdown().await.unwrap();
    let mut got = Vec::new();
    sr.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, data, "rustls -> ours");
    let d2 = data.clone();
    let t = tokio::spawn(async move { send(&mut sw, &d2).await });
    let mut got = Vec::new();
    c.read_to_end(&mut got).await.unwrap();
    t.await.unwrap();
    assert_eq!(got, expected(&data), "ours -> rustls, ended by our close_notify");

    // Client taken over, server rustls.
    let (c, mut s) = handshake(&h).await;
    let (mut cr, mut cw) = client_over(c);
    let d2 = data.clone();
    let t = tokio::spawn(async move { send(&mut cw, &d2).await });
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    t.await.unwrap();
    assert_eq!(got, expected(&data));
    s.write_all(b"bye").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    cr.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"bye");
}

/// The first message a client sends right after its handshake is not lost
/// by the server's hand-over, however the bytes arrive.
#[tokio::test]
async fn the_first_message_after_the_handshake_survives_the_hand_over() {
    let h = hosts(&["TLS_AES_128_GCM_SHA256"]);
    for _ in 0..20 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(h.server.clone());
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let s = acceptor.accept(Paced::new(tcp)).await.unwrap();
            let (mut r, _w) = server_over(s);
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            got
        });
        let connector = tokio_rustls::TlsConnector::from(h.client.clone());
        let name = ferry_identity::server_name(&"dst-host".parse().unwrap()).unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        // A plain rustls client writes at once, so its Finished and its
        // first records often reach the server in one segment.
        let mut c = connector.connect(name, tcp).await.unwrap();
        c.write_all(b"first words").await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(server.await.unwrap(), b"first words");
    }
}

/// The hard case of the hand-over: the client's Finished and the first
/// half of its next record arrive together, the rest of that record later.
/// The server must stop reading at the end of the handshake, not inside
/// the next record (whose bytes rustls would otherwise keep and lose).
#[tokio::test]
async fn a_record_straddling_the_end_of_the_handshake_is_not_lost() {
    use std::io::{Read, Write};
    let h = hosts(&["TLS_AES_128_GCM_SHA256"]);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(h.server.clone());
    let server = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let s = acceptor.accept(Paced::new(tcp)).await.unwrap();
        let (mut r, _w) = server_over(s);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    });
    let config = h.client.clone();
    let client = tokio::task::spawn_blocking(move || {
        let name = ferry_identity::server_name(&"dst-host".parse().unwrap()).unwrap();
        let mut conn = rustls::ClientConnection::new(config, name).unwrap();
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        while conn.is_handshaking() {
            while conn.wants_write() {
                conn.write_tls(&mut tcp).unwrap();
            }
            if conn.is_handshaking() {
                conn.read_tls(&mut tcp).unwrap();
                conn.process_new_packets().unwrap();
            }
        }
        // The client's last flight and its first record, sent in two parts
        // cut inside that record.
        conn.writer().write_all(b"first words").unwrap();
        conn.send_close_notify();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        let cut = out.len() - 40;
        tcp.write_all(&out[..cut]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        tcp.write_all(&out[cut..]).unwrap();
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest);
    });
    assert_eq!(server.await.unwrap(), b"first words");
    client.abort();
}

/// A client refused in the handshake (here: no certificate) gets the
/// server's alert, not a reset: pacing must not leave its flight unread.
#[tokio::test]
async fn a_refused_client_hears_why() {
    let h = hosts(&["TLS_AES_128_GCM_SHA256"]);
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(h._dir.path().join("ca").join("ca.pem")).unwrap();
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let no_cert = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    for _ in 0..30 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(h.server.clone());
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            assert!(acceptor.accept(Paced::new(tcp)).await.is_err());
        });
        let connector = tokio_rustls::TlsConnector::from(no_cert.clone());
        let name = ferry_identity::server_name(&"dst-host".parse().unwrap()).unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut c = connector.connect(name, tcp).await.unwrap();
        let err = c.read(&mut [0u8; 16]).await.unwrap_err();
        let tls = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
        assert!(
            matches!(
                tls,
                Some(rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired))
            ),
            "{err}"
        );
        server.await.unwrap();
    }
}

#[tokio::test]
async fn a_connection_cut_without_close_notify_is_a_truncation() {
    let h = hosts(&["TLS_AES_128_GCM_SHA256"]);
    let (c, s) = handshake(&h).await;
    let ((_cr, mut cw), (mut sr, _sw)) = (client_over(c), server_over(s));
    cw.write_all(b"partial").await.unwrap();
    cw.flush().await.unwrap();
    drop(cw); // the write half closes: TCP FIN, no close_notify
    let mut got = Vec::new();
    let err = sr.read_to_end(&mut got).await.unwrap_err();
    assert_eq!(got, b"partial");
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
}
