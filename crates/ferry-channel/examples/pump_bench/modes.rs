//! The two agents of each mode. Each sets its connection up (TCP, TLS
//! handshake) before the clock starts, says so, waits for the go, relays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_channel::{FrameReader, FrameWriter, Incoming, ReceivePump, Received, SendPump};
use ferry_identity::{CaDir, CipherPolicy, Identity, TlsConfigs, Validity};
use ferry_tls::{take_over, Paced};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::fake_qemu::{set_buf, set_opt};

const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// What an agent relayed: byte count and BLAKE3 digest (none for `plain`).
pub type Relayed = Option<(u64, [u8; 32])>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No agents: QEMU to QEMU over one unix socket.
    Direct,
    /// unix -> TCP -> unix, 1 MiB copies: the cheapest possible relay.
    Plain,
    /// The agents' path before the lean data path: tokio-rustls both ways
    /// (a 128 KiB read buffer under the server), hash of each 1 MiB read,
    /// `FrameWriter::write_data`, `FrameReader::read_frame`.
    Rustls,
    /// The agents' path now: rustls handshake, record layer taken over
    /// (ferry-tls), `SendPump` and `ReceivePump`.
    Ferry,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "direct" => Mode::Direct,
            "plain" => Mode::Plain,
            "rustls" => Mode::Rustls,
            "ferry" => Mode::Ferry,
            m => return Err(format!("unknown mode {m} (direct, plain, rustls, ferry)")),
        })
    }
}

/// A variant's knobs (see main.rs).
#[derive(Clone, Debug)]
pub struct Knobs {
    pub suite: String,
    pub records: usize,
    pub tcp_buf: Option<usize>,
    pub lowat: Option<usize>,
    pub workers: usize,
    pub qemu_sndbuf: Option<usize>,
    pub read_size: Option<usize>,
    /// Hash a whole batch before sealing it, instead of record by record.
    pub hash_first: bool,
}

pub struct Tls {
    pub client: Arc<rustls::ClientConfig>,
    pub server: Arc<rustls::ServerConfig>,
    name: rustls_pki_types::ServerName<'static>,
    _dir: tempfile::TempDir,
}

/// The cluster's real configs (ferry-identity), limited to one suite.
pub fn tls(suite: &str) -> Tls {
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::init(&dir.path().join("ca"), &"ferry.test".parse().unwrap(), 30).unwrap();
    let ciphers = CipherPolicy::from_names(&[suite]).unwrap();
    let load = |name: &str| {
        let host = name.parse().unwrap();
        let c = ca.issue_host(&host, Validity::days(30), &dir.path().join(name)).unwrap();
        let id = Identity::load(&c.cert, &c.key, &ca.cert_path(), Some(&ca.crl_path())).unwrap();
        TlsConfigs::with_ciphers(id, ciphers.clone()).unwrap()
    };
    let (src, dst) = (load("src-host"), load("dst-host"));
    Tls {
        client: src.client().unwrap(),
        server: dst.server().unwrap(),
        name: ferry_identity::server_name(&"dst-host".parse().unwrap()).unwrap(),
        _dir: dir,
    }
}

/// An agent's "set up, now waiting" signal and the go that follows.
pub struct Gate {
    pub ready: std::sync::mpsc::Sender<()>,
    pub go: tokio::sync::watch::Receiver<bool>,
}

impl Gate {
    async fn pass(mut self) {
        self.ready.send(()).unwrap();
        self.go.wait_for(|g| *g).await.unwrap();
    }
}

fn tcp_setup(tcp: &TcpStream, k: &Knobs) {
    tcp.set_nodelay(true).unwrap();
    if let Some(size) = k.tcp_buf {
        set_buf(tcp, libc::SO_SNDBUF, size);
        set_buf(tcp, libc::SO_RCVBUF, size);
    }
    if let Some(lowat) = k.lowat {
        set_opt(tcp, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, lowat);
    }
}

async fn copy_plain<R, W>(mut r: R, mut w: W)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = tokio::time::timeout(IO_TIMEOUT, r.read(&mut buf)).await.unwrap().unwrap();
        if n == 0 {
            break;
        }
        tokio::time::timeout(IO_TIMEOUT, w.write_all(&buf[..n])).await.unwrap().unwrap();
    }
    w.shutdown().await.unwrap();
}

/// The source agent: QEMU's socket at `qemu`, the peer at `peer`.
pub async fn source(
    mode: Mode,
    tls: &Tls,
    k: &Knobs,
    peer: std::net::SocketAddr,
    qemu: PathBuf,
    gate: Gate,
) -> Relayed {
    let tcp = TcpStream::connect(peer).await.unwrap();
    tcp_setup(&tcp, k);
    let unix_l = UnixListener::bind(&qemu).unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
    match mode {
        Mode::Direct => unreachable!("no agents"),
        Mode::Plain => {
            gate.pass().await;
            let (q, _) = unix_l.accept().await.unwrap();
            copy_plain(q, tcp).await;
            None
        }
        Mode::Rustls => {
            let tls = connector.connect(tls.name.clone(), tcp).await.unwrap();
            let (_r, w) = tokio::io::split(tls);
            let mut w = FrameWriter::new(w, IO_TIMEOUT);
            gate.pass().await;
            let (mut q, _) = unix_l.accept().await.unwrap();
            let mut h = blake3::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let n = tokio::time::timeout(IO_TIMEOUT, q.read(&mut buf)).await.unwrap().unwrap();
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                total += n as u64;
                w.write_data(&buf[..n]).await.unwrap();
            }
            w.write_data_end().await.unwrap();
            let _ = w.into_inner().shutdown().await;
            Some((total, *h.finalize().as_bytes()))
        }
        Mode::Ferry => {
            let tls = connector.connect(tls.name.clone(), Paced::new(tcp)).await.unwrap();
            let (io, conn) = tls.into_inner();
            let (_r, w) = take_over(io, conn).unwrap();
            let mut w = FrameWriter::new(w, IO_TIMEOUT);
            gate.pass().await;
            let (q, _) = unix_l.accept().await.unwrap();
            if k.hash_first {
                return Some(two_passes(q, &mut w, k.records).await);
            }
            let sum = SendPump::with_records(q, IO_TIMEOUT, k.records).run(&mut w).await.unwrap();
            let _ = w.into_inner().shutdown().await;
            Some((sum.bytes, sum.digest.0))
        }
    }
}

/// The sending pump's work in two passes: hash the whole batch, then seal
/// and send it (what record-by-record hashing is measured against).
async fn two_passes(
    q: UnixStream,
    w: &mut FrameWriter<ferry_tls::TcpWriter>,
    records: usize,
) -> (u64, [u8; 32]) {
    let mut batch = ferry_tls::RecordBatch::new(records);
    let mut h = blake3::Hasher::new();
    let mut total = 0u64;
    loop {
        let gap =
            (ferry_tls::MAX_PLAINTEXT as u64 - total % ferry_tls::MAX_PLAINTEXT as u64) as usize;
        batch.plan(ferry_channel::HEADER_LEN, gap);
        let n = loop {
            q.readable().await.unwrap();
            match q.try_read_vectored(&mut batch.read_slices()) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        };
        if n == 0 {
            break;
        }
        let mut left = n;
        for s in batch.read_slices() {
            let m = left.min(s.len());
            h.update(&s[..m]);
            left -= m;
            if left == 0 {
                break;
            }
        }
        total += n as u64;
        w.write_data_batch(&mut batch, n, |_| {}).await.unwrap();
    }
    w.write_data_end().await.unwrap();
    (total, *h.finalize().as_bytes())
}

/// The destination agent: the peer connects to `l`, QEMU listens at `qemu`.
pub async fn dest(
    mode: Mode,
    tls: &Tls,
    k: &Knobs,
    l: TcpListener,
    qemu: PathBuf,
    gate: Gate,
) -> Relayed {
    let (tcp, _) = l.accept().await.unwrap();
    tcp_setup(&tcp, k);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
    match mode {
        Mode::Direct => unreachable!("no agents"),
        Mode::Plain => {
            gate.pass().await;
            let q = UnixStream::connect(&qemu).await.unwrap();
            copy_plain(tcp, q).await;
            None
        }
        Mode::Rustls => {
            let io = tokio::io::BufReader::with_capacity(128 * 1024, tcp);
            let tls = acceptor.accept(io).await.unwrap();
            let (r, _w) = tokio::io::split(tls);
            let mut r = FrameReader::new(r, IO_TIMEOUT);
            gate.pass().await;
            let mut q = UnixStream::connect(&qemu).await.unwrap();
            let mut h = blake3::Hasher::new();
            let mut total = 0u64;
            loop {
                match r.read_frame().await.unwrap() {
                    Incoming::Data(d) => {
                        h.update(d);
                        total += d.len() as u64;
                        tokio::time::timeout(IO_TIMEOUT, q.write_all(d)).await.unwrap().unwrap();
                    }
                    Incoming::DataEnd => break,
                    Incoming::Control(_) => panic!("control frame"),
                }
            }
            let _ = q.shutdown().await;
            Some((total, *h.finalize().as_bytes()))
        }
        Mode::Ferry => {
            let tls = acceptor.accept(Paced::new(tcp)).await.unwrap();
            let (io, conn) = tls.into_inner();
            let (mut r, _w) = take_over(io, conn).unwrap();
            if let Some(n) = k.read_size {
                r.set_read_size(n);
            }
            let mut r = FrameReader::new(r, IO_TIMEOUT);
            gate.pass().await;
            let mut q = UnixStream::connect(&qemu).await.unwrap();
            let got = ReceivePump::new().run(&mut r, &mut q, IO_TIMEOUT).await.unwrap();
            let _ = q.shutdown().await;
            let Received::End(sum) = got else { panic!("control frame") };
            Some((sum.bytes, sum.digest.0))
        }
    }
}
