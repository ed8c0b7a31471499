//! A flood of unauthenticated connections during a migration
//! (docs/architecture.md, threat table): all are refused in the handshake
//! and the migration completes.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

// ------------------------------------------------------------------ flood

const TLS_FLOOD: &str = r#"
import json, socket, ssl, sys, threading
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
counts = {"refused_cert_required": 0, "refused_protocol": 0, "refused_other": 0, "closed": 0, "answered": 0}
reasons = {}
lock = threading.Lock()
def one(i):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if i % 10 == 0:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    key = "closed"
    try:
        with socket.create_connection((host, port), timeout=20) as raw:
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"\x01\x00\x00\x00\x00\x00\x00\x0e" + b'{"protocol":1}')
                data = s.recv(4096)
                key = "answered" if data else "closed"
    except ssl.SSLError as e:
        r = str(e)
        with lock:
            reasons[r[:80]] = reasons.get(r[:80], 0) + 1
        if "CERTIFICATE_REQUIRED" in r.upper() or "CERTIFICATE REQUIRED" in r.upper():
            key = "refused_cert_required"
        elif "PROTOCOL" in r.upper() or "VERSION" in r.upper():
            key = "refused_protocol"
        else:
            key = "refused_other"
    except (ConnectionResetError, BrokenPipeError) as e:
        key = "closed"
    with lock:
        counts[key] += 1
def worker(start):
    for i in range(start, n, 8):
        one(i)
ts = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps({"counts": counts, "reasons": reasons}))
"#;

/// How the agent answered one garbage connection: `true` if it refused in
/// the handshake (closed, or sent only a TLS alert record).
fn garbage_connection(addr: SocketAddr, i: u32) -> Result<bool, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20))).map_err(|e| e.to_string())?;
    let payload: Vec<u8> = match i % 4 {
        0 => pseudo_random(64 + (i as usize % 512), i),
        1 => b"GET / HTTP/1.1\r\nHost: host2\r\n\r\n".to_vec(),
        // A TLS handshake record that claims far more than it carries.
        2 => [vec![0x16, 0x03, 0x01, 0xff, 0xff], pseudo_random(200, i)].concat(),
        // A Ferry frame without TLS.
        _ => frame(1, b"{\"protocol\":1}"),
    };
    let _ = s.write_all(&payload);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    Ok(got.is_empty() || got[0] == 0x15)
}

/// 1,000 unauthenticated connections (garbage, silence, TLS without a
/// client certificate, TLS 1.2) hit the destination while it receives a
/// migration: all are refused in the handshake, the migration completes,
/// and the agent answers afterwards.
#[test]
fn a_thousand_unauthenticated_connections_during_a_migration() {
    let _g = serial();
    let t0 = Instant::now();
    // 24 MiB/s and a slowly dirtying guest: the transfer lasts ~8 s and
    // converges (at dirty=64, i.e. 256 MB/s, it never would).
    let lab = TestLab::up(2, 24);
    let vm = lab.start_guest("host1", "g", 256, "fill_mib=192 dirty=1 hb_ms=10");
    let log = console_path(&vm);
    let h2 = lab.host("host2");
    let addr = h2.addr;
    let pid = lab.agent_pid("host2");
    let log_before = std::fs::metadata(&h2.log).map(|m| m.len()).unwrap_or(0);

    let mut child = spawn_migrate(&lab);
    wait_until(Duration::from_secs(60), "the incoming VM on host2", || {
        lab.vms("host2").iter().any(|v| v["name"] == "g")
    });
    let flood_start = Instant::now();
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the migration ended before the flood began"
    );

    // RSS sampler.
    let max_rss = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (m, st) = (max_rss.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                if let Some(r) = rss_kib(pid) {
                    m.fetch_max(r, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // 100 silent connections, held open (slowloris).
    let idle: Vec<TcpStream> =
        (0..100).map(|_| TcpStream::connect(addr).expect("idle connect")).collect();
    // 400 garbage connections from 8 threads.
    let garbage: Vec<_> = (0..8u32)
        .map(|t| {
            std::thread::spawn(move || {
                (0..50u32).map(|k| garbage_connection(addr, t * 50 + k)).collect::<Vec<_>>()
            })
        })
        .collect();
    // 500 TLS connections without a client certificate (50 of them TLS 1.2 only).
    let tls = Command::new("python3")
        .args(["-c", TLS_FLOOD, "127.0.0.1", &addr.port().to_string(), "500"])
        .output()
        .expect("python3");
    assert!(tls.status.success(), "TLS flood script failed: {}", text(&tls));
    let tls_result: Value = serde_json::from_slice(&tls.stdout).expect("flood json");
    let garbage: Vec<Result<bool, String>> =
        garbage.into_iter().flat_map(|h| h.join().expect("garbage thread")).collect();
    let flood_ms = flood_start.elapsed().as_millis();
    let still_running = child.try_wait().expect("try_wait").is_none();

    let deadline = Instant::now() + Duration::from_secs(240);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the migration under flood did not finish within 240 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = child.wait_with_output().expect("migrate");
    let migrated_ms = flood_start.elapsed().as_millis();
    assert!(o.status.success(), "the migration under flood failed: {}", text(&o));
    assert_eq!(lab.running_on("g"), ["host2"]);

    // The silent connections are dropped by the handshake timeout.
    let mut idle_closed = 0;
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
        let mut b = [0u8; 16];
        if matches!(s.read(&mut b), Ok(0) | Err(_)) {
            idle_closed += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");

    let garbage_refused = garbage.iter().filter(|r| matches!(r, Ok(true))).count();
    let counts = &tls_result["counts"];
    let tls_refused: u64 = ["refused_cert_required", "refused_protocol", "refused_other", "closed"]
        .iter()
        .map(|k| counts[k].as_u64().unwrap_or(0))
        .sum();
    eprintln!(
        "flood: {} ms for 1000 connections (migration still running at its end: {still_running}); migration done {} ms after the flood began; garbage refused {garbage_refused}/400; \
         TLS {tls_result}; idle closed {idle_closed}/100; max agent RSS {} KiB",
        flood_ms,
        migrated_ms,
        max_rss.load(Ordering::Relaxed)
    );
    assert_eq!(garbage_refused, 400, "garbage connections got more than a TLS alert: {garbage:?}");
    assert_eq!(
        counts["answered"].as_u64(),
        Some(0),
        "a TLS client without a certificate got application data: {tls_result}"
    );
    assert_eq!(tls_refused, 500, "{tls_result}");
    assert!(
        counts["refused_cert_required"].as_u64().unwrap_or(0) >= 400,
        "TLS 1.3 clients without a certificate were not refused for it: {tls_result}"
    );
    assert_eq!(idle_closed, 100, "silent connections were not dropped by the handshake timeout");
    assert!(
        max_rss.load(Ordering::Relaxed) < 200 * 1024,
        "agent RSS grew to {} KiB",
        max_rss.load(Ordering::Relaxed)
    );
    assert!(lab.agent_alive_and_answers("host2"));
    // Every one was refused before any Ferry parser: the agent logs each
    // as a refused connection, at the TLS layer.
    let agent_text = std::fs::read(&h2.log).unwrap_or_default();
    let new = String::from_utf8_lossy(&agent_text[log_before as usize..]).into_owned();
    let refused = new.lines().filter(|l| l.contains("connection refused")).count();
    let tls_layer = new
        .lines()
        .filter(|l| {
            l.contains("connection refused")
                && (l.contains("TLS handshake") || l.contains("certificate"))
        })
        .count();
    eprintln!("host2 logged {refused} refused connections (rate-limited), {tls_layer} of them at the TLS layer");
    assert!(refused >= 1, "host2 logged no refused connection");
    assert_eq!(refused, tls_layer, "some connections were refused after the TLS handshake");
    // Each one is counted, though peers cannot flood the log.
    let failures = metric(&scrape(h2.metrics), "ferry_tls_handshake_failures_total");
    assert!(failures >= 1000, "host2 counted only {failures} failed handshakes");
    assert!(!new.contains("panicked"));
    assert_guest_runs(&PathBuf::from(lab.vms("host2")[0]["console_log"].as_str().expect("log")));
    assert_memory_consistent(&log);
    eprintln!("whole test {} ms", t0.elapsed().as_millis());
}
