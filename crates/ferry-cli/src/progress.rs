//! The live progress display of `ferry migrate`: a bar redrawn in place on a
//! terminal, one line per phase change otherwise (logs, pipes).

use std::io::{IsTerminal, Write};

use ferry_agent::protocol::Progress;

pub struct ProgressView {
    tty: bool,
    last_phase: String,
    drew: bool,
}

const BAR: usize = 24;

impl ProgressView {
    pub fn new() -> Self {
        Self { tty: std::io::stderr().is_terminal(), last_phase: String::new(), drew: false }
    }

    pub fn update(&mut self, p: &Progress) {
        let mut err = std::io::stderr();
        if !self.tty {
            if p.phase != self.last_phase {
                let _ = writeln!(err, "phase {} ({} ms)", p.phase, p.elapsed_ms);
                self.last_phase = p.phase.clone();
            }
            return;
        }
        let _ = write!(err, "\r\x1b[2K{}", render(p));
        let _ = err.flush();
        self.drew = true;
    }

    /// End the in-place line so the result starts on its own line.
    pub fn finish(&mut self) {
        if self.drew {
            let _ = writeln!(std::io::stderr());
            self.drew = false;
        }
    }
}

impl Default for ProgressView {
    fn default() -> Self {
        Self::new()
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// One line: phase, bar, bytes, rate, remaining, dirty rate, iteration, ETA.
pub fn render(p: &Progress) -> String {
    let secs = (p.elapsed_ms as f64 / 1000.0).max(0.001);
    let rate = mib(p.bytes) / secs;
    // QEMU's RAM counters drive the fraction; before they exist, the phase does.
    let fraction = if p.ram_total > 0 {
        (p.ram_total.saturating_sub(p.ram_remaining)) as f64 / p.ram_total as f64
    } else if p.phase == "completed" {
        1.0
    } else {
        0.0
    };
    let filled = ((fraction * BAR as f64).round() as usize).min(BAR);
    let eta = if rate > 0.0 && p.ram_remaining > 0 {
        format!("{:.1}s", mib(p.ram_remaining) / rate)
    } else {
        "-".into()
    };
    format!(
        "{:<9} [{}{}] {:>3.0}%  {:>8.1} MiB  {:>7.1} MiB/s  left {:>7.1} MiB  dirty {:>6} pg/s  iter {:<3} ETA {}",
        p.phase,
        "#".repeat(filled),
        "-".repeat(BAR - filled),
        fraction * 100.0,
        mib(p.bytes),
        rate,
        mib(p.ram_remaining),
        p.dirty_pages_rate,
        p.iterations,
        eta
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_tracks_qemu_counters() {
        let p = Progress {
            phase: "transfer".into(),
            bytes: 512 << 20,
            elapsed_ms: 1000,
            ram_total: 1 << 30,
            ram_remaining: 512 << 20,
            ..Default::default()
        };
        let line = render(&p);
        assert!(line.contains("[############------------]"), "{line}");
        assert!(line.contains(" 50%"), "{line}");
        assert!(line.contains("512.0 MiB/s"), "{line}");
        assert!(line.contains("ETA 1.0s"), "{line}");
        let done = Progress { phase: "completed".into(), ..Default::default() };
        assert!(render(&done).contains("100%"));
    }
}
