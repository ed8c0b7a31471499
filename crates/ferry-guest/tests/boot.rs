//! Boots the guest under real QEMU (TCG) and checks what it reports.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use ferry_guest::{parse_line, write_image, GuestLine, GuestParams, FILL_BASE, PAGE_MAGIC};

/// Generous: a loaded CI machine runs several TCG guests at once.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A running QEMU whose serial output arrives line by line; killed on drop,
/// so a failing assertion never leaves a guest spinning.
struct Qemu {
    child: Child,
    lines: Receiver<String>,
    /// Everything seen so far, for failure messages.
    seen: Vec<String>,
    deadline: Instant,
    dir: tempfile::TempDir,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Forwards each line of `r` (prefixed) into `tx` until EOF.
fn pump(r: impl Read + Send + 'static, prefix: &'static str, tx: std::sync::mpsc::Sender<String>) {
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(format!("{prefix}{line}")).is_err() {
                break;
            }
        }
    });
}

impl Qemu {
    /// Boots the guest with `cmdline` in `mem_mib` MiB, serial on stdout and
    /// a QMP socket at [`Qemu::qmp_path`].
    fn boot(cmdline: &str, mem_mib: u32) -> Qemu {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("ferry-guest.elf");
        write_image(&image).expect("write image");
        let qmp = dir.path().join("qmp.sock");
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-machine", "q35", "-accel", "tcg", "-nodefaults", "-no-reboot"])
            .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
            .arg("-m")
            .arg(mem_mib.to_string())
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-kernel")
            .arg(&image)
            .arg("-append")
            .arg(cmdline)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qemu-system-x86_64");
        let (tx, lines) = channel();
        pump(child.stdout.take().expect("stdout"), "", tx.clone());
        pump(child.stderr.take().expect("stderr"), "qemu stderr: ", tx);
        Qemu { child, lines, seen: Vec::new(), deadline: Instant::now() + TIMEOUT, dir }
    }

    fn qmp_path(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    /// The next guest line; panics with the transcript on timeout or exit.
    fn next(&mut self, waiting_for: &str) -> GuestLine {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line.clone());
                let parsed = parse_line(&line);
                if let GuestLine::Other(s) = &parsed {
                    assert!(!s.starts_with("ERROR"), "guest failed: {s}");
                }
                parsed
            }
            Err(e) => {
                let why = match e {
                    RecvTimeoutError::Timeout => format!("timed out after {TIMEOUT:?}"),
                    RecvTimeoutError::Disconnected => "QEMU exited".to_string(),
                };
                let tail = self.seen.len().saturating_sub(30);
                panic!(
                    "{why} waiting for {waiting_for}; last output:\n{}",
                    self.seen[tail..].join("\n")
                );
            }
        }
    }

    /// Reads lines until `want` picks one, passing every line to `each` first.
    fn until<T>(
        &mut self,
        waiting_for: &str,
        mut each: impl FnMut(&GuestLine),
        mut want: impl FnMut(&GuestLine) -> Option<T>,
    ) -> T {
        loop {
            let line = self.next(waiting_for);
            each(&line);
            if let Some(t) = want(&line) {
                return t;
            }
        }
    }

    fn ready(&mut self) -> (u32, u32) {
        self.until(
            "READY",
            |_| {},
            |l| match l {
                GuestLine::Ready { fill_mib, pages } => Some((*fill_mib, *pages)),
                _ => None,
            },
        )
    }
}

/// Fails on any sign of corruption: for guests nobody corrupts on purpose.
fn no_corruption(l: &GuestLine) {
    match l {
        GuestLine::Corrupt { .. } | GuestLine::Sweep { errors: 1.., .. } => {
            panic!("unexpected corruption report: {l:?}")
        }
        _ => {}
    }
}

#[test]
fn boots_fills_sweeps_and_heartbeats() {
    let params = GuestParams {
        fill_mib: 32,
        dirty_pages_per_ms: 64,
        heartbeat_ms: 10,
        marker: None,
        tlb_flush: false,
        ..GuestParams::default()
    };
    let mut q = Qemu::boot(&params.cmdline(), 256);
    assert_eq!(q.ready(), (32, 32 * 256));

    q.until("a clean SWEEP", no_corruption, |l| match l {
        GuestLine::Sweep { pages, errors: 0, .. } => {
            assert_eq!(*pages, 32 * 256);
            Some(())
        }
        _ => None,
    });

    // Heartbeats: consecutive seqs, and dirtied grows by at most one tick's
    // worth per ms (less only if the host starved the vCPU).
    let per_hb = u64::from(params.dirty_pages_per_ms * params.heartbeat_ms);
    let mut last: Option<(u64, u64)> = None;
    let mut count = 0;
    let start = Instant::now();
    q.until("20 heartbeats", no_corruption, |l| {
        if let GuestLine::Heartbeat { seq, dirtied } = *l {
            if let Some((s, d)) = last {
                assert_eq!(seq, s + 1, "heartbeat seq gap");
                assert!(dirtied > d && dirtied - d <= per_hb, "dirtied {d} -> {dirtied}");
            }
            last = Some((seq, dirtied));
            count += 1;
        }
        (count == 20).then_some(())
    });
    // 19 intervals of 10 ms of virtual time: wall time can only be longer
    // (minus a little line buffering jitter).
    assert!(start.elapsed() >= Duration::from_millis(150), "{:?}", start.elapsed());
}

#[test]
fn detects_corruption_the_guest_injects() {
    // The guest flips one word deep inside page pages/2 after 300 ms: only
    // the full-page sweep can see it, so this proves the sweep can fail.
    let cmdline = format!(
        "{} corrupt_after_ms=300",
        GuestParams { fill_mib: 8, heartbeat_ms: 50, ..GuestParams::default() }.cmdline()
    );
    let mut q = Qemu::boot(&cmdline, 128);
    let (_, pages) = q.ready();
    let target = pages / 2;

    let mut clean_sweeps = 0;
    q.until(
        "INJECT",
        |l| {
            no_corruption(l);
            if let GuestLine::Sweep { .. } = l {
                clean_sweeps += 1;
            }
        },
        |l| match l {
            GuestLine::Other(s) if s.starts_with("INJECT") => {
                assert_eq!(*s, format!("INJECT page={target} word=100"));
                Some(())
            }
            _ => None,
        },
    );
    assert!(clean_sweeps > 0, "no clean sweep before the injection");

    let mut corrupt_seen = false;
    let mut bad_sweeps = 0;
    q.until(
        "two SWEEPs with errors=1",
        |l| {
            if let GuestLine::Corrupt { page } = *l {
                assert_eq!(page, target);
                assert!(!corrupt_seen, "CORRUPT must be printed once per page");
                corrupt_seen = true;
            }
        },
        |l| match l {
            // The first pass after INJECT may have passed the page already.
            GuestLine::Sweep { errors, .. } if *errors > 0 => {
                assert_eq!(*errors, 1);
                bad_sweeps += 1;
                (bad_sweeps == 2).then_some(())
            }
            _ => None,
        },
    );
    assert!(corrupt_seen, "no CORRUPT line for page {target}");
}

#[test]
fn refuses_fill_larger_than_ram() {
    let q = Qemu::boot("fill_mib=300", 256);
    match q.lines.recv_timeout(TIMEOUT) {
        Ok(line) => assert!(line.starts_with("ERROR fill_mib=300 exceeds RAM"), "{line}"),
        Err(e) => panic!("no ERROR line: {e}"),
    }
}

/// A minimal QMP exchange: send one command, return its reply line.
fn qmp(stream: &mut BufReader<UnixStream>, cmd: &str) -> String {
    stream.get_mut().write_all(cmd.as_bytes()).expect("qmp write");
    stream.get_mut().write_all(b"\n").expect("qmp write");
    let mut line = String::new();
    loop {
        line.clear();
        assert!(stream.read_line(&mut line).expect("qmp read") > 0, "QMP closed");
        // Skip asynchronous events; the reply carries "return" or "error".
        if line.contains("\"return\"") || line.contains("\"error\"") {
            assert!(line.contains("\"return\""), "QMP error for {cmd}: {line}");
            return line;
        }
    }
}

fn pmemsave(stream: &mut BufReader<UnixStream>, addr: u64, path: &Path) -> Vec<u32> {
    qmp(
        stream,
        &format!(
            r#"{{"execute":"pmemsave","arguments":{{"val":{addr},"size":4096,"filename":"{}"}}}}"#,
            path.display()
        ),
    );
    let bytes = std::fs::read(path).expect("read pmemsave dump");
    assert_eq!(bytes.len(), 4096);
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn host_sees_documented_page_layout_and_marker() {
    let params = GuestParams {
        fill_mib: 4,
        dirty_pages_per_ms: 0, // pages stay at generation 0
        heartbeat_ms: 100,
        marker: Some("FERRY-MARKER-7f3a".into()),
        tlb_flush: false,
        ..GuestParams::default()
    };
    let mut q = Qemu::boot(&params.cmdline(), 64);
    let (_, pages) = q.ready();

    let sock = UnixStream::connect(q.qmp_path()).expect("connect QMP");
    let mut qs = BufReader::new(sock);
    let mut greeting = String::new();
    qs.read_line(&mut greeting).expect("QMP greeting");
    assert!(greeting.contains("QMP"), "{greeting}");
    qmp(&mut qs, r#"{"execute":"qmp_capabilities"}"#);
    // Stop the vCPU so the dumps are a consistent snapshot.
    qmp(&mut qs, r#"{"execute":"stop"}"#);

    let dump = q.dir.path().join("page.bin");
    for p in [0, 1, pages - 1] {
        let w = pmemsave(&mut qs, FILL_BASE + u64::from(p) * 4096, &dump);
        assert_eq!(w[0], p ^ PAGE_MAGIC, "page {p} word 0");
        assert_eq!(w[1], 0, "page {p} generation");
        // The payload must defeat QEMU's zero-page detection and compression.
        assert!(w[3..].iter().all(|&x| x != 0), "page {p} has zero words");
        let mut distinct = w[3..].to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 1000, "page {p} is repetitive");
    }
    let w = pmemsave(&mut qs, FILL_BASE + u64::from(pages) * 4096, &dump);
    let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
    let marker = params.marker.as_deref().unwrap_or_default().as_bytes();
    assert!(bytes.windows(marker.len()).any(|win| win == marker), "marker page");
    assert_eq!(bytes[0..marker.len()], *marker);
}
