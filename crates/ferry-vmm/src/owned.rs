//! Processes this crate started detached (QEMU, swtpm) and finds again by
//! pid file. A pid is only trusted once `/proc/PID/cmdline` shows the
//! process was started with *that* pid file: pids are reused, and
//! signalling a stranger's process would be a serious bug.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill as send_signal, Signal};
use nix::unistd::Pid;

use crate::VmmError;

/// How long `stop` waits after SIGTERM before escalating to SIGKILL, and
/// after SIGKILL before giving up.
const TERM_GRACE: Duration = Duration::from_secs(2);
const KILL_GRACE: Duration = Duration::from_secs(2);

/// The arguments of `pid` if it is alive (not a zombie) and `started_with`
/// accepts them. Zombies count as dead: a killed daemon's parent is init,
/// which on some hosts never reaps.
pub(crate) fn live_args(
    pid: u32,
    started_with: impl Fn(&[Vec<u8>]) -> bool,
) -> Option<Vec<Vec<u8>>> {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the last ')' (the command name may contain one).
    let close = stat.iter().rposition(|&b| b == b')')?;
    match stat.get(close + 2) {
        Some(b'Z' | b'X' | b'x') | None => return None,
        Some(_) => {}
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<Vec<u8>> = cmdline.split(|&b| b == 0).map(<[u8]>::to_vec).collect();
    started_with(&args).then_some(args)
}

/// `flag` followed by exactly `value` among `args`.
pub(crate) fn has_arg_pair(args: &[Vec<u8>], flag: &str, value: &[u8]) -> bool {
    args.windows(2).any(|w| w[0] == flag.as_bytes() && w[1] == value)
}

/// `prefix` then `path`, as one argument's bytes (`file=/x/swtpm.pid`).
pub(crate) fn prefixed(prefix: &str, path: &Path) -> Vec<u8> {
    let mut v = prefix.as_bytes().to_vec();
    v.extend_from_slice(path.as_os_str().as_bytes());
    v
}

/// SIGTERM, then SIGKILL if it lingers. `alive` re-checks ownership right
/// before each signal: the pid may have died and been reused since.
/// Blocks for at most a few seconds. Stopping a dead process is not an error.
pub(crate) fn stop(pid: u32, what: &str, alive: impl Fn() -> bool) -> Result<(), VmmError> {
    for (signal, grace) in [(Signal::SIGTERM, TERM_GRACE), (Signal::SIGKILL, KILL_GRACE)] {
        if !alive() {
            break;
        }
        tracing::debug!(pid, ?signal, "signalling {what}");
        let raw = i32::try_from(pid).map_err(|_| VmmError::Io {
            what: format!("{what} pid {pid}"),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "out of range"),
        })?;
        match send_signal(Pid::from_raw(raw), signal) {
            Ok(()) | Err(nix::Error::ESRCH) => {}
            Err(source) => return Err(VmmError::Signal { pid, source }),
        }
        let deadline = Instant::now() + grace;
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if alive() {
        return Err(VmmError::Timeout {
            what: format!("{what} pid {pid} to die after SIGKILL"),
            after: TERM_GRACE + KILL_GRACE,
        });
    }
    Ok(())
}

/// Ok(None) when the pid file is absent or not a pid.
pub(crate) fn read_pid(path: &Path) -> Result<Option<u32>, VmmError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.trim().parse::<u32>().ok().filter(|&p| p > 0)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(VmmError::io(format!("reading {path:?}"), e)),
    }
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<(), VmmError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VmmError::io(format!("removing {path:?}"), e)),
    }
}
