//! Processes the lab starts and stops, by pid.

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
