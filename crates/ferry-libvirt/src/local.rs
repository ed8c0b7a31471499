//! Who may connect to a migration's local sockets on the source. Whatever
//! connects is carried to the destination and signed for as the VM, so only
//! libvirt's daemon and the domain's own QEMU may: under libvirt every
//! domain's QEMU runs as the same user, and another domain's QEMU (or any
//! other local process) must not have its bytes taken for this VM's.

use std::path::Path;

/// The daemon executables libvirt runs the QEMU driver in.
const DAEMONS: &[&str] = &["libvirtd", "virtqemud"];

/// A connected process, from `SO_PEERCRED` and `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPeer<'a> {
    pub pid: i32,
    pub uid: u32,
    /// Where `/proc/PID/exe` points, if readable.
    pub exe: Option<&'a Path>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// libvirt's daemon (it opens the control connection, and the main
    /// stream before handing it to QEMU).
    Daemon,
    /// The migrating domain's own QEMU (it opens multifd channels itself).
    DomainQemu,
}

/// SECURITY: the only decision about local connections; anything it does
/// not admit is refused before a byte is read.
pub fn admit(peer: &LocalPeer, domain_qemu_pid: Option<i32>) -> Result<Admitted, String> {
    if domain_qemu_pid == Some(peer.pid) {
        return Ok(Admitted::DomainQemu);
    }
    let exe = peer.exe.and_then(|e| e.file_name()).and_then(|n| n.to_str()).unwrap_or("?");
    // libvirt's system daemon runs as root; a root-owned copy of its binary
    // run by anyone else is not it.
    if peer.uid == 0 && DAEMONS.contains(&exe) {
        return Ok(Admitted::Daemon);
    }
    Err(format!(
        "pid {} (uid {}, {}) is neither libvirt's daemon nor this domain's QEMU{}",
        peer.pid,
        peer.uid,
        peer.exe.map(|e| e.display().to_string()).unwrap_or_else(|| "executable unknown".into()),
        domain_qemu_pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(pid: i32, uid: u32, exe: &'static str) -> LocalPeer<'static> {
        LocalPeer { pid, uid, exe: Some(Path::new(exe)) }
    }

    #[test]
    fn libvirtd_as_root_and_the_domains_own_qemu_are_admitted() {
        assert_eq!(admit(&peer(10, 0, "/usr/sbin/libvirtd"), Some(20)), Ok(Admitted::Daemon));
        assert_eq!(admit(&peer(10, 0, "/usr/sbin/virtqemud"), None), Ok(Admitted::Daemon));
        let qemu = peer(20, 64055, "/usr/bin/qemu-system-x86_64");
        assert_eq!(admit(&qemu, Some(20)), Ok(Admitted::DomainQemu));
    }

    #[test]
    fn another_domains_qemu_another_user_and_other_root_processes_are_refused() {
        let other_qemu = peer(21, 64055, "/usr/bin/qemu-system-x86_64");
        let why = admit(&other_qemu, Some(20)).unwrap_err();
        assert!(why.contains("pid 21") && why.contains("(pid 20)"), "{why}");
        assert!(admit(&peer(30, 1000, "/usr/sbin/libvirtd"), Some(20)).is_err(), "not root");
        assert!(admit(&peer(31, 0, "/usr/bin/socat"), Some(20)).is_err(), "root, not libvirt");
        let unknown = LocalPeer { pid: 32, uid: 0, exe: None };
        assert!(admit(&unknown, None).unwrap_err().contains("executable unknown"));
    }
}
