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
        Self::up_with(hosts, bandwidth_mib_s, &[])
    }

    /// A lab with extra `ferry lab up` arguments (e.g. `--backend libvirt`).
    /// Hosts share loopback (these tests reach agents, metrics and proxies
    /// at 127.0.0.1) unless `extra` asks for `--netns`.
    pub fn up_with(hosts: u32, bandwidth_mib_s: u64, extra: &[&str]) -> TestLab {
        let dir =
            tempfile::Builder::new().prefix("ferry-e2e-").tempdir_in("/tmp").expect("tempdir");
        let (hosts, bandwidth) = (hosts.to_string(), bandwidth_mib_s.to_string());
        let mut args = vec!["lab", "up", "--json", "--hosts", &hosts];
        args.extend(["--max-bandwidth-mib-s", &bandwidth]);
        args.extend(["--dir", dir.path().to_str().expect("utf8")]);
        args.extend(extra);
        if !extra.contains(&"--netns") {
            args.push("--no-netns");
        }
        let o = run(&args, None);
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
        let cmdline = if status["accel"] == "tcg" {
            format!("{cmdline} tlbflush=1")
        } else {
            cmdline.to_owned()
        };
        let spec = serde_json::json!({
            "name": vm, "memory_mib": memory_mib, "vcpus": 1, "machine": "q35",
            "boot": {"type": "kernel", "kernel": "ferry-guest.elf", "cmdline": cmdline},
        });
        let path = self.dir.path().join(format!("{vm}.spec.json"));
        std::fs::write(&path, spec.to_string()).expect("write spec");
        let (ok, v) = self.ferry_json(&[
            "vm",
            "start",
            "--host",
            host,
            "--spec",
            path.to_str().expect("utf8"),
        ]);
        assert!(ok, "vm start failed: {v}");
        let log = PathBuf::from(v["console_log"].as_str().expect("console_log"));
        wait_console(&log, Duration::from_secs(120), "READY and a clean sweep", |l| {
            console::is_ready(l) && console::clean_sweeps(l) >= 1
        });
        v
    }

    pub fn vms(&self, host: &str) -> Vec<Value> {
        let (ok, v) = self.ferry_json(&["vm", "list", "--host", host]);
        assert!(ok, "vm list on {host} failed: {v}");
        v["vms"].as_array().cloned().unwrap_or_default()
    }

    pub fn vm_state(&self, host: &str, vm: &str) -> Option<String> {
        self.vms(host)
            .iter()
            .find(|v| v["name"] == vm)
            .map(|v| v["state"].as_str().unwrap_or("").to_owned())
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
        std::fs::read_to_string(&self.host(host).pid_file)
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid")
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
        let o = run(
            &["lab", "start", "--dir", self.dir.path().to_str().expect("utf8"), "--host", host],
            None,
        );
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

    /// The state of a host's only migration (null if it has none).
    pub fn only_migration_state(&self, host: &str) -> serde_json::Value {
        let (_, list) = self.ferry_json(&["migrations", "list", "--host", host]);
        list["migrations"]
            .as_array()
            .and_then(|m| m.first())
            .map(|m| m["state"].clone())
            .unwrap_or_default()
    }

    /// Wait until `host` audited at least `n` failed post-copy recovery
    /// attempts; its only migration is still `postcopy_active` (failed
    /// attempts change nothing).
    pub fn wait_failed_recoveries(&self, host: &str, n: usize) {
        let audit = self.host(host).state_dir.join("audit.log");
        wait_until(Duration::from_secs(30), "failed recovery attempts", || {
            std::fs::read_to_string(&audit)
                .unwrap_or_default()
                .matches("postcopy_recover_failed")
                .count()
                >= n
        });
        assert_eq!(self.only_migration_state(host), "postcopy_active");
    }

    /// `ferry migrate VM --to host2 --host host1 --postcopy --json`, in the
    /// background, its output piped.
    pub fn spawn_postcopy_to_host2(&self, vm: &str) -> std::process::Child {
        std::process::Command::new(FERRY)
            .args(["migrate", vm, "--to", "host2", "--host", "host1", "--postcopy", "--json"])
            .env("FERRY_CLIENT_CONFIG", &self.lab.client_config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn migrate")
    }

    /// Make `host` reach `peer` at `via` (a test's proxy) instead of the
    /// peer's own address; takes effect when the agent restarts.
    pub fn route_peer(&self, host: &str, peer: &str, via: SocketAddr) {
        let direct = self.host(peer).addr;
        self.edit_config(host, &format!("{peer} = \"{direct}\""), &format!("{peer} = \"{via}\""));
    }

    /// Undo [`TestLab::route_peer`]: the network heals.
    pub fn unroute_peer(&self, host: &str, peer: &str, via: SocketAddr) {
        let direct = self.host(peer).addr;
        self.edit_config(host, &format!("{peer} = \"{via}\""), &format!("{peer} = \"{direct}\""));
    }

    /// Wait until `host`'s record of migration `id` says completed.
    pub fn wait_completed(&self, host: &str, id: &str) {
        wait_until(Duration::from_secs(30), &format!("{host} to settle migration {id}"), || {
            let (_, m) = self.ferry_json(&["migrations", "show", id, "--host", host]);
            m["state"] == "completed"
        });
    }

    pub fn console_lines(&self, vm_info: &Value) -> Vec<ConsoleLine> {
        console::read_console(Path::new(vm_info["console_log"].as_str().expect("console_log")))
            .expect("console")
    }
}

pub fn agent_alive(h: &ferry_cli::lab::LabHost) -> bool {
    std::fs::read_to_string(&h.pid_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .is_some_and(pid_alive)
}

pub fn pid_alive(pid: i32) -> bool {
    ferry_cli::lab::pid_alive(pid)
}

/// Live QEMU processes whose command line names this VM directory root.
pub fn live_qemus_under(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system") && cmd.contains(&needle) && pid_alive(pid) {
            out.push(pid);
        }
    }
    out
}

pub fn wait_console(
    log: &Path,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&[ConsoleLine]) -> bool,
) -> Vec<ConsoleLine> {
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
    let before =
        heartbeats(&console::read_console(log).expect("console")).last().copied().unwrap_or(0);
    wait_console(log, Duration::from_secs(20), "new heartbeats", |l| {
        heartbeats(l).last().copied().unwrap_or(0) > before + 5
    });
}

/// A TCP proxy between the source and destination agents that the test
/// controls: it counts bytes and can cut the connection after N bytes
/// (source to destination) or stop relaying the destination's answers.
pub struct Proxy {
    pub addr: SocketAddr,
    pub up_bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
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
        let cut = Arc::new(AtomicBool::new(false));
        let (ub, st, ct) = (up_bytes.clone(), stop.clone(), cut.clone());
        std::thread::spawn(move || {
            for client in l.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else { continue };
                let ub = ub.clone();
                let (c2, s2) =
                    (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                let ub2 = ub.clone();
                let (ct1, ct2) = (ct.clone(), ct.clone());
                std::thread::spawn(move || pump(client, server, Some(ub), mode, true, ct1));
                std::thread::spawn(move || pump(s2, c2, Some(ub2), mode, false, ct2));
            }
        });
        Proxy { addr, up_bytes, stop, cut }
    }

    /// Cut every relayed connection at its next read, as a failed link would.
    #[allow(dead_code)]
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }

    /// The link is back: connections made from now on are relayed again.
    #[allow(dead_code)]
    pub fn heal(&self) {
        self.cut.store(false, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    up: Option<Arc<AtomicU64>>,
    mode: ProxyMode,
    upstream: bool,
    cut: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) if cut.load(Ordering::Relaxed) => break,
            Ok(n) => n,
        };
        let counter = up.as_ref().expect("counter");
        let so_far = if upstream {
            counter.fetch_add(n as u64, Ordering::Relaxed) + n as u64
        } else {
            counter.load(Ordering::Relaxed)
        };
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

/// After migration `id` moved `vm` from host1 to host2: the guest runs on
/// host2, completes two full memory sweeps there, its heartbeat continued
/// from where host1's console (kept under departed/) stopped, and no page
/// it checked was wrong.
#[allow(dead_code)]
pub fn assert_moved_intact(lab: &TestLab, vm: &str, id: &str) -> console::Continuity {
    let dst_vm = lab
        .vms("host2")
        .into_iter()
        .find(|v| v["name"] == vm)
        .unwrap_or_else(|| panic!("{vm} not on host2"));
    let dst_log = PathBuf::from(dst_vm["console_log"].as_str().expect("log"));
    let dst_lines = wait_console(&dst_log, Duration::from_secs(60), "two sweeps", |l| {
        l.iter().filter(|x| matches!(x.line, ferry_guest::GuestLine::Sweep { .. })).count() >= 2
    });
    let departed = lab.host("host1").state_dir.join("departed").join(id).join("console.log");
    let c =
        console::analyze(&console::read_console(&departed).expect("source console"), &dst_lines);
    assert!(c.heartbeat_continued, "heartbeat did not continue: {c:?}");
    assert!(c.memory_consistent(), "guest memory check failed: {c:?}");
    c
}

/// `ferry migrate g --to host2 --host host1 --json`, running in the background.
pub fn spawn_migrate(lab: &TestLab) -> std::process::Child {
    Command::new(FERRY)
        .args(["migrate", "g", "--to", "host2", "--host", "host1", "--json"])
        .env("FERRY_CLIENT_CONFIG", &lab.lab.client_config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn migrate")
}

mod attack;
mod evidence;
mod libvirt;
mod mitm;
mod netns;
mod qemu;
mod rogue;
mod vtpm;
#[allow(unused_imports)]
pub use attack::*;
#[allow(unused_imports)]
pub use evidence::*;
#[allow(unused_imports)]
pub use libvirt::*;
#[allow(unused_imports)]
pub use mitm::*;
#[allow(unused_imports)]
pub use netns::*;
#[allow(unused_imports)]
pub use qemu::*;
#[allow(unused_imports)]
pub use rogue::*;
#[allow(unused_imports)]
pub use vtpm::*;
