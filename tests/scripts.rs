//! The repository's scripts, run as a user runs them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn stub(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write stub");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// On a machine that lacks every package, scripts/deps.sh (which demo.sh
/// and test.sh source first) installs them and prints all of it on stderr,
/// so that `scripts/demo.sh --json | jq .` sees only the JSON object. The
/// package manager is a stand-in that talks on stdout as apt does; nothing
/// else is on PATH, so every package is missing.
#[test]
fn installing_packages_prints_nothing_on_stdout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    stub(&bin, "apt-get", r#"echo "apt-get $*""#);
    stub(&bin, "dpkg", "echo 'dpkg: package is not installed'; exit 1");
    stub(&bin, "id", "echo 0");
    stub(&bin, "cargo", "exit 0");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/deps.sh");
    let o = Command::new("/bin/bash")
        .arg(&script)
        .env_clear()
        .env("PATH", &bin)
        .env("HOME", tmp.path())
        .output()
        .expect("run deps.sh");
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "deps.sh failed: {err}");
    assert!(out.is_empty(), "deps.sh printed on stdout: {out:?}");
    for said in
        ["==> installing", "apt-get update", "apt-get install -y", "qemu-system-x86", "iproute2"]
    {
        assert!(err.contains(said), "{said:?} not on stderr: {err}");
    }
}

/// bench.py's accounting (which CPU is whose) has unit tests of its own,
/// in Python like the script; they run here so that the suite runs them.
#[test]
fn bench_accounting_unit_tests_pass() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test_ferrybench.py");
    let o = Command::new("python3").arg(&script).output().expect("run python3");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "scripts/test_ferrybench.py failed: {err}");
    assert!(err.contains("OK"), "no test ran: {err}");
}
