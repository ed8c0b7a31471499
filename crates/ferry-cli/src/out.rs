//! Standard output for every command.
//!
//! `println!` panics when stdout is a pipe whose reader has gone (`ferry
//! --json migrate ... | head -c 300`). Command-line tools end quietly then:
//! here the rest of the output is dropped without a word and the command
//! finishes with its own exit status (a migration that ran still reports
//! success or failure). Any other write error (a full disk) is remembered,
//! reported once at the end, and makes the command fail.

use std::fmt;
use std::io::{ErrorKind, Write};
use std::sync::Mutex;

enum Stdout {
    Open,
    /// The reader went away: output is no longer wanted.
    Closed,
    /// Output was wanted and lost.
    Failed(std::io::Error),
}

static STDOUT: Mutex<Stdout> = Mutex::new(Stdout::Open);

/// Writes `args` to stdout (and flushes, so that a closed pipe is noticed
/// here rather than in the exit path).
pub fn write(args: fmt::Arguments<'_>) {
    emit(|out| out.write_fmt(args));
}

/// Writes raw bytes (a generated completion script) the same way.
pub fn write_bytes(bytes: &[u8]) {
    emit(|out| out.write_all(bytes));
}

fn emit(write: impl FnOnce(&mut std::io::StdoutLock<'static>) -> std::io::Result<()>) {
    let mut state = STDOUT.lock().unwrap_or_else(|e| e.into_inner());
    if !matches!(*state, Stdout::Open) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = write(&mut out).and_then(|()| out.flush()) {
        *state = if e.kind() == ErrorKind::BrokenPipe { Stdout::Closed } else { Stdout::Failed(e) };
    }
}

/// The write error that lost output, if any; a closed pipe is not one.
pub fn failure() -> Option<String> {
    match &*STDOUT.lock().unwrap_or_else(|e| e.into_inner()) {
        Stdout::Failed(e) => Some(e.to_string()),
        Stdout::Open | Stdout::Closed => None,
    }
}

/// `println!` for command output: see the module docs.
macro_rules! outln {
    () => {
        $crate::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for command output: see the module docs.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*))
    };
}
