//! A TCP man in the middle for attack tests: capture, flip, cut, stall.
#![allow(unused_imports)]
use super::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// XOR `mask` into the first body byte of the first application-data
    /// record whose body length is within `len` (inclusive) and that follows
    /// one whose body is `after_len` bytes long. The source's Commit is such
    /// a record: it follows the 25-byte record of the end-of-data frame, and
    /// its length is learnt from an untampered migration's `tail_up`.
    FlipAfterRecord { dir: Dir, after_len: u16, len: (u16, u16), mask: u8 },
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
    /// The last [`TAIL_RECORDS`] upstream records of the latest connection
    /// that carried any.
    pub tail_up: Vec<RecordSeen>,
    /// (direction, stream offset) of each bit actually flipped since the
    /// tamper mode was last set, on any connection.
    pub flipped: Vec<(Dir, u64)>,
    /// For each entry of `flipped`, the connection it was flipped on: its
    /// number in accept order (1 is the first `connections` counted).
    pub flipped_on: Vec<u64>,
    /// When the last stall or truncation took effect.
    pub fault_at: Option<Instant>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Accepted connections the destination refused (the client was dropped).
    pub upstream_refused: Vec<String>,
}

pub const MAX_RECORDS_LOGGED: usize = 64;
pub const TAIL_RECORDS: usize = 8;

/// A TCP man in the middle on loopback for attack tests.
pub struct Mitm {
    pub addr: SocketAddr,
    tamper: Arc<std::sync::Mutex<Tamper>>,
    log: Arc<std::sync::Mutex<MitmLog>>,
    stop: Arc<AtomicBool>,
    sockets: Arc<std::sync::Mutex<Vec<TcpStream>>>,
    muted: Muted,
}

/// Connections whose downstream the [`Mitm`] swallows: (connection, from
/// the first application record at least this long; 0: everything now).
type Muted = Arc<std::sync::Mutex<Vec<(u64, u16)>>>;

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
        let muted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let files = capture.map(|base| {
            let open = |sfx: &str| {
                let mut p = base.clone().into_os_string();
                p.push(sfx);
                Arc::new(std::sync::Mutex::new(std::fs::File::create(p).expect("capture file")))
            };
            (open(".up"), open(".down"))
        });
        let (t, lg, st, socks) = (tamper.clone(), log.clone(), stop.clone(), sockets.clone());
        let mu = muted.clone();
        std::thread::spawn(move || {
            for client in l.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let server = match TcpStream::connect(target) {
                    Ok(s) => s,
                    Err(e) => {
                        lg.lock().expect("log").upstream_refused.push(e.to_string());
                        continue;
                    }
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let mode = *t.lock().expect("tamper");
                let connection = {
                    let mut g = lg.lock().expect("log");
                    g.connections += 1;
                    g.records_up.clear();
                    g.records_down.clear();
                    g.fault_at = None;
                    g.bytes_up = 0;
                    g.bytes_down = 0;
                    g.connections
                };
                {
                    let mut s = socks.lock().expect("sockets");
                    s.push(client.try_clone().expect("clone"));
                    s.push(server.try_clone().expect("clone"));
                }
                let stalled = Arc::new(AtomicBool::new(false));
                let (c2, s2) =
                    (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                let up = MitmPump {
                    dir: Dir::Up,
                    mode,
                    connection,
                    log: lg.clone(),
                    stop: st.clone(),
                    stalled: stalled.clone(),
                    muted: mu.clone(),
                    capture: files.as_ref().map(|f| f.0.clone()),
                };
                let down = MitmPump {
                    dir: Dir::Down,
                    capture: files.as_ref().map(|f| f.1.clone()),
                    ..up.clone()
                };
                std::thread::spawn(move || up.run(client, server));
                std::thread::spawn(move || down.run(s2, c2));
            }
        });
        Mitm { addr, tamper, log, stop, sockets, muted }
    }

    /// From now on, swallow whatever the destination sends on connection
    /// `connection` (its number in accept order), keeping it open: a reply
    /// lost on the way while both ends still wait.
    pub fn mute_down(&self, connection: u64) {
        self.muted.lock().expect("muted").push((connection, 0));
    }

    /// From now on, relay what the destination sends on `connection` up to
    /// the first TLS application record of at least `min_len` bytes, and
    /// swallow that record and everything after it (small control frames
    /// pass; a signed message, which carries a certificate, does not).
    pub fn mute_down_from_record(&self, connection: u64, min_len: u16) {
        self.muted.lock().expect("muted").push((connection, min_len));
    }

    /// Tamper with connections from now on; forgets the bits flipped before.
    pub fn set_tamper(&self, t: Tamper) {
        *self.tamper.lock().expect("tamper") = t;
        let mut g = self.log.lock().expect("log");
        g.flipped.clear();
        g.flipped_on.clear();
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
    connection: u64,
    log: Arc<std::sync::Mutex<MitmLog>>,
    stop: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    muted: Muted,
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
    /// FlipAfterRecord: (previous record's length, this record's length
    /// range), the last application record's length, and the body start of
    /// the record that matched.
    arm: Option<(u16, (u16, u16))>,
    prev_len: Option<u16>,
    armed_target: Option<u64>,
    tail: Vec<RecordSeen>,
    /// Mitm::mute_down_from_record: the length that cuts, and where in the
    /// last chunk walked the first such record began.
    cut_len: Option<u16>,
    cut_at: Option<usize>,
}

impl MitmPump {
    fn run(self, mut from: TcpStream, mut to: TcpStream) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut tracker = RecordTracker::default();
        let mut pos: u64 = 0;
        let mut flip_pending = matches!(self.mode, Tamper::FlipBit { dir, .. } | Tamper::FlipAfterRecord { dir, .. } if dir == self.dir);
        if let Tamper::FlipAfterRecord { after_len, len, .. } = self.mode {
            tracker.arm = Some((after_len, len));
        }
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
                Ok(0) if self.stalled.load(Ordering::Relaxed) => break,
                Ok(0) => {
                    // A half-close travels as one, and only in this
                    // direction: the peer may still answer (libvirt's
                    // streams end their data and wait for the other side).
                    let _ = to.shutdown(std::net::Shutdown::Write);
                    return;
                }
                Err(_) => break,
                Ok(n) => n,
            };
            if self.stalled.load(Ordering::Relaxed) {
                continue;
            }
            if cut {
                continue; // truncated: swallow
            }
            if self.dir == Dir::Down {
                let muted = self.muted.lock().expect("muted");
                match muted.iter().find(|m| m.0 == self.connection) {
                    Some((_, 0)) => continue,
                    Some(&(_, min_len)) => tracker.cut_len = Some(min_len),
                    None => {}
                }
            }
            let limit = match self.mode {
                Tamper::Stall { after } | Tamper::Truncate { after } if self.dir == Dir::Up => {
                    Some(after)
                }
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
                Tamper::FlipAfterRecord { mask, .. } if flip_pending => (None, mask),
                _ => (None, 0),
            };
            if let Some(i) = tracker.walk(chunk, target, &self.log, self.dir) {
                chunk[i] ^= mask;
                flip_pending = false;
                tracker.arm = None;
                tracker.armed_target = None;
                let mut g = self.log.lock().expect("log");
                g.flipped.push((self.dir, pos + i as u64));
                g.flipped_on.push(self.connection);
            }
            if let Some(at) = tracker.cut_at.take() {
                n = at;
                let mut muted = self.muted.lock().expect("muted");
                muted.retain(|m| m.0 != self.connection);
                muted.push((self.connection, 0));
            }
            let chunk = &chunk[..n];
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
        // A reset or a failed write: the connection is gone both ways.
        let _ = from.shutdown(std::net::Shutdown::Both);
        let _ = to.shutdown(std::net::Shutdown::Both);
    }
}

impl RecordTracker {
    /// Track TLS records through `chunk` (logging the first ones) and, with
    /// a `target`, return the index of the first byte at stream offset >=
    /// `target` that lies inside an authenticated record body.
    fn walk(
        &mut self,
        chunk: &[u8],
        target: Option<u64>,
        log: &std::sync::Mutex<MitmLog>,
        dir: Dir,
    ) -> Option<usize> {
        let mut i = 0usize;
        let mut found = None;
        while i < chunk.len() {
            if self.body_left > 0 {
                let take = (self.body_left as usize).min(chunk.len() - i);
                if found.is_none() && self.body_type != 0x14 {
                    if let Some(t) = target.or(self.armed_target) {
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
                    if self.body_type == 0x17 {
                        if self.cut_len.is_some_and(|min| len >= min) && self.cut_at.is_none() {
                            // (a header split across two reads: cut from this one's start)
                            self.cut_at = Some(i.saturating_sub(5));
                        }
                        if let Some((after, (lo, hi))) = self.arm {
                            let fits = (lo..=hi).contains(&len);
                            if self.prev_len == Some(after) && fits && self.armed_target.is_none() {
                                self.armed_target = Some(self.pos);
                            }
                        }
                        self.prev_len = Some(len);
                        if dir == Dir::Up {
                            self.tail.push(RecordSeen {
                                offset: self.pos - 5,
                                content_type: 0x17,
                                len,
                            });
                            if self.tail.len() > TAIL_RECORDS {
                                self.tail.remove(0);
                            }
                            log.lock().expect("log").tail_up = self.tail.clone();
                        }
                    }
                    let mut g = log.lock().expect("log");
                    let list = match dir {
                        Dir::Up => &mut g.records_up,
                        Dir::Down => &mut g.records_down,
                    };
                    if list.len() < MAX_RECORDS_LOGGED {
                        list.push(RecordSeen {
                            offset: self.pos - 5,
                            content_type: self.body_type,
                            len,
                        });
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
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
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

/// A 128-bit hex token from the OS's randomness.
pub fn random_token() -> String {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).expect("urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}
