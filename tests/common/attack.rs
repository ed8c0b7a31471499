//! Helpers shared by the attack suites (wire_attacks, malformed, flood):
//! one test at a time, the outcome a failed migration must leave, records.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_guest::GuestLine;
use serde_json::Value;

use super::*;

pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn console_path(vm: &Value) -> PathBuf {
    PathBuf::from(vm["console_log"].as_str().expect("console_log"))
}

/// `ferry migrate g --to host2 --host host1`: (success, output, wall time).
pub fn migrate(lab: &TestLab) -> (bool, String, Duration) {
    let t = Instant::now();
    let o = lab.ferry(&["migrate", "g", "--to", "host2", "--host", "host1", "--json"]);
    (o.status.success(), text(&o), t.elapsed())
}

/// The guest's memory checker never saw a bad page on this console.
pub fn assert_memory_consistent(log: &Path) {
    let lines = ferry_cli::console::read_console(log).expect("console");
    for l in &lines {
        match l.line {
            GuestLine::Corrupt { .. } => {
                panic!("guest memory corrupted: {:?} in {}", l.line, log.display())
            }
            GuestLine::Sweep { errors, .. } if errors > 0 => {
                panic!("a sweep found {errors} bad pages in {}", log.display())
            }
            _ => {}
        }
    }
}

/// After a failed migration: the source copy runs again (heartbeats move
/// on), it is the only copy, the destination kept no QEMU and no VM, and
/// the guest's memory checks are clean.
pub fn assert_source_resumed(lab: &TestLab, log: &Path) {
    wait_until(Duration::from_secs(20), "the source copy to run again", || {
        lab.vm_state("host1", "g").as_deref() == Some("running")
    });
    assert_guest_runs(log);
    assert_eq!(lab.running_on("g"), ["host1"]);
    wait_until(Duration::from_secs(15), "no QEMU left on host2", || {
        live_qemus_under(&lab.host("host2").state_dir).is_empty()
    });
    assert!(lab.vms("host2").is_empty(), "host2 still lists a VM");
    assert_memory_consistent(log);
}

/// Every migration record on `host` (state, error).
pub fn records(lab: &TestLab, host: &str) -> Vec<(String, String)> {
    let (ok, list) = lab.ferry_json(&["migrations", "list", "--host", host]);
    assert!(ok, "migrations list on {host}: {list}");
    list["migrations"]
        .as_array()
        .expect("migrations")
        .iter()
        .map(|m| {
            (
                m["state"].as_str().unwrap_or("").to_owned(),
                m["error"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

pub fn pseudo_random(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// The agent's log without terminal colour codes.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub trait Answers {
    fn agent_alive_and_answers(&self, host: &str) -> bool;
}

impl Answers for TestLab {
    fn agent_alive_and_answers(&self, host: &str) -> bool {
        pid_alive(self.agent_pid(host)) && self.ferry_json(&["status", "--host", host]).0
    }
}
