//! Data-plane microbenchmark: the agents' relay without QEMU.
//!
//! A fake source QEMU writes N bytes of incompressible data into a unix
//! socket; a fake destination QEMU reads them from another. Between them,
//! per mode (see modes.rs): nothing (`direct`), the cheapest relay
//! (`plain`: unix -> TCP -> unix, no TLS, no hash, no framing), the
//! agents' path before the lean data path (`rustls`), and the agents' path
//! now (`ferry`: rustls handshake with the cluster's real configs, record
//! layer taken over, `SendPump` -> loopback TCP -> `ReceivePump`). Each
//! agent runs on its own tokio runtime, as two agent processes would.
//! Modes are interleaved run by run, in an order that rotates by one each
//! round, and every round also measures the
//! cryptographic primitives (ferry-ceilings), so that the floor
//!
//!   plain relay's agent CPU + seal + open + BLAKE3 (both sides)
//!
//! and the ratio of the `ferry` agents to it come from the same moments.
//!
//! ```text
//! cargo run --release -p ferry-channel --example pump_bench -- [GiB] [runs] [modes]
//! ```
//!
//! Modes are `direct`, `plain`, `rustls` and `ferry`, each optionally with
//! knobs after colons, so that variants run interleaved in one run, e.g.
//! `plain,ferry,ferry:workers=0,ferry:suite=TLS_AES_256_GCM_SHA384`:
//!
//! ```text
//! suite=NAME     TLS 1.3 suite (default TLS_AES_128_GCM_SHA256)
//! records=N      TLS records per SendPump batch (default 64)
//! workers=N      worker threads per agent runtime (default 2; 0 = a
//!                current-thread runtime, driven by a thread of its own)
//! tcpbuf=BYTES   SO_SNDBUF and SO_RCVBUF on both TCP ends (default: kernel autotuning)
//! lowat=BYTES    TCP_NOTSENT_LOWAT on both TCP ends (default: none; the agents' `[migration] unsent_limit_kib`)
//! qsndbuf=BYTES  SO_SNDBUF of the fake source QEMU's socket (default: kernel's)
//! rbuf=BYTES     largest socket read of the destination's record reader (default 256 KiB)
//! hash=first     the source hashes each batch in a pass of its own, then seals it
//!                (default: record by record, just before sealing each)
//! ```
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used)]

mod fake_qemu;
mod modes;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use fake_qemu::{feeder, rusage, sink};
use ferry_ceilings::{Budget, Ceilings};
use modes::{Gate, Knobs, Mode, Tls};

/// One mode with its knobs: what one column of the results measures.
#[derive(Clone, Debug)]
struct Variant {
    name: String,
    mode: Mode,
    knobs: Knobs,
}

fn parse_variant(spec: &str) -> Variant {
    let mut parts = spec.split(':');
    let mode: Mode = parts.next().unwrap_or_default().parse().unwrap();
    let mut k = Knobs {
        suite: "TLS_AES_128_GCM_SHA256".into(),
        records: ferry_channel::SEND_RECORDS,
        tcp_buf: None,
        lowat: None,
        workers: 2,
        qemu_sndbuf: None,
        read_size: None,
        hash_first: false,
    };
    for kv in parts {
        let (key, v) = kv.split_once('=').unwrap_or_else(|| panic!("knob {kv}: key=value"));
        let n = || v.parse::<usize>().unwrap_or_else(|_| panic!("knob {kv}: a number"));
        match key {
            "suite" => k.suite = v.into(),
            "records" => k.records = n(),
            "workers" => k.workers = n(),
            "tcpbuf" => k.tcp_buf = Some(n()),
            "lowat" => k.lowat = Some(n()),
            "qsndbuf" => k.qemu_sndbuf = Some(n()),
            "rbuf" => k.read_size = Some(n()),
            "hash" if v == "first" => k.hash_first = true,
            _ => panic!(
                "unknown knob {kv} (suite, records, workers, tcpbuf, qsndbuf, rbuf, hash=first)"
            ),
        }
    }
    Variant { name: spec.into(), mode, knobs: k }
}

/// Agent runtimes (one per side and worker count) and TLS configs (one
/// per suite), shared by the variants that need them.
struct Bench {
    runtimes: BTreeMap<usize, (tokio::runtime::Runtime, tokio::runtime::Runtime)>,
    tls: BTreeMap<String, Arc<Tls>>,
    data: Arc<Vec<u8>>,
    bytes: u64,
}

/// (seconds, process CPU seconds, CPU seconds outside the fake QEMUs)
type Sample = (f64, f64, f64);

impl Bench {
    fn run(&self, v: &Variant) -> Sample {
        let mode = v.mode;
        let dir = tempfile::tempdir().unwrap();
        let (src_sock, dst_sock) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
        let sink_l = std::os::unix::net::UnixListener::bind(&dst_sock).unwrap();
        let s = sink(sink_l);
        let qsnd = v.knobs.qemu_sndbuf;
        if mode == Mode::Direct {
            let (cpu0, t0) = (rusage(libc::RUSAGE_SELF), Instant::now());
            let feed = feeder(dst_sock, self.bytes, self.data.clone(), qsnd);
            let sunk = s.join().unwrap();
            let (secs, cpu) = (t0.elapsed().as_secs_f64(), rusage(libc::RUSAGE_SELF) - cpu0);
            let feed_cpu = feed.join().unwrap();
            assert_eq!(sunk.0, self.bytes);
            return (secs, cpu, cpu - feed_cpu - sunk.1);
        }
        let (src_rt, dst_rt) = &self.runtimes[&v.knobs.workers];
        let tcp_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        tcp_l.set_nonblocking(true).unwrap();
        let addr = tcp_l.local_addr().unwrap();
        let (go_tx, go_rx) = tokio::sync::watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let gate = || Gate { ready: ready_tx.clone(), go: go_rx.clone() };
        let (dst_gate, src_gate) = (gate(), gate());
        let tls = self.tls[&v.knobs.suite].clone();
        let (t, k) = (tls.clone(), v.knobs.clone());
        let dst = dst_rt.spawn(async move {
            let l = tokio::net::TcpListener::from_std(tcp_l).unwrap();
            modes::dest(mode, &t, &k, l, dst_sock, dst_gate).await
        });
        let (t, k, qemu) = (tls, v.knobs.clone(), src_sock.clone());
        let src =
            src_rt.spawn(async move { modes::source(mode, &t, &k, addr, qemu, src_gate).await });
        let (relayed, cpu0, t0, feed) = std::thread::scope(|sc| {
            let d = sc.spawn(|| dst_rt.block_on(dst).unwrap());
            let s = sc.spawn(|| src_rt.block_on(src).unwrap());
            ready_rx.recv().unwrap();
            ready_rx.recv().unwrap();
            let (cpu0, t0) = (rusage(libc::RUSAGE_SELF), Instant::now());
            let feed = feeder(src_sock, self.bytes, self.data.clone(), qsnd);
            go_tx.send(true).unwrap();
            ((s.join().unwrap(), d.join().unwrap()), cpu0, t0, feed)
        });
        let sunk = s.join().unwrap();
        let (secs, cpu) = (t0.elapsed().as_secs_f64(), rusage(libc::RUSAGE_SELF) - cpu0);
        let feed_cpu = feed.join().unwrap();
        assert_eq!(
            sunk.0, self.bytes,
            "{}: the sink got {} of {} bytes",
            v.name, sunk.0, self.bytes
        );
        assert_eq!(relayed.0, relayed.1, "{}: the two agents' sums differ", v.name);
        if let Some((n, _)) = relayed.0 {
            assert_eq!(n, self.bytes);
        }
        (secs, cpu, cpu - feed_cpu - sunk.1)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn range(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

fn suite(name: &str) -> ferry_ceilings::Suite {
    use ferry_ceilings::Suite as S;
    S::ALL.into_iter().find(|s| s.tls_name() == name).unwrap_or_else(|| panic!("suite {name}"))
}

fn runtime(name: &str, workers: usize) -> tokio::runtime::Runtime {
    let mut b = if workers == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    b.thread_name(name).enable_all().build().unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let gib: f64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1.0);
    let runs: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
    let spec = args.get(3).map(String::as_str).unwrap_or("direct,plain,ferry");
    let variants: Vec<Variant> = spec.split(',').map(parse_variant).collect();
    let bytes = (gib * (1u64 << 30) as f64) as u64;

    println!("# this machine's ceilings (ferry-ceilings):");
    println!("{}", ferry_ceilings::measure(Budget::default()).unwrap());
    let mut data = vec![0u8; 64 << 20];
    blake3::Hasher::new().update(b"ferry pump bench").finalize_xof().fill(&mut data);
    let mut bench =
        Bench { runtimes: BTreeMap::new(), tls: BTreeMap::new(), data: Arc::new(data), bytes };
    for v in &variants {
        let w = v.knobs.workers;
        bench
            .runtimes
            .entry(w)
            .or_insert_with(|| (runtime("src-agent", w), runtime("dst-agent", w)));
        let s = v.knobs.suite.clone();
        bench.tls.entry(s.clone()).or_insert_with(|| Arc::new(modes::tls(&s)));
    }
    let gb = bytes as f64 / 1e9;
    println!("# {gib} GiB per run, {runs} runs, interleaved: {spec}");
    let mut results: Vec<(Variant, Vec<Sample>)> =
        variants.iter().map(|v| (v.clone(), Vec::new())).collect();
    let mut prims: Vec<Ceilings> = Vec::new();
    let budget = Budget { bytes: 64 << 20, trials: 3, tcp_bytes: 0 };
    for run in 0..runs {
        prims.push(ferry_ceilings::measure_primitives(budget).unwrap());
        // The order rotates by one each round, so that no variant always
        // runs first (or right after the most expensive one).
        let n = results.len();
        for i in 0..n {
            let (v, samples) = &mut results[(run + i) % n];
            let s = bench.run(v);
            println!(
                "run {run} {:>12}: {:8.1} MB/s  cpu {:.3} s/GB (agents {:.3} s/GB)",
                v.name,
                gb * 1e3 / s.0,
                s.1 / gb,
                s.2 / gb
            );
            samples.push(s);
        }
    }
    println!("# medians");
    let med = |samples: &[Sample], f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    for (v, samples) in &results {
        println!(
            "{:>12}: {:8.1} MB/s  cpu {:.3} s/GB  agents {:.3} s/GB",
            v.name,
            gb * 1e3 / med(samples, |s| s.0),
            med(samples, |s| s.1) / gb,
            med(samples, |s| s.2) / gb
        );
    }
    let find = |m: Mode| {
        results
            .iter()
            .find(|(v, _)| v.mode == m && v.name == v.name.split(':').next().unwrap_or(""))
    };
    for base in [Mode::Plain, Mode::Direct] {
        let Some((bv, b)) = find(base) else { continue };
        for (v, samples) in results.iter().filter(|(v, _)| v.name != bv.name) {
            let thr = median(samples.iter().zip(b).map(|(s, b)| b.0 / s.0).collect());
            let cpu = median(samples.iter().zip(b).map(|(s, b)| s.1 / b.1).collect());
            println!("{} / {}: throughput x{thr:.3}, cpu/GB x{cpu:.3}", v.name, bv.name);
        }
    }
    if let Some((_, plain)) = find(Mode::Plain) {
        floor(&results, plain, &prims, gb);
    }
}

/// Each round's floor (that round's plain relay + that round's primitives)
/// and every TLS variant's agents against it.
fn floor(results: &[(Variant, Vec<Sample>)], plain: &[Sample], prims: &[Ceilings], gb: f64) {
    let plain_med = median(plain.iter().map(|p| p.2 / gb).collect());
    for (v, samples) in results.iter().filter(|(v, _)| matches!(v.mode, Mode::Ferry | Mode::Rustls))
    {
        let parts: Vec<_> =
            prims.iter().map(|c| c.floor_parts(suite(&v.knobs.suite)).unwrap()).collect();
        let floors: Vec<f64> =
            plain.iter().zip(&parts).map(|(p, f)| p.2 / gb + f.total()).collect();
        let m = |f: fn(&ferry_ceilings::FloorParts) -> f64| median(parts.iter().map(f).collect());
        println!(
            "# floor for {}: plain relay {plain_med:.3} + seal {:.3} + open {:.3} + BLAKE3 {:.3} \
             (send) + {:.3} (receive) = {:.3} agent CPU s/GB (medians over rounds)",
            v.name,
            m(|f| f.seal_s_per_gb),
            m(|f| f.open_s_per_gb),
            m(|f| f.blake3_send_s_per_gb),
            m(|f| f.blake3_receive_s_per_gb),
            median(floors.clone()),
        );
        let ratios: Vec<f64> = samples.iter().zip(&floors).map(|(s, f)| s.2 / gb / f).collect();
        let (lo, hi) = range(&ratios);
        println!(
            "{} agents / floor: x{:.3} ({lo:.3}-{hi:.3}) per round",
            v.name,
            median(ratios.clone())
        );
    }
}
