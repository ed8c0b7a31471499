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

// ------------------------------------------------------------------------
// A rogue source (tests/attacks.rs, tests/replay.rs): the test itself plays
// a lab host, with that host's real certificate, key, TPM and AK, and speaks
// the peer protocol by hand, so it can send what a real agent never would.

/// A frame as the wire carries it: kind, three reserved bytes, u32 length.
pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![kind, 0, 0, 0];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A control frame holding `v` as JSON.
pub fn control(v: &Value) -> Vec<u8> {
    frame(1, v.to_string().as_bytes())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64
}

/// A connection to `to_host`'s agent as `as_host` (blocking API; it owns a
/// small tokio runtime). The migration id starts fresh and may be replaced
/// with [`RogueSource::set_migration_id`] before [`RogueSource::attest`].
pub struct RogueSource {
    pub as_host: String,
    pub to_host: String,
    /// TLS exporter of this connection (label `EXPORTER-ferry-attestation`).
    pub exporter: [u8; 32],
    pub id: ferry_types::MigrationId,
    /// The destination's answer to our Attest, once [`RogueSource::attest`] ran.
    pub peer_attest: Option<Value>,
    tcti: String,
    ak: PathBuf,
    selection: Vec<u8>,
    signer: ferry_audit::Signer,
    reader: ferry_agent::client::Reader,
    writer: ferry_agent::client::Writer,
    // Declared last: dropped after the connection it drives.
    rt: tokio::runtime::Runtime,
}

impl RogueSource {
    /// mTLS (as `as_host`, checking that the peer is `to_host`) and the
    /// protocol greeting. Err carries the error chain (e.g. a refused handshake).
    pub fn connect(lab: &TestLab, as_host: &str, to_host: &str) -> Result<RogueSource, String> {
        let me = lab.host(as_host);
        let peer = lab.host(to_host);
        let tpm = me.tpm.as_ref().ok_or_else(|| format!("{as_host} has no TPM in this lab"))?;
        let refs_path = lab.lab.reference_values.as_ref().ok_or("the lab has no reference values")?;
        let refs = ferry_attest::ReferenceValues::load(refs_path).map_err(|e| ferry_agent::chain(&e))?;
        let selection = refs.selection_for(&me.name).unwrap_or_else(|| ferry_attest::DEFAULT_PCR_SELECTION.to_vec());
        let signer = ferry_audit::Signer::load(&me.cert, &me.key).map_err(|e| ferry_agent::chain(&e))?;
        let identity = ferry_identity::Identity::load(&me.cert, &me.key, &lab.lab.ca, Some(&lab.lab.crl)).map_err(|e| ferry_agent::chain(&e))?;
        let domain = identity.domain().clone();
        let cfg = ferry_identity::client_config(&identity).map_err(|e| ferry_agent::chain(&e))?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let (addr, name) = (peer.addr, peer.name.clone());
        let (exporter, reader, writer) = rt.block_on(async move {
            let timeout = Duration::from_secs(10);
            let (stream, _) = ferry_agent::client::connect(addr, &name, cfg, &domain, timeout).await.map_err(|e| ferry_agent::chain(&e))?;
            let exporter = ferry_identity::channel_binding(stream.get_ref().1, ferry_agent::protocol::BINDING_LABEL, b"")
                .map_err(|e| ferry_agent::chain(&e))?;
            let (mut reader, writer) = ferry_agent::client::greet(stream, &name, addr, timeout).await.map_err(|e| ferry_agent::chain(&e))?;
            reader.set_timeout(Duration::from_secs(60));
            Ok::<_, String>((exporter, reader, writer))
        })?;
        Ok(RogueSource {
            as_host: as_host.to_owned(),
            to_host: to_host.to_owned(),
            exporter,
            id: ferry_types::MigrationId::new(),
            peer_attest: None,
            tcti: tpm.tcti.clone(),
            ak: tpm.ak.clone(),
            selection,
            signer,
            reader,
            writer,
            rt,
        })
    }

    pub fn set_migration_id(&mut self, id: ferry_types::MigrationId) {
        self.id = id;
    }

    pub fn set_read_timeout(&mut self, t: Duration) {
        self.reader.set_timeout(t);
    }

    /// `offer_binding(exporter, id)` of this connection for the current id.
    pub fn binding(&self) -> ferry_types::Digest32 {
        ferry_agent::protocol::offer_binding(&self.exporter, &self.id)
    }

    /// A real quote by `as_host`'s TPM and AK, bound to this connection,
    /// the current migration id and `role`.
    pub fn quote(&self, role: ferry_attest::QuoteRole) -> Result<ferry_attest::Evidence, String> {
        let qd = ferry_attest::qualifying_data(&self.exporter, &self.id, role);
        let ak = ferry_attest::AkBlob::load(&self.ak).map_err(|e| ferry_agent::chain(&e))?;
        let mut attester = ferry_attest::Attester::open(&self.tcti, &ak).map_err(|e| ferry_agent::chain(&e))?;
        attester.quote(&self.selection, &qd).map_err(|e| ferry_agent::chain(&e))
    }

    /// Step 3 as a source: send a real quote, read the destination's answer.
    /// Ok(its Attest message); Err if it answered anything else or closed.
    pub fn attest(&mut self) -> Result<Value, String> {
        let evidence = self.quote(ferry_attest::QuoteRole::Source)?;
        let msg = ferry_agent::protocol::PeerMessage::Attest { migration_id: self.id, evidence: Some(evidence) };
        self.send(&serde_json::to_value(&msg).expect("attest json"))?;
        let answer = self.read()?;
        if answer["type"] != "attest" || answer["migration_id"] != json_str(&self.id) {
            return Err(format!("the destination answered our quote with {answer}"));
        }
        self.peer_attest = Some(answer.clone());
        Ok(answer)
    }

    /// A valid Offer body (as `evidence::OfferBody`) for VM `vm` from this
    /// connection's host to its peer: current id, this connection's binding.
    pub fn offer_body(&self, vm: &str) -> Value {
        let body = serde_json::json!({
            "migration_id": json_str(&self.id),
            "source": self.as_host,
            "destination": self.to_host,
            "vm": vm,
            "channel_binding": self.binding(),
            "log_head": {"seq": 0, "hash": "0".repeat(64)},
            "spec": {"name": vm, "memory_mib": 256, "vcpus": 1, "machine": "q35",
                     "boot": {"type": "kernel", "kernel": "ferry-guest.elf", "cmdline": "fill_mib=8 hb_ms=10"}},
            "labels": {"tenant": "default", "security_level": 0, "allowed_zones": [], "anti_affinity": []},
            "not_after_unix_ms": unix_ms() + 60_000,
        });
        let typed: ferry_agent::evidence::OfferBody = serde_json::from_value(body.clone()).expect("offer_body is an OfferBody");
        drop(typed);
        body
    }

    /// A Commit/Receipt body (`evidence::StreamBody`) with the address of `offer`.
    pub fn stream_body(&self, offer: &Value, bytes: u64, digest: ferry_types::Digest32) -> Value {
        serde_json::json!({
            "migration_id": offer["migration_id"], "source": offer["source"], "destination": offer["destination"],
            "vm": offer["vm"], "channel_binding": offer["channel_binding"],
            "log_head": {"seq": 0, "hash": "0".repeat(64)}, "bytes": bytes, "digest": digest,
        })
    }

    /// Sign `body` as `kind` with `as_host`'s key (bound to its certificate).
    pub fn sign(&self, kind: &str, body: &impl serde::Serialize) -> ferry_audit::Signed {
        ferry_audit::Signed::sign(kind, body, &self.signer).expect("sign")
    }

    /// Send `PeerMessage::Offer { signed }` over `body`, signed by this host.
    pub fn send_offer(&mut self, body: Value) -> Result<ferry_audit::Signed, String> {
        self.send_signed("offer", &body)
    }

    /// Sign `body` as `kind` and send it as the message of that kind
    /// (`offer`, `accept`, `commit`, `receipt`; `abort` with a reason).
    pub fn send_signed(&mut self, kind: &str, body: &impl serde::Serialize) -> Result<ferry_audit::Signed, String> {
        let signed = self.sign(kind, body);
        self.send_signed_message(kind, &signed)?;
        Ok(signed)
    }

    /// Send an already signed message (e.g. a recorded one) as `kind`.
    pub fn send_signed_message(&mut self, kind: &str, signed: &ferry_audit::Signed) -> Result<(), String> {
        let signed_json = serde_json::to_value(signed).expect("signed json");
        let msg = if kind == "abort" {
            serde_json::json!({"type": "abort", "migration_id": json_str(&self.id), "reason": "rogue abort", "signed": signed_json})
        } else {
            serde_json::json!({"type": kind, "signed": signed_json})
        };
        self.send(&msg)
    }

    /// Send one control message (any JSON: the agent decides if it is one).
    pub fn send(&mut self, msg: &Value) -> Result<(), String> {
        let w = &mut self.writer;
        self.rt.block_on(w.write_control(msg)).map_err(|e| ferry_agent::chain(&e))
    }

    /// Write raw bytes (frames or not) and flush.
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let w = self.writer.get_mut();
        self.rt.block_on(async {
            w.write_all(bytes).await?;
            w.flush().await
        })
        .map_err(|e| e.to_string())
    }

    /// Close our sending side (TLS close_notify).
    pub fn close_write(&mut self) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let w = self.writer.get_mut();
        self.rt.block_on(w.shutdown()).map_err(|e| e.to_string())
    }

    /// Read one control message as JSON.
    pub fn read(&mut self) -> Result<Value, String> {
        let r = &mut self.reader;
        self.rt.block_on(r.read_control::<Value>()).map_err(|e| ferry_agent::chain(&e))
    }

    /// Read until the agent closes the connection (or the read times out):
    /// (every message received, the error that ended the reading).
    pub fn read_until_closed(&mut self) -> (Vec<Value>, String) {
        let mut got = Vec::new();
        loop {
            match self.read() {
                Ok(v) => got.push(v),
                Err(e) => return (got, e),
            }
        }
    }
}

fn json_str<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("json")
}

/// Append `section` (e.g. "[audit]\nlog = \"...\"") to a host's agent.toml.
pub fn append_config(lab: &TestLab, host: &str, section: &str) {
    let cfg = &lab.host(host).config;
    let mut s = std::fs::read_to_string(cfg).expect("cfg");
    let header = section.lines().next().unwrap_or("");
    assert!(!s.contains(header), "{} already has {header}", cfg.display());
    s.push('\n');
    s.push_str(section);
    s.push('\n');
    std::fs::write(cfg, s).expect("cfg");
}
