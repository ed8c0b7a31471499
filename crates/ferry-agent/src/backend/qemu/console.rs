//! Each VM's console: the guest's serial output, timestamped per line, in
//! `console.log` beside the VM (operators read it; tests measure the guest's
//! blackout from it).
//!
//! PERF: the logger is an OS thread of its own, named `ferry-console`, off
//! the async runtime, so that its CPU shows apart from the data path's in
//! per-thread accounting (scripts/bench.py reports it separately). QEMU's
//! serial port writes the socket one byte at a time; the thread reads what
//! has arrived at most once per [`READ_PACE`] (the test guest prints a
//! heartbeat every millisecond) and appends every line it completed with one
//! `write`, instead of waking for each byte and writing each line: 36 µs of
//! CPU per heartbeat line instead of 90 (BENCHMARKS.md, issue 16).

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::records::now_unix_ms;

pub const CONSOLE_LOG: &str = "console.log";
/// Longest console line kept; longer lines are cut (a guest controls them).
const MAX_CONSOLE_LINE: usize = 4096;
/// A console log past this size is rotated to `console.log.1` (one
/// generation kept), so a chatty guest cannot fill the host's disk.
const MAX_CONSOLE_LOG: u64 = 64 << 20;
/// Shortest time between two reads of the console socket: a line's
/// timestamp is the time its end was read, so it is at most this late.
const READ_PACE: Duration = Duration::from_millis(1);
/// Largest read from the console socket.
const READ_CHUNK: usize = 64 * 1024;
/// Connections tried (QEMU's socket chardev takes one client, and is not
/// listening yet right after launch), and the wait between them.
const CONNECTS: usize = 50;
const RECONNECT_WAIT: Duration = Duration::from_millis(100);

/// A running console logger; dropping it stops the thread.
pub(crate) struct ConsoleLogger {
    shared: Arc<Shared>,
}

struct Shared {
    stopped: AtomicBool,
    /// The connection being read, so that a stop can end a blocked read.
    reading: Mutex<Option<UnixStream>>,
}

impl ConsoleLogger {
    /// Copy the guest's serial output at `socket` to `log`, one
    /// `<unix_ms> <line>` per line, reconnecting while QEMU lives.
    pub(crate) fn start(socket: PathBuf, log: PathBuf) -> Self {
        let shared =
            Arc::new(Shared { stopped: AtomicBool::new(false), reading: Mutex::new(None) });
        let thread_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("ferry-console".into())
            .spawn(move || run(&thread_shared, &socket, &log));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the console logger thread");
        }
        Self { shared }
    }
}

impl Drop for ConsoleLogger {
    fn drop(&mut self) {
        // Under the lock, so the thread cannot store a new connection after
        // this (it checks `stopped` under the same lock).
        let reading = self.shared.reading.lock().unwrap_or_else(|e| e.into_inner());
        self.shared.stopped.store(true, Ordering::SeqCst);
        if let Some(stream) = reading.as_ref() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn run(shared: &Shared, socket: &Path, log: &Path) {
    let mut out = match ConsoleFile::open(log) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(log = %log.display(), error = %e, "cannot open console log");
            return;
        }
    };
    for _ in 0..CONNECTS {
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = UnixStream::connect(socket) else {
            std::thread::sleep(RECONNECT_WAIT);
            continue;
        };
        {
            let mut reading = shared.reading.lock().unwrap_or_else(|e| e.into_inner());
            if shared.stopped.load(Ordering::SeqCst) {
                return;
            }
            *reading = stream.try_clone().ok();
        }
        let copied = copy_lines(stream, &mut out);
        *shared.reading.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if copied.is_err() {
            return;
        }
        // QEMU closed the socket: it is quitting, or will accept us again.
        std::thread::sleep(RECONNECT_WAIT);
    }
}

/// Copy one connection's lines until it ends; an error means the log
/// cannot be written.
fn copy_lines(mut stream: UnixStream, out: &mut ConsoleFile) -> std::io::Result<()> {
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut lines = LineStamper::default();
    let mut entries = Vec::with_capacity(READ_CHUNK);
    loop {
        let began = Instant::now();
        let n = match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        entries.clear();
        lines.push(&chunk[..n], now_unix_ms(), &mut entries);
        out.append(&entries)?;
        // Let the next bytes gather instead of waking for each one.
        if let Some(rest) = READ_PACE.checked_sub(began.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    entries.clear();
    lines.finish(now_unix_ms(), &mut entries);
    out.append(&entries)
}

/// The console log file, rotated past [`MAX_CONSOLE_LOG`].
struct ConsoleFile {
    path: PathBuf,
    file: std::fs::File,
    written: u64,
}

impl ConsoleFile {
    fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok(Self { path: path.to_owned(), file, written })
    }

    fn append(&mut self, entries: &[u8]) -> std::io::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        self.file.write_all(entries)?;
        self.written += entries.len() as u64;
        if self.written > MAX_CONSOLE_LOG {
            let _ = std::fs::rename(&self.path, self.path.with_extension("log.1"));
            *self = Self::open(&self.path)?;
        }
        Ok(())
    }
}

/// Turns the console's bytes into log entries, `<unix_ms> <line>\n` each,
/// stamped with the time the line's end arrived.
#[derive(Default)]
struct LineStamper {
    /// The start of a line whose end has not arrived yet.
    pending: Vec<u8>,
}

impl LineStamper {
    /// Add `bytes` read at `unix_ms`; every line they complete goes to `out`.
    fn push(&mut self, mut bytes: &[u8], unix_ms: u64, out: &mut Vec<u8>) {
        while !bytes.is_empty() {
            let room = MAX_CONSOLE_LINE - self.pending.len();
            let take = bytes.len().min(room);
            match bytes[..take].iter().position(|&b| b == b'\n') {
                Some(end) => {
                    self.pending.extend_from_slice(&bytes[..end]);
                    entry(&self.pending, true, unix_ms, out);
                    self.pending.clear();
                    bytes = &bytes[end + 1..];
                }
                None => {
                    self.pending.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if self.pending.len() == MAX_CONSOLE_LINE {
                        entry(&self.pending, false, unix_ms, out);
                        self.pending.clear();
                    }
                }
            }
        }
    }

    /// The console ended: a line cut short goes out marked as such.
    fn finish(&mut self, unix_ms: u64, out: &mut Vec<u8>) {
        if !self.pending.is_empty() {
            entry(&self.pending, false, unix_ms, out);
            self.pending.clear();
        }
    }
}

/// A line cut short (QEMU quit mid-line, or the line is over the cap) is
/// marked, so nobody mistakes its prefix for a whole line.
fn entry(line: &[u8], complete: bool, unix_ms: u64, out: &mut Vec<u8>) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\r');
    let mark = if complete { "" } else { "[partial] " };
    // Writing to a Vec cannot fail.
    let _ = writeln!(out, "{unix_ms} {mark}{text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(chunks: &[(&[u8], u64)], end: Option<u64>) -> String {
        let mut s = LineStamper::default();
        let mut out = Vec::new();
        for (bytes, ms) in chunks {
            s.push(bytes, *ms, &mut out);
        }
        if let Some(ms) = end {
            s.finish(ms, &mut out);
        }
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn each_line_carries_the_time_its_end_arrived() {
        let got = stamp(&[(b"HB se", 10), (b"q=1\nHB seq=2\nHB", 11), (b" seq=3\r\n", 12)], None);
        assert_eq!(got, "11 HB seq=1\n11 HB seq=2\n12 HB seq=3\n");
    }

    #[test]
    fn a_line_over_the_cap_is_cut_and_marked() {
        let long = vec![b'x'; MAX_CONSOLE_LINE + 10];
        let mut bytes = long.clone();
        bytes.push(b'\n');
        let got = stamp(&[(&bytes, 5)], None);
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], format!("5 [partial] {}", "x".repeat(MAX_CONSOLE_LINE)));
        assert_eq!(lines[1], "5 xxxxxxxxxx");
    }

    #[test]
    fn a_line_the_console_cut_short_is_marked() {
        assert_eq!(stamp(&[(b"READY\nHB s", 1)], Some(2)), "1 READY\n2 [partial] HB s\n");
        assert_eq!(stamp(&[(b"READY\n", 1)], Some(2)), "1 READY\n");
    }

    #[test]
    fn invalid_utf8_is_replaced_not_dropped() {
        assert_eq!(stamp(&[(b"a\xffb\n", 3)], None), "3 a\u{fffd}b\n");
    }

    #[test]
    fn the_log_rotates_past_its_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(CONSOLE_LOG);
        let mut f = ConsoleFile::open(&path).expect("open");
        f.written = MAX_CONSOLE_LOG;
        f.append(b"1 over\n").expect("append");
        f.append(b"2 after\n").expect("append");
        let old = std::fs::read_to_string(path.with_extension("log.1")).expect("rotated");
        assert_eq!(old, "1 over\n");
        assert_eq!(std::fs::read_to_string(&path).expect("log"), "2 after\n");
    }

    /// The thread logs a real socket's lines and stops when dropped, even
    /// while its read is blocked.
    #[test]
    fn logs_a_socket_and_stops_when_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("serial.sock");
        let log = dir.path().join(CONSOLE_LOG);
        let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        let logger = ConsoleLogger::start(sock, log.clone());
        let (mut qemu, _) = listener.accept().expect("accept");
        for b in b"READY\nHB seq=1\n" {
            qemu.write_all(&[*b]).expect("write");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.lines().count() == 2 || Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text:?}");
        assert!(lines[0].ends_with(" READY") && lines[1].ends_with(" HB seq=1"), "{text:?}");
        drop(logger);
        // The logger's end of the connection closes: a read here sees EOF.
        qemu.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut buf = [0u8; 1];
        assert_eq!(qemu.read(&mut buf).expect("read"), 0);
    }
}
