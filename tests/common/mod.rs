//! Shared helpers for whole-system tests: a real lab (CA, agents, QEMU) in a
//! temporary directory, driven through the real `ferry` binary.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_cli::console::{self, ConsoleLine};
use ferry_cli::lab::Lab;
use serde_json::Value;

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

pub struct TestLab {
    pub lab: Lab,
    pub dir: tempfile::TempDir,
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = Command::new(FERRY).args(["lab", "down", "--dir"]).arg(self.dir.path()).output();
    }
}

pub fn run(args: &[&str], env_cfg: Option<&Path>) -> Output {
    let mut c = Command::new(FERRY);
    c.args(args).stdin(Stdio::null());
    if let Some(cfg) = env_cfg {
        c.env("FERRY_CLIENT_CONFIG", cfg);
    }
    c.output().expect("run ferry")
}

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

impl TestLab {
    pub fn up(hosts: u32, bandwidth_mib_s: u64) -> TestLab {
        let dir = tempfile::Builder::new().prefix("ferry-e2e-").tempdir_in("/tmp").expect("tempdir");
        let o = run(
            &["lab", "up", "--json", "--hosts", &hosts.to_string(), "--max-bandwidth-mib-s", &bandwidth_mib_s.to_string(), "--dir", dir.path().to_str().expect("utf8")],
            None,
        );
        assert!(o.status.success(), "lab up failed: {}", text(&o));
        let lab: Lab = serde_json::from_slice(&o.stdout).expect("lab json");
        TestLab { lab, dir }
    }

    pub fn ferry(&self, args: &[&str]) -> Output {
        run(args, Some(&self.lab.client_config))
    }

    /// Run with --json; returns (success, parsed stdout).
    pub fn ferry_json(&self, args: &[&str]) -> (bool, Value) {
        let mut a = args.to_vec();
        a.push("--json");
        let o = self.ferry(&a);
        let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| Value::String(text(&o)));
        (o.status.success(), v)
    }

    pub fn host(&self, name: &str) -> &ferry_cli::lab::LabHost {
        self.lab.hosts.iter().find(|h| h.name.as_str() == name).expect("host")
    }

    /// Start the test guest. Under TCG the guest flushes its TLB entry before
    /// each dirtying write, to keep a QEMU 7.2 TCG defect that corrupts plain
    /// QEMU migrations too out of Ferry's tests (docs/known-issues.md).
    pub fn start_guest(&self, host: &str, vm: &str, memory_mib: u32, cmdline: &str) -> Value {
        let (ok, status) = self.ferry_json(&["status", "--host", host]);
        assert!(ok, "status of {host}: {status}");
        let cmdline = if status["accel"] == "tcg" { format!("{cmdline} tlbflush=1") } else { cmdline.to_owned() };
        let spec = serde_json::json!({
            "name": vm, "memory_mib": memory_mib, "vcpus": 1, "machine": "q35",
            "boot": {"type": "kernel", "kernel": "ferry-guest.elf", "cmdline": cmdline},
        });
        let path = self.dir.path().join(format!("{vm}.spec.json"));
        std::fs::write(&path, spec.to_string()).expect("write spec");
        let (ok, v) = self.ferry_json(&["vm", "start", "--host", host, "--spec", path.to_str().expect("utf8")]);
        assert!(ok, "vm start failed: {v}");
        let log = PathBuf::from(v["console_log"].as_str().expect("console_log"));
        wait_console(&log, Duration::from_secs(120), "READY and a clean sweep", |l| console::is_ready(l) && console::clean_sweeps(l) >= 1);
        v
    }

    pub fn vms(&self, host: &str) -> Vec<Value> {
        let (ok, v) = self.ferry_json(&["vm", "list", "--host", host]);
        assert!(ok, "vm list on {host} failed: {v}");
        v["vms"].as_array().cloned().unwrap_or_default()
    }

    pub fn vm_state(&self, host: &str, vm: &str) -> Option<String> {
        self.vms(host).iter().find(|v| v["name"] == vm).map(|v| v["state"].as_str().unwrap_or("").to_owned())
    }

    /// Hosts on which `vm` is running, as their agents report it.
    pub fn running_on(&self, vm: &str) -> Vec<String> {
        self.lab
            .hosts
            .iter()
            .filter(|h| agent_alive(h))
            .filter(|h| self.vm_state(h.name.as_str(), vm).as_deref() == Some("running"))
            .map(|h| h.name.to_string())
            .collect()
    }

    pub fn agent_pid(&self, host: &str) -> i32 {
        std::fs::read_to_string(&self.host(host).pid_file).expect("pid file").trim().parse().expect("pid")
    }

    pub fn kill_agent(&self, host: &str) {
        let pid = self.agent_pid(host);
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn start_agent(&self, host: &str) {
        let o = run(&["lab", "start", "--dir", self.dir.path().to_str().expect("utf8"), "--host", host], None);
        assert!(o.status.success(), "agent {host} did not restart: {}", text(&o));
    }

    pub fn restart_agent(&self, host: &str) {
        self.kill_agent(host);
        self.start_agent(host);
    }

    /// Replace text in a host's agent.toml.
    pub fn edit_config(&self, host: &str, from: &str, to: &str) {
        let p = &self.host(host).config;
        let s = std::fs::read_to_string(p).expect("config");
        assert!(s.contains(from), "{from:?} not in {}", p.display());
        std::fs::write(p, s.replace(from, to)).expect("write config");
    }

    pub fn console_lines(&self, vm_info: &Value) -> Vec<ConsoleLine> {
        console::read_console(Path::new(vm_info["console_log"].as_str().expect("console_log"))).expect("console")
    }
}

pub fn agent_alive(h: &ferry_cli::lab::LabHost) -> bool {
    std::fs::read_to_string(&h.pid_file).ok().and_then(|s| s.trim().parse().ok()).is_some_and(pid_alive)
}

pub fn pid_alive(pid: i32) -> bool {
    ferry_cli::lab::pid_alive(pid)
}

/// Live QEMU processes whose command line names this VM directory root.
pub fn live_qemus_under(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system") && cmd.contains(&needle) && pid_alive(pid) {
            out.push(pid);
        }
    }
    out
}

pub fn wait_console(log: &Path, timeout: Duration, what: &str, pred: impl Fn(&[ConsoleLine]) -> bool) -> Vec<ConsoleLine> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = console::read_console(log).expect("read console");
        if pred(&lines) {
            return lines;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what} in {}", log.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn heartbeats(lines: &[ConsoleLine]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| match l.line {
            ferry_guest::GuestLine::Heartbeat { seq, .. } => Some(seq),
            _ => None,
        })
        .collect()
}

/// Wait until the guest prints `n` more heartbeats: it is running.
pub fn assert_guest_runs(log: &Path) {
    let before = heartbeats(&console::read_console(log).expect("console")).last().copied().unwrap_or(0);
    wait_console(log, Duration::from_secs(20), "new heartbeats", |l| heartbeats(l).last().copied().unwrap_or(0) > before + 5);
}

/// A TCP proxy between the source and destination agents that the test
/// controls: it counts bytes and can cut the connection after N bytes
/// (source to destination) or stop relaying the destination's answers.
pub struct Proxy {
    pub addr: SocketAddr,
    pub up_bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

#[derive(Clone, Copy)]
pub enum ProxyMode {
    /// Close both directions after this many bytes upstream.
    CutAfter(u64),
    /// After this many bytes upstream, swallow everything downstream.
    MuteDownstreamAfter(u64),
}

impl Proxy {
    pub fn start(target: SocketAddr, mode: ProxyMode) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = l.local_addr().expect("addr");
        let up_bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (ub, st) = (up_bytes.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in l.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else { continue };
                let ub = ub.clone();
                let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                let ub2 = ub.clone();
                std::thread::spawn(move || pump(client, server, Some(ub), mode, true));
                std::thread::spawn(move || pump(s2, c2, Some(ub2), mode, false));
            }
        });
        Proxy { addr, up_bytes, stop }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, up: Option<Arc<AtomicU64>>, mode: ProxyMode, upstream: bool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let counter = up.as_ref().expect("counter");
        let so_far = if upstream { counter.fetch_add(n as u64, Ordering::Relaxed) + n as u64 } else { counter.load(Ordering::Relaxed) };
        match mode {
            ProxyMode::CutAfter(limit) if so_far > limit => break,
            ProxyMode::MuteDownstreamAfter(limit) if !upstream && so_far > limit => continue,
            _ => {}
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

// ------------------------------------------------------------------------
// Attack tooling (tests/attacks.rs): a man in the middle that can capture,
// flip a bit, truncate or stall; a plain QEMU pair; agent resource probes.

/// A direction through the [`Mitm`]: `Up` is source (TLS client) to
/// destination (TLS server), `Down` the other way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Up,
    Down,
}

/// What the [`Mitm`] does to each new connection (read at accept time, so a
/// test may change it between migrations without restarting anything).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tamper {
    /// Relay faithfully.
    None,
    /// XOR `mask` into the byte at `offset` of `dir`'s stream. The proxy
    /// follows TLS record framing and, if `offset` falls in a 5-byte record
    /// header or in a ChangeCipherSpec record, moves the flip to the first
    /// byte of the next record body, so the flip always lands in bytes the
    /// TLS peer must authenticate (the plaintext handshake's transcript, or
    /// AEAD ciphertext).
    FlipBit { dir: Dir, offset: u64, mask: u8 },
    /// Forward exactly `after` bytes upstream, then stop relaying in both
    /// directions (and stop reading, so TCP backpressure reaches the sender)
    /// while keeping both connections open.
    Stall { after: u64 },
    /// Forward exactly `after` bytes upstream, then half-close towards the
    /// destination (it sees a clean TCP FIN mid-record) and swallow the rest;
    /// the downstream direction keeps relaying.
    Truncate { after: u64 },
}

/// One TLS record seen by the [`Mitm`]: where it starts in its direction's
/// stream, its content type and its body length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordSeen {
    pub offset: u64,
    pub content_type: u8,
    pub len: u16,
}

/// What the [`Mitm`] did to the most recent connection, for assertions and
/// the test's own log.
#[derive(Clone, Debug, Default)]
pub struct MitmLog {
    /// Connections accepted so far.
    pub connections: u64,
    /// Per direction, the first [`MAX_RECORDS_LOGGED`] records.
    pub records_up: Vec<RecordSeen>,
    pub records_down: Vec<RecordSeen>,
    /// (direction, stream offset) of each bit actually flipped.
    pub flipped: Vec<(Dir, u64)>,
    /// When the last stall or truncation took effect.
    pub fault_at: Option<Instant>,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

pub const MAX_RECORDS_LOGGED: usize = 64;

/// A TCP man in the middle on loopback for attack tests.
pub struct Mitm {
    pub addr: SocketAddr,
    tamper: Arc<std::sync::Mutex<Tamper>>,
    log: Arc<std::sync::Mutex<MitmLog>>,
    stop: Arc<AtomicBool>,
    sockets: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Mitm {
    /// Relay to `target`. With `capture`, every byte relayed is appended to
    /// `<capture>.up` / `<capture>.down` (after tampering).
    pub fn start(target: SocketAddr, tamper: Tamper, capture: Option<PathBuf>) -> Mitm {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind mitm");
        let addr = l.local_addr().expect("addr");
        let tamper = Arc::new(std::sync::Mutex::new(tamper));
        let log = Arc::new(std::sync::Mutex::new(MitmLog::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(std::sync::Mutex::new(Vec::new()));
        let files = capture.map(|base| {
            let open = |sfx: &str| {
                let mut p = base.clone().into_os_string();
                p.push(sfx);
                Arc::new(std::sync::Mutex::new(std::fs::File::create(p).expect("capture file")))
            };
            (open(".up"), open(".down"))
        });
        let (t, lg, st, socks) = (tamper.clone(), log.clone(), stop.clone(), sockets.clone());
        std::thread::spawn(move || {
            for client in l.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else { continue };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let mode = *t.lock().expect("tamper");
                {
                    let mut g = lg.lock().expect("log");
                    g.connections += 1;
                    g.records_up.clear();
                    g.records_down.clear();
                    g.flipped.clear();
                    g.fault_at = None;
                    g.bytes_up = 0;
                    g.bytes_down = 0;
                }
                {
                    let mut s = socks.lock().expect("sockets");
                    s.push(client.try_clone().expect("clone"));
                    s.push(server.try_clone().expect("clone"));
                }
                let stalled = Arc::new(AtomicBool::new(false));
                let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                let up = MitmPump {
                    dir: Dir::Up,
                    mode,
                    log: lg.clone(),
                    stop: st.clone(),
                    stalled: stalled.clone(),
                    capture: files.as_ref().map(|f| f.0.clone()),
                };
                let down = MitmPump { dir: Dir::Down, capture: files.as_ref().map(|f| f.1.clone()), ..up.clone() };
                std::thread::spawn(move || up.run(client, server));
                std::thread::spawn(move || down.run(s2, c2));
            }
        });
        Mitm { addr, tamper, log, stop, sockets }
    }

    pub fn set_tamper(&self, t: Tamper) {
        *self.tamper.lock().expect("tamper") = t;
    }

    pub fn log(&self) -> MitmLog {
        self.log.lock().expect("log").clone()
    }

    /// Close every relayed connection (both sides see the TCP connection end).
    pub fn close_all(&self) {
        for s in self.sockets.lock().expect("sockets").drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Mitm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.close_all();
        let _ = TcpStream::connect(self.addr);
    }
}

#[derive(Clone)]
struct MitmPump {
    dir: Dir,
    mode: Tamper,
    log: Arc<std::sync::Mutex<MitmLog>>,
    stop: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    capture: Option<Arc<std::sync::Mutex<std::fs::File>>>,
}

/// Follows TLS record framing over one direction of a stream.
#[derive(Default)]
struct RecordTracker {
    pos: u64,
    header: [u8; 5],
    header_got: usize,
    body_left: u64,
    body_type: u8,
}

impl MitmPump {
    fn run(self, mut from: TcpStream, mut to: TcpStream) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut tracker = RecordTracker::default();
        let mut pos: u64 = 0;
        let mut flip_pending = matches!(self.mode, Tamper::FlipBit { dir, .. } if dir == self.dir);
        let mut cut = false;
        loop {
            if self.stalled.load(Ordering::Relaxed) {
                // Hold both sockets open and read nothing until the test ends.
                while !self.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                return;
            }
            let mut n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if self.stalled.load(Ordering::Relaxed) {
                continue;
            }
            if cut {
                continue; // truncated: swallow
            }
            let limit = match self.mode {
                Tamper::Stall { after } | Tamper::Truncate { after } if self.dir == Dir::Up => Some(after),
                _ => None,
            };
            let mut fault_now = false;
            if let Some(after) = limit {
                if pos + n as u64 >= after {
                    n = (after - pos) as usize;
                    fault_now = true;
                }
            }
            let chunk = &mut buf[..n];
            let (target, mask) = match self.mode {
                Tamper::FlipBit { offset, mask, .. } if flip_pending => (Some(offset), mask),
                _ => (None, 0),
            };
            if let Some(i) = tracker.walk(chunk, target, &self.log, self.dir) {
                chunk[i] ^= mask;
                flip_pending = false;
                self.log.lock().expect("log").flipped.push((self.dir, pos + i as u64));
            }
            if let Some(f) = &self.capture {
                let _ = f.lock().expect("capture").write_all(chunk);
            }
            if to.write_all(chunk).is_err() {
                break;
            }
            pos += n as u64;
            {
                let mut g = self.log.lock().expect("log");
                match self.dir {
                    Dir::Up => g.bytes_up += n as u64,
                    Dir::Down => g.bytes_down += n as u64,
                }
            }
            if fault_now {
                self.log.lock().expect("log").fault_at = Some(Instant::now());
                match self.mode {
                    Tamper::Stall { .. } => self.stalled.store(true, Ordering::Relaxed),
                    _ => {
                        let _ = to.shutdown(std::net::Shutdown::Write);
                        cut = true;
                    }
                }
            }
        }
        if self.stalled.load(Ordering::Relaxed) {
            while !self.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            return;
        }
        let _ = from.shutdown(std::net::Shutdown::Both);
        let _ = to.shutdown(std::net::Shutdown::Both);
    }
}

impl RecordTracker {
    /// Track TLS records through `chunk` (logging the first ones) and, with
    /// a `target`, return the index of the first byte at stream offset >=
    /// `target` that lies inside an authenticated record body.
    fn walk(&mut self, chunk: &[u8], target: Option<u64>, log: &std::sync::Mutex<MitmLog>, dir: Dir) -> Option<usize> {
        let mut i = 0usize;
        let mut found = None;
        while i < chunk.len() {
            if self.body_left > 0 {
                let take = (self.body_left as usize).min(chunk.len() - i);
                if found.is_none() && self.body_type != 0x14 {
                    if let Some(t) = target {
                        let end = self.pos + take as u64;
                        if end > t {
                            let at = t.max(self.pos);
                            found = Some(i + (at - self.pos) as usize);
                        }
                    }
                }
                i += take;
                self.pos += take as u64;
                self.body_left -= take as u64;
            } else {
                self.header[self.header_got] = chunk[i];
                self.header_got += 1;
                i += 1;
                self.pos += 1;
                if self.header_got == 5 {
                    self.header_got = 0;
                    self.body_type = self.header[0];
                    let len = u16::from_be_bytes([self.header[3], self.header[4]]);
                    self.body_left = u64::from(len);
                    let mut g = log.lock().expect("log");
                    let list = match dir {
                        Dir::Up => &mut g.records_up,
                        Dir::Down => &mut g.records_down,
                    };
                    if list.len() < MAX_RECORDS_LOGGED {
                        list.push(RecordSeen { offset: self.pos - 5, content_type: self.body_type, len });
                    }
                }
            }
        }
        found
    }
}

/// Does the file contain `needle`? Streams it, so captures of any size work.
pub fn file_contains(path: &Path, needle: &[u8]) -> bool {
    assert!(!needle.is_empty());
    let mut f = std::fs::File::open(path).expect("open capture");
    let mut buf = vec![0u8; 4 << 20];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = f.read(&mut buf).expect("read capture");
        if n == 0 {
            return false;
        }
        let mut window = std::mem::take(&mut carry);
        window.extend_from_slice(&buf[..n]);
        let first = needle[0];
        let mut start = 0;
        while let Some(p) = window[start..].iter().position(|&b| b == first) {
            let at = start + p;
            if window.len() - at < needle.len() {
                break;
            }
            if &window[at..at + needle.len()] == needle {
                return true;
            }
            start = at + 1;
        }
        let keep = needle.len() - 1;
        carry = window[window.len().saturating_sub(keep)..].to_vec();
    }
}

/// Resident memory of a process in KiB (VmRSS), if it exists.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Append a `[migration]` table to a host's agent.toml (lab configs have none).
pub fn append_migration_config(lab: &TestLab, host: &str, settings: &str) {
    let cfg = &lab.host(host).config;
    let mut s = std::fs::read_to_string(cfg).expect("cfg");
    assert!(!s.contains("[migration]"), "{} already has a [migration] table", cfg.display());
    s.push_str("\n[migration]\n");
    s.push_str(settings);
    s.push('\n');
    std::fs::write(cfg, s).expect("cfg");
}

/// Point `host`'s [peers] entry for `peer` at `addr` (e.g. a Mitm).
pub fn route_peer_via(lab: &TestLab, host: &str, peer: &str, addr: SocketAddr) {
    let target = lab.host(peer).addr;
    lab.edit_config(host, &format!("{peer} = \"{target}\""), &format!("{peer} = \"{addr}\""));
}

/// A 128-bit hex token from the OS's randomness.
pub fn random_token() -> String {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).expect("urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A blocking QMP client for QEMU processes the test starts itself.
pub struct SyncQmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl SyncQmp {
    pub fn connect(path: &Path) -> SyncQmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "QMP {} never came up: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut q = SyncQmp { reader: std::io::BufReader::new(s.try_clone().expect("clone")), writer: s };
        let greeting = q.line();
        assert!(greeting.get("QMP").is_some(), "not a QMP greeting: {greeting}");
        q.cmd("qmp_capabilities", serde_json::json!({}));
        q
    }

    fn line(&mut self) -> Value {
        use std::io::BufRead;
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("QMP read");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad QMP line {l:?}: {e}"))
    }

    /// Run a command; panics on a QMP error.
    pub fn cmd(&mut self, execute: &str, arguments: Value) -> Value {
        let msg = serde_json::json!({"execute": execute, "arguments": arguments});
        writeln!(self.writer, "{msg}").expect("QMP write");
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            panic!("QMP {execute} failed: {v}");
        }
    }
}

/// A QEMU started by the test (not by an agent); killed on drop.
pub struct PlainQemu {
    pub child: std::process::Child,
    pub qmp: SyncQmp,
    pub serial: PathBuf,
}

impl PlainQemu {
    /// `qemu-system-x86_64` with the test guest, as scripts/bench.py starts it;
    /// `incoming` adds `-incoming defer -S`.
    pub fn start(dir: &Path, name: &str, memory_mib: u32, append: &str, incoming: bool) -> PlainQemu {
        let kernel = dir.join("ferry-guest.elf");
        if !kernel.exists() {
            ferry_guest::write_image(&kernel).expect("guest image");
        }
        let qmp_path = dir.join(format!("{name}.qmp"));
        let serial = dir.join(format!("{name}.serial"));
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", &memory_mib.to_string()])
            .args(["-display", "none", "-nodefaults", "-no-user-config"])
            .arg("-kernel")
            .arg(&kernel)
            .args(["-append", append])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if incoming {
            c.args(["-incoming", "defer", "-S"]);
        }
        let child = c.spawn().expect("spawn qemu-system-x86_64");
        let qmp = SyncQmp::connect(&qmp_path);
        PlainQemu { child, qmp, serial }
    }

    pub fn serial_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }
}

impl Drop for PlainQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET /metrics from an agent's Prometheus listener.
pub fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of one sample line (exact series name with labels).
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse::<f64>().ok()))
        .map(|v| v as u64)
        .unwrap_or(0)
}
