//! The live progress display of `ferry migrate`: a bar redrawn in place on a
//! terminal, one line per phase change otherwise (logs, pipes).
//!
//! A line wider than the terminal wraps, and `\r` then only returns to the
//! start of its last row: every redraw would scroll a new line. So the line
//! is fitted to the terminal's width, read again at each redraw (the window
//! may be resized), dropping the least useful figures first.

use std::io::{IsTerminal, Write};

use ferry_agent::protocol::Progress;

pub struct ProgressView {
    tty: bool,
    last_phase: String,
    drew: bool,
}

/// Width assumed when the terminal does not say (e.g. a pty nobody sized).
const FALLBACK_COLUMNS: usize = 80;
const MIN_BAR: usize = 10;
const MAX_BAR: usize = 30;
const SEPARATOR: &str = "  ";
/// Longest phase name shown; the agent names phases, this only bounds them.
const MAX_PHASE: usize = 16;

impl ProgressView {
    pub fn new() -> Self {
        Self { tty: std::io::stderr().is_terminal(), last_phase: String::new(), drew: false }
    }

    pub fn update(&mut self, p: &Progress) {
        let mut err = std::io::stderr();
        if !self.tty {
            if p.phase != self.last_phase {
                let _ = writeln!(err, "phase {} ({} ms)", printable(&p.phase), p.elapsed_ms);
                self.last_phase = p.phase.clone();
            }
            return;
        }
        let _ = write!(err, "\r\x1b[2K{}", render(p, terminal_columns()));
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

/// The width of the terminal on stderr, else `$COLUMNS`, else 80.
fn terminal_columns() -> usize {
    if let Some((terminal_size::Width(w), _)) = terminal_size::terminal_size_of(std::io::stderr()) {
        return usize::from(w);
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .filter(|&c| c > 0)
        .unwrap_or(FALLBACK_COLUMNS)
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// The phase as the agent named it, reduced to printable ASCII so that it
/// can neither move the cursor nor occupy more columns than it has chars.
fn printable(phase: &str) -> String {
    phase
        .chars()
        .take(MAX_PHASE)
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
        .collect()
}

/// One figure of the line: where it is drawn and how much it is worth when
/// space runs out (lower `keep` is dropped last).
struct Field {
    keep: u8,
    text: String,
}

/// One line of at most `columns - 1` characters (the last column is left
/// empty: some terminals wrap as soon as it is written). In display order:
/// phase, bar, percentage, bytes, rate, remaining, dirty rate, iteration,
/// ETA; on a narrow terminal the iteration, dirty rate, remaining, bytes and
/// bar go first, in that order.
pub fn render(p: &Progress, columns: usize) -> String {
    let limit = columns.saturating_sub(1).max(1);
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
    let eta = if rate > 0.0 && p.ram_remaining > 0 {
        format!("{:.1}s", mib(p.ram_remaining) / rate)
    } else {
        "-".into()
    };
    // `None` marks where the bar goes; its width is whatever is left.
    let mut fields: Vec<Option<Field>> = vec![
        Some(Field { keep: 0, text: format!("{:<9}", printable(&p.phase)) }),
        None,
        Some(Field { keep: 1, text: format!("{:>3.0}%", fraction * 100.0) }),
        Some(Field { keep: 5, text: format!("{:>8.1} MiB", mib(p.bytes)) }),
        Some(Field { keep: 3, text: format!("{rate:>7.1} MiB/s") }),
        Some(Field { keep: 6, text: format!("left {:>7.1} MiB", mib(p.ram_remaining)) }),
        Some(Field { keep: 7, text: format!("dirty {:>6} pg/s", p.dirty_pages_rate) }),
        Some(Field { keep: 8, text: format!("iter {:<3}", p.iterations) }),
        Some(Field { keep: 2, text: format!("ETA {eta}") }),
    ];
    const BAR_KEEP: u8 = 4;
    let mut with_bar = true;
    loop {
        let shown: Vec<&Field> = fields.iter().flatten().collect();
        let text: usize = shown.iter().map(|f| f.text.len()).sum();
        let gaps = SEPARATOR.len() * (shown.len() + usize::from(with_bar)).saturating_sub(1);
        let bar = if with_bar { MIN_BAR + 2 } else { 0 };
        if text + gaps + bar <= limit || shown.len() <= 1 {
            break;
        }
        // Drop the least useful of what is still shown (the bar counts too).
        let worst = fields
            .iter()
            .enumerate()
            .filter_map(|(i, f)| Some((i, f.as_ref()?.keep)))
            .max_by_key(|&(_, keep)| keep);
        match worst {
            Some((_, keep)) if with_bar && BAR_KEEP > keep => with_bar = false,
            Some((i, _)) => fields[i] = None,
            None => break,
        }
    }
    let used: usize = fields.iter().flatten().map(|f| f.text.len() + SEPARATOR.len()).sum();
    let bar_width = limit.saturating_sub(used + 2).clamp(MIN_BAR, MAX_BAR);
    let filled = ((fraction * bar_width as f64).round() as usize).min(bar_width);
    let parts: Vec<String> = fields
        .into_iter()
        .enumerate()
        .filter_map(|(i, f)| match f {
            Some(f) => Some(f.text),
            None if i == 1 && with_bar => {
                Some(format!("[{}{}]", "#".repeat(filled), "-".repeat(bar_width - filled)))
            }
            None => None,
        })
        .collect();
    let mut line = parts.join(SEPARATOR);
    // Only the phase is left and even it is too wide: cut it.
    line.truncate(limit);
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy() -> Progress {
        Progress {
            phase: "transfer".into(),
            bytes: 9_999 << 30,
            elapsed_ms: 1000,
            ram_total: 1 << 40,
            ram_remaining: 900 << 30,
            dirty_pages_rate: 9_999_999,
            iterations: 12345,
            ..Default::default()
        }
    }

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
        let line = render(&p, 200);
        assert!(line.contains("[###############---------------]"), "{line}");
        assert!(line.contains(" 50%"), "{line}");
        assert!(line.contains("512.0 MiB/s"), "{line}");
        assert!(line.contains("ETA 1.0s"), "{line}");
        assert!(line.contains("dirty") && line.contains("iter") && line.contains("left"), "{line}");
        let done = Progress { phase: "completed".into(), ..Default::default() };
        assert!(render(&done, 80).contains("100%"));
    }

    #[test]
    fn the_line_never_reaches_the_last_column() {
        for columns in [0, 1, 5, 10, 20, 40, 60, 79, 80, 100, 119, 120, 200, 1000] {
            for p in [busy(), Progress::default(), Progress { phase: "x".repeat(99), ..busy() }] {
                let line = render(&p, columns);
                assert!(line.len() < columns.max(2), "{columns} columns: {line:?}");
                assert!(line.is_ascii(), "{line:?}");
            }
        }
    }

    #[test]
    fn a_narrow_terminal_keeps_the_essentials() {
        let line = render(&busy(), 80);
        assert!(line.starts_with("transfer"), "{line}");
        for kept in ["%", "MiB/s", "ETA", "["] {
            assert!(line.contains(kept), "{kept} dropped at 80 columns: {line}");
        }
        assert!(!line.contains("iter"), "least useful figure kept at 80 columns: {line}");
        let line = render(&busy(), 120);
        assert!(line.contains("left") && line.contains("["), "{line}");
        let tiny = render(&busy(), 30);
        assert!(tiny.contains("transfer") && tiny.contains('%'), "{tiny}");
    }

    #[test]
    fn a_phase_cannot_move_the_cursor() {
        let p = Progress { phase: "\x1b[2Jtr\u{e9}\r\n".into(), ..busy() };
        let line = render(&p, 120);
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        assert!(line.starts_with("?[2Jtr??"), "{line:?}");
    }
}
