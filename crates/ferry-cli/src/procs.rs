//! Processes the lab starts and stops, by pid.

use std::path::PathBuf;
use std::process::Stdio;

/// The process exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// Send `sig` to `pid` (never to init or a process group).
pub fn signal(pid: i32, sig: i32) {
    if pid > 1 {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .stderr(Stdio::null())
            .status();
    }
}

/// The swtpms a `lab up` started, by state directory, until the lab is
/// written down (`keep`: from then on `lab down` finds them). Dropped
/// before that, because the `lab up` failed, it kills them: a failed `lab
/// up` leaves nothing running.
#[derive(Default)]
pub struct StartedTpms(Vec<PathBuf>);

impl StartedTpms {
    pub fn extend(&mut self, state_dir: Option<PathBuf>) {
        self.0.extend(state_dir);
    }

    pub fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for StartedTpms {
    fn drop(&mut self) {
        for dir in &self.0 {
            let Some(pid) = ferry_attest::Swtpm::recorded_pid(dir) else { continue };
            // Only the swtpm of this directory: a recycled pid is left alone.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()) {
                signal(pid as i32, libc::SIGKILL);
            }
        }
    }
}
