//! Data-plane microbenchmark: no QEMU needed.
//!
//! A "source QEMU" thread writes N bytes of incompressible data into a unix
//! socket; a "destination QEMU" thread reads them from another unix socket.
//! Between them, per mode:
//!
//! - `direct`: nothing (plain QEMU over one unix socket);
//! - `plain`: unix -> TCP loopback -> unix, copied with 1 MiB buffers, no
//!   TLS, no hashing, no framing (the cheapest relay);
//! - `ferry`: the agents' path: read chunk -> blake3 -> FrameWriter over
//!   tokio-rustls (real certificates from ferry-identity's CA, the agents'
//!   TLS configs) -> loopback TCP -> FrameReader -> blake3 -> unix socket,
//!   mirroring `outgoing::transfer` and `streams::pump_into_qemu`.
//!
//! The source and destination "agents" each get their own two-worker tokio
//! runtime, as two agent processes would. Modes are interleaved run by run;
//! the summary gives medians and ratios against `plain` and `direct`.
//!
//! ```text
//! cargo run --release -p ferry-channel --example pump_bench -- [GiB] [runs] [modes]
//! FERRY_BENCH_READ=bytes     source read size (default 1 MiB, PUMP_CHUNK)
//! FERRY_BENCH_TLS_BUF=bytes  rustls set_buffer_limit on the sending side
//! FERRY_BENCH_RBUF=bytes     BufReader of this size under the receiving TLS
//! FERRY_BENCH_QSNDBUF=bytes  SO_SNDBUF of the destination agent's QEMU socket
//! ```
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_channel::{FrameReader, FrameWriter, Incoming};
use ferry_identity::{CaDir, Identity, Validity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// What the fake source QEMU writes per call (QEMU flushes up to 64 iovecs).
const FEED_WRITE: usize = 256 * 1024;
/// What the fake destination QEMU reads per call (QEMUFile's IO_BUF_SIZE).
const SINK_READ: usize = 32 * 1024;

fn rusage(who: libc::c_int) -> f64 {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage; getrusage only writes it.
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn env(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn set_sndbuf(s: &impl std::os::fd::AsRawFd, size: usize) {
    let v = size as libc::c_int;
    // SAFETY: a valid fd and a c_int option value of the stated length.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt SO_SNDBUF");
}

fn read_chunk() -> usize {
    env("FERRY_BENCH_READ").unwrap_or(1 << 20)
}

struct Tls {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    name: rustls_pki_types::ServerName<'static>,
    _dir: tempfile::TempDir,
}

fn tls() -> Tls {
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::init(&dir.path().join("ca"), &"ferry.test".parse().unwrap(), 30).unwrap();
    let load = |name: &str| {
        let host = name.parse().unwrap();
        let c = ca.issue_host(&host, Validity::days(30), &dir.path().join(name)).unwrap();
        Identity::load(&c.cert, &c.key, &ca.cert_path(), Some(&ca.crl_path())).unwrap()
    };
    let (src, dst) = (load("src-host"), load("dst-host"));
    let name = ferry_identity::server_name(&"dst-host".parse().unwrap()).unwrap();
    Tls {
        client: ferry_identity::client_config(&src).unwrap(),
        server: ferry_identity::server_config(&dst).unwrap(),
        name,
        _dir: dir,
    }
}

fn feeder(
    path: std::path::PathBuf,
    total: u64,
    data: Arc<Vec<u8>>,
) -> std::thread::JoinHandle<f64> {
    std::thread::Builder::new()
        .name("qemu-src".into())
        .spawn(move || {
            let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
            let mut left = total;
            let mut off = 0usize;
            while left > 0 {
                let n = (left as usize).min(FEED_WRITE);
                if off + n > data.len() {
                    off = 0;
                }
                s.write_all(&data[off..off + n]).unwrap();
                off += n;
                left -= n as u64;
            }
            drop(s);
            rusage(libc::RUSAGE_THREAD)
        })
        .unwrap()
}

fn sink(l: std::os::unix::net::UnixListener) -> std::thread::JoinHandle<(u64, f64)> {
    std::thread::Builder::new()
        .name("qemu-dst".into())
        .spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = vec![0u8; SINK_READ];
            let mut got = 0u64;
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            (got, rusage(libc::RUSAGE_THREAD))
        })
        .unwrap()
}

/// Source agent, as `outgoing::transfer`: read, hash, frame, write.
async fn ferry_source<W: tokio::io::AsyncWrite + Unpin>(
    mut qemu: tokio::net::UnixStream,
    writer: &mut FrameWriter<W>,
) -> (u64, [u8; 32]) {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; read_chunk()];
    let mut total = 0u64;
    loop {
        let n = tokio::time::timeout(IO_TIMEOUT, qemu.read(&mut buf)).await.unwrap().unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
        writer.write_data(&buf[..n]).await.unwrap();
    }
    writer.write_data_end().await.unwrap();
    (total, *hasher.finalize().as_bytes())
}

/// Destination agent, as `streams::pump_into_qemu`.
async fn ferry_dest<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    qemu: &mut tokio::net::UnixStream,
) -> (u64, [u8; 32]) {
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    loop {
        match reader.read_frame().await.unwrap() {
            Incoming::Data(d) => {
                hasher.update(d);
                total += d.len() as u64;
                tokio::time::timeout(IO_TIMEOUT, qemu.write_all(d)).await.unwrap().unwrap();
            }
            Incoming::DataEnd => break,
            Incoming::Control(_) => panic!("control frame"),
        }
    }
    let _ = qemu.shutdown().await;
    (total, *hasher.finalize().as_bytes())
}

async fn tls_dest<IO>(
    acceptor: tokio_rustls::TlsAcceptor,
    io: IO,
    q: &mut tokio::net::UnixStream,
) -> (u64, [u8; 32])
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let tls = acceptor.accept(io).await.unwrap();
    let (r, _w) = tokio::io::split(tls);
    let mut reader = FrameReader::new(r, IO_TIMEOUT);
    ferry_dest(&mut reader, q).await
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

struct Bench {
    src_rt: tokio::runtime::Runtime,
    dst_rt: tokio::runtime::Runtime,
    tls: Tls,
    data: Arc<Vec<u8>>,
    bytes: u64,
}

/// (seconds, process CPU seconds, CPU seconds outside the fake QEMUs)
type Sample = (f64, f64, f64);

impl Bench {
    fn run(&self, mode: &str) -> Sample {
        let dir = tempfile::tempdir().unwrap();
        let (src_sock, dst_sock) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
        let sink_l = std::os::unix::net::UnixListener::bind(&dst_sock).unwrap();
        let bytes = self.bytes;
        let (cpu0, t0, feed, sunk, src, dst);
        match mode {
            "direct" => {
                let s = sink(sink_l);
                cpu0 = rusage(libc::RUSAGE_SELF);
                t0 = Instant::now();
                feed = feeder(dst_sock, bytes, self.data.clone());
                sunk = s.join().unwrap();
                (src, dst) = (None, None);
            }
            "plain" | "ferry" => {
                let ferry = mode == "ferry";
                let s = sink(sink_l);
                let tcp_l =
                    self.dst_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
                let addr = tcp_l.local_addr().unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.server.clone());
                let dst_task = self.dst_rt.spawn(async move {
                    let (tcp, _) = tcp_l.accept().await.unwrap();
                    let mut q = tokio::net::UnixStream::connect(&dst_sock).await.unwrap();
                    if let Some(size) = env("FERRY_BENCH_QSNDBUF") {
                        set_sndbuf(&q, size);
                    }
                    if !ferry {
                        let (qr, qw) = (tcp, q);
                        copy_plain(qr, qw).await;
                        return None;
                    }
                    Some(match env("FERRY_BENCH_RBUF") {
                        Some(cap) => {
                            tls_dest(
                                acceptor,
                                tokio::io::BufReader::with_capacity(cap, tcp),
                                &mut q,
                            )
                            .await
                        }
                        None => tls_dest(acceptor, tcp, &mut q).await,
                    })
                });
                let unix_l = self
                    .src_rt
                    .block_on(async { tokio::net::UnixListener::bind(&src_sock) })
                    .unwrap();
                let connector = tokio_rustls::TlsConnector::from(self.tls.client.clone());
                let name = self.tls.name.clone();
                // Connect (and handshake) before the clock starts.
                let conn = self.src_rt.block_on(async move {
                    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                    tcp.set_nodelay(true).unwrap();
                    if ferry {
                        Err(connector.connect(name, tcp).await.unwrap())
                    } else {
                        Ok(tcp)
                    }
                });
                cpu0 = rusage(libc::RUSAGE_SELF);
                t0 = Instant::now();
                feed = feeder(src_sock, bytes, self.data.clone());
                src = self.src_rt.block_on(async move {
                    let (q, _) = unix_l.accept().await.unwrap();
                    match conn {
                        Ok(tcp) => {
                            copy_plain(q, tcp).await;
                            None
                        }
                        Err(tls) => {
                            let mut tls = tls;
                            if let Some(limit) = env("FERRY_BENCH_TLS_BUF") {
                                tls.get_mut().1.set_buffer_limit(Some(limit));
                            }
                            let (_r, w) = tokio::io::split(tls);
                            let mut writer = FrameWriter::new(w, IO_TIMEOUT);
                            let out = ferry_source(q, &mut writer).await;
                            writer.flush().await.unwrap();
                            let mut w = writer.into_inner();
                            let _ = w.shutdown().await;
                            Some(out)
                        }
                    }
                });
                sunk = s.join().unwrap();
                dst = self.dst_rt.block_on(dst_task).unwrap();
            }
            m => panic!("unknown mode {m}"),
        }
        let secs = t0.elapsed().as_secs_f64();
        let cpu = rusage(libc::RUSAGE_SELF) - cpu0;
        let feed_cpu = feed.join().unwrap();
        assert_eq!(sunk.0, bytes, "{mode}: sink got {} of {bytes}", sunk.0);
        assert_eq!(src, dst, "{mode}: digests differ");
        if let Some((n, _)) = src {
            assert_eq!(n, bytes);
        }
        (secs, cpu, cpu - feed_cpu - sunk.1)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let gib: f64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1.0);
    let runs: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
    let modes: Vec<String> = args
        .get(3)
        .map(|m| m.split(',').map(str::to_owned).collect())
        .unwrap_or(vec!["direct".into(), "plain".into(), "ferry".into()]);
    let bytes = (gib * (1u64 << 30) as f64) as u64;
    // 64 MiB of incompressible bytes, reused cyclically.
    let mut data = vec![0u8; 64 << 20];
    blake3::Hasher::new().update(b"ferry pump bench").finalize_xof().fill(&mut data);
    let rt = |name: &str| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .enable_all()
            .build()
            .unwrap()
    };
    let bench = Bench {
        src_rt: rt("src-agent"),
        dst_rt: rt("dst-agent"),
        tls: tls(),
        data: Arc::new(data),
        bytes,
    };
    let gb = bytes as f64 / 1e9;
    println!(
        "# {gib} GiB per run, {runs} runs, read chunk {} B, tls buffer limit {:?}, receive BufReader {:?}",
        read_chunk(),
        env("FERRY_BENCH_TLS_BUF"),
        env("FERRY_BENCH_RBUF")
    );
    let mut results: Vec<(String, Vec<Sample>)> =
        modes.iter().map(|m| (m.clone(), Vec::new())).collect();
    for run in 0..runs {
        for (mode, samples) in results.iter_mut() {
            let s = bench.run(mode);
            println!(
                "run {run} {mode:>6}: {:8.1} MB/s  cpu {:.3} s/GB (agents {:.3} s/GB)",
                gb * 1e3 / s.0,
                s.1 / gb,
                s.2 / gb
            );
            samples.push(s);
        }
    }
    let med = |samples: &[Sample], f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    println!("# medians");
    for (mode, samples) in &results {
        println!(
            "{mode:>6}: {:8.1} MB/s  cpu {:.3} s/GB  agents {:.3} s/GB",
            med(samples, |s| gb_per(s.0)) * gb * 1e3,
            med(samples, |s| s.1) / gb,
            med(samples, |s| s.2) / gb
        );
    }
    // Ratios per run (same run, interleaved), then the median of those.
    for base in ["plain", "direct"] {
        let Some((_, b)) = results.iter().find(|(m, _)| m == base) else { continue };
        for (mode, samples) in results.iter().filter(|(m, _)| m != base) {
            let thr = median(samples.iter().zip(b).map(|(s, b)| b.0 / s.0).collect());
            let cpu = median(samples.iter().zip(b).map(|(s, b)| s.1 / b.1).collect());
            println!("{mode}/{base}: throughput x{thr:.3}, cpu/GB x{cpu:.3}");
        }
    }
}

fn gb_per(secs: f64) -> f64 {
    1.0 / secs
}
