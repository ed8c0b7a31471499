//! Reading the timestamped console logs the agents keep (`<unix_ms> <line>`,
//! or plain lines from a hypervisor's own serial file)
//! and judging, from the test guest's own output, whether it kept running
//! across a migration and how long it was dark.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_guest::{parse_line, GuestLine};
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct ConsoleLine {
    pub unix_ms: u64,
    pub line: GuestLine,
}

/// Largest step of the heartbeat counter across a migration (see `analyze`).
pub const HEARTBEAT_MAX_STEP: u64 = 3;

/// Largest console log read back.
const MAX_CONSOLE_LOG: u64 = 256 << 20;

pub fn read_console(path: &Path) -> Result<Vec<ConsoleLine>> {
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if len > MAX_CONSOLE_LOG {
        bail!("console log {} is {len} bytes, too large to analyse", path.display());
    }
    let text = match std::fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    Ok(text
        .lines()
        .map(|l| match l.split_once(' ').and_then(|(ts, rest)| Some((ts.parse().ok()?, rest))) {
            Some((unix_ms, rest)) => ConsoleLine { unix_ms, line: parse_line(rest) },
            // A console written by the hypervisor itself (libvirt's serial
            // file) has no timestamps.
            None => ConsoleLine { unix_ms: 0, line: parse_line(l) },
        })
        .collect())
}

/// Wait until `pred` holds for the console log at `path`.
pub async fn wait_for(
    path: &Path,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&[ConsoleLine]) -> bool,
) -> Result<Vec<ConsoleLine>> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = read_console(path)?;
        if pred(&lines) {
            return Ok(lines);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what} in {}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn clean_sweeps(lines: &[ConsoleLine]) -> usize {
    lines.iter().filter(|l| matches!(l.line, GuestLine::Sweep { errors: 0, .. })).count()
}

pub fn is_ready(lines: &[ConsoleLine]) -> bool {
    lines.iter().any(|l| matches!(l.line, GuestLine::Ready { .. }))
}

/// What the guest's own output says about a migration.
#[derive(Debug, Clone, Serialize)]
pub struct Continuity {
    pub last_source_seq: Option<u64>,
    pub first_destination_seq: Option<u64>,
    /// Wall-clock gap between the last heartbeat on the source and the
    /// first on the destination: the blackout the guest really had.
    pub guest_blackout_ms: Option<u64>,
    /// The heartbeat counter went on from where it was (no reboot, no reset).
    pub heartbeat_continued: bool,
    pub destination_heartbeats: usize,
    /// Full memory sweeps on the destination, and the errors they found.
    pub destination_sweeps: usize,
    pub sweep_errors: u64,
    pub corrupt_pages: Vec<u32>,
}

impl Continuity {
    /// The guest runs on and its memory checked clean.
    pub fn memory_consistent(&self) -> bool {
        self.destination_sweeps >= 2 && self.sweep_errors == 0 && self.corrupt_pages.is_empty()
    }
}

pub fn analyze(source: &[ConsoleLine], dest: &[ConsoleLine]) -> Continuity {
    let hb = |l: &ConsoleLine| match l.line {
        GuestLine::Heartbeat { seq, .. } => Some((seq, l.unix_ms)),
        _ => None,
    };
    let last_src = source.iter().rev().find_map(hb);
    let first_dst = dest.iter().find_map(hb);
    let mut sweep_errors = 0u64;
    let mut sweeps = 0;
    let mut corrupt = Vec::new();
    for l in source.iter().chain(dest) {
        match l.line {
            GuestLine::Corrupt { page } => corrupt.push(page),
            GuestLine::Sweep { errors, .. } => sweep_errors += u64::from(errors),
            _ => {}
        }
    }
    for l in dest {
        if let GuestLine::Sweep { .. } = l.line {
            sweeps += 1;
        }
    }
    Continuity {
        last_source_seq: last_src.map(|x| x.0),
        first_destination_seq: first_dst.map(|x| x.0),
        guest_blackout_ms: match (last_src, first_dst) {
            (Some(a), Some(b)) => Some(b.1.saturating_sub(a.1)),
            _ => None,
        },
        // The counter picks up right after the source's last heartbeat (one
        // more may be lost if the switch cut a line). Without the guest's
        // tlbflush under TCG, QEMU 7.2 resumes it tens of heartbeats behind
        // (docs/known-issues.md); a reboot would restart it at 0.
        heartbeat_continued: match (last_src, first_dst) {
            (Some(a), Some(b)) => b.0 > a.0 && b.0 <= a.0 + HEARTBEAT_MAX_STEP,
            _ => false,
        },
        destination_heartbeats: dest.iter().filter_map(hb).count(),
        destination_sweeps: sweeps,
        sweep_errors,
        corrupt_pages: corrupt,
    }
}
