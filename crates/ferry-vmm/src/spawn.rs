//! What a QEMU inherits from the agent that starts it: its stdio, nothing
//! else. Libraries in the agent open descriptors without close-on-exec
//! (tpm2-tss's socket to swtpm is one): a QEMU launched while such a
//! descriptor is open keeps it for its whole life, and an swtpm, which
//! serves one connection at a time, then never answers the host's next
//! TPM request (seen as `ferry status` hanging during an incoming migration).

/// Make every descriptor above stderr close when `cmd` execs.
#[allow(unsafe_code)]
pub fn inherit_only_stdio(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child between fork and exec,
    // where only async-signal-safe calls are allowed: it makes system calls
    // (close_range, getrlimit, fcntl) and nothing else; no allocation, no
    // locks. Stdio is already in place (0-2) when it runs, and std's own
    // exec-error pipe is close-on-exec already, so marking is harmless to it.
    unsafe {
        cmd.pre_exec(|| {
            let all = libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if all != 0 {
                // Kernels before 5.11: one descriptor at a time.
                let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                let top = match libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) {
                    0 => limit.rlim_cur.min(1 << 20) as libc::c_int,
                    _ => 65_536,
                };
                for fd in 3..top {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A descriptor the agent's process holds without close-on-exec (as a
    /// C library would open it) is not in the child.
    #[tokio::test]
    #[allow(unsafe_code)]
    async fn a_child_inherits_only_its_stdio() {
        let file = std::fs::File::open("/dev/null").expect("open");
        // SAFETY: dup of a descriptor this test owns; the copy is closed below.
        let leaked = unsafe { libc::dup(file.as_raw_fd()) };
        assert!(leaked > 2, "dup failed");
        let list = |protect: bool| {
            let mut cmd = tokio::process::Command::new("/bin/sh");
            cmd.args(["-c", "ls /proc/self/fd"]).stdin(std::process::Stdio::null());
            if protect {
                inherit_only_stdio(&mut cmd);
            }
            cmd.output()
        };
        let plain = String::from_utf8(list(false).await.expect("sh").stdout).expect("utf8");
        let guarded = String::from_utf8(list(true).await.expect("sh").stdout).expect("utf8");
        // SAFETY: closes the copy made above, once.
        unsafe { libc::close(leaked) };
        let has = |out: &str| out.lines().any(|l| l.trim() == leaked.to_string());
        // Control: without the guard the descriptor does leak.
        assert!(has(&plain), "fd {leaked} not inherited even unguarded: {plain:?}");
        assert!(!has(&guarded), "fd {leaked} leaked into the child: {guarded:?}");
    }
}
