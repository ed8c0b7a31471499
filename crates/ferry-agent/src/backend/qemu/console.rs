//! Each VM's console: the guest's serial output, timestamped per line, in
//! `console.log` beside the VM (operators read it; tests measure the guest's
//! blackout from it).

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt};

use crate::records::now_unix_ms;

pub const CONSOLE_LOG: &str = "console.log";
/// Longest console line kept; longer lines are cut (a guest controls them).
const MAX_CONSOLE_LINE: usize = 4096;
/// A console log past this size is rotated to `console.log.1` (one
/// generation kept), so a chatty guest cannot fill the host's disk.
const MAX_CONSOLE_LOG: u64 = 64 << 20;

/// Copy the guest's serial output to `log`, one `<unix_ms> <line>` per line.
/// Reconnects while QEMU lives (its socket chardev takes one client).
///
/// PERF: each line is appended with a plain `write` from this task, not
/// through tokio::fs, whose every write is a hand-over to a blocking thread
/// and back: with the test guest's heartbeat every millisecond that cost the
/// agent 13 % of a core per running VM. A short append to a local file does
/// not block in practice, and the line's timestamp stays the time it was read.
pub(crate) async fn console_logger(socket: PathBuf, log: PathBuf) {
    let open = || std::fs::OpenOptions::new().create(true).append(true).open(&log);
    let mut out = match open() {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(log = %log.display(), error = %e, "cannot open console log");
            return;
        }
    };
    let mut written = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    for _ in 0..50 {
        let Ok(stream) = tokio::net::UnixStream::connect(&socket).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut reader = tokio::io::BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = match (&mut reader)
                .take(MAX_CONSOLE_LINE as u64)
                .read_until(b'\n', &mut line)
                .await
            {
                Ok(n) => n,
                Err(_) => break,
            };
            if n == 0 {
                break;
            }
            // A line cut short (QEMU quit mid-line, or the line is over the
            // cap) is marked, so nobody mistakes its prefix for a whole line.
            let complete = line.ends_with(b"\n");
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\r', '\n']);
            let mark = if complete { "" } else { "[partial] " };
            let entry = format!("{} {mark}{}\n", now_unix_ms(), text.replace('\n', " "));
            if std::io::Write::write_all(&mut out, entry.as_bytes()).is_err() {
                return;
            }
            written += entry.len() as u64;
            if written > MAX_CONSOLE_LOG {
                let _ = std::fs::rename(&log, log.with_extension("log.1"));
                out = match open() {
                    Ok(f) => f,
                    Err(_) => return,
                };
                written = 0;
            }
        }
        // QEMU closed the socket: it is quitting, or will accept us again.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
