//! Appends fail closed: a read-only or full audit directory is an error,
//! never a silently lost record, and the log stays verifiable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::cluster;
use ferry_audit::{verify_log, AuditError, AuditEvent, AuditLog};

/// A small tmpfs mounted for the test, unmounted on drop. Needs root (CI
/// and the dev machines run as root); `None` where mounting is not allowed.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_owned()))
    }
    fn remount(&self, opts: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn big_event(i: usize) -> AuditEvent {
    let mut ev = AuditEvent::new("note");
    ev.detail = serde_json::json!({ "i": i, "pad": "x".repeat(3000) });
    ev
}

#[test]
fn read_only_directory_refuses_new_log_and_appends() {
    let c = cluster();
    let dir = c.path("ro");
    let Some(fs) = Tmpfs::mount(&dir, "1m") else {
        // Unprivileged fallback: a directory without write permission.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500)).unwrap();
        let err = AuditLog::open(&dir.join("audit.log"), c.src_signer()).unwrap_err();
        assert!(matches!(err, AuditError::Write { .. }), "{err}");
        eprintln!("mount not permitted: checked the unprivileged read-only case only");
        return;
    };
    let path = dir.join("audit.log");
    let mut log = AuditLog::open(&path, c.src_signer()).unwrap();
    log.append(&AuditEvent::new("before")).unwrap();
    drop(log);

    // (Linux refuses a read-only remount while a file is open for writing,
    // so the mid-run failure of an open log is covered by the full-disk test.)
    fs.remount("ro");
    // The agent restarting on a read-only audit directory cannot resume its
    // log, nor create a new one: it must refuse to migrate.
    let err = AuditLog::open(&path, c.src_signer()).unwrap_err();
    assert!(matches!(err, AuditError::Write { .. }), "{err}");
    let err = AuditLog::open(&dir.join("other.log"), c.src_signer()).unwrap_err();
    assert!(matches!(err, AuditError::Write { .. }), "{err}");
    // What was recorded before is intact and verifiable.
    assert_eq!(verify_log(&path, &c.ca).unwrap().records, 2);
    fs.remount("rw");
}

#[test]
fn full_filesystem_fails_closed_and_the_log_stays_intact() {
    let c = cluster();
    let dir = c.path("full");
    let Some(_fs) = Tmpfs::mount(&dir, "64k") else {
        eprintln!("mount not permitted: full-filesystem case skipped");
        return;
    };
    // Something else on the disk, which the operator can delete later.
    let ballast = dir.join("ballast");
    std::fs::write(&ballast, vec![0u8; 24 << 10]).unwrap();
    let path = dir.join("audit.log");
    let mut log = AuditLog::open(&path, c.src_signer()).unwrap();
    let mut written = 1; // genesis
    let err = loop {
        match log.append(&big_event(written)) {
            Ok(_) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 100, "a 64 KiB filesystem never filled up");
    };
    assert!(
        matches!(&err, AuditError::Write { source, .. } if source.raw_os_error() == Some(28)),
        "{err}"
    );
    // Still full: the next append re-reads the log, finds its chain intact
    // (the torn line was cut off) and fails closed on the write again.
    assert!(matches!(log.append(&big_event(written)), Err(AuditError::Write { .. })));
    assert_eq!(verify_log(&path, &c.ca).unwrap().records, written as u64);
    // Space freed: the same log, without a restart, records again.
    std::fs::remove_file(&ballast).unwrap();
    log.append(&AuditEvent::new("disk_freed")).unwrap();
    assert_eq!(verify_log(&path, &c.ca).unwrap().records, written as u64 + 1);
    // A reopen sees the same chain.
    drop(log);
    let mut log = AuditLog::open(&path, c.src_signer()).unwrap();
    log.append(&AuditEvent::new("reopened")).unwrap();
}

#[test]
fn a_poisoned_log_whose_file_changed_stays_refused() {
    let c = cluster();
    let dir = c.path("swap");
    let Some(_fs) = Tmpfs::mount(&dir, "64k") else {
        eprintln!("mount not permitted: case skipped");
        return;
    };
    let path = dir.join("audit.log");
    let mut log = AuditLog::open(&path, c.src_signer()).unwrap();
    let mut written = 1;
    while log.append(&big_event(written)).is_ok() {
        written += 1;
        assert!(written < 100, "a 64 KiB filesystem never filled up");
    }
    // While poisoned, the file loses its last record (someone cut it):
    // healing must notice the chain is no longer the acknowledged one.
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.pop();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    assert!(matches!(log.append(&AuditEvent::new("x")), Err(AuditError::Poisoned { .. })));
}
