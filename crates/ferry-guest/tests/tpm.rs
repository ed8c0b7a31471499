//! The guest's TPM 2.0 driver against a real swtpm behind QEMU's tpm-crb
//! (TCG): PCR 16 holds exactly the marker's extension, the NV counter
//! counts once per boot on the same vTPM state, and a non-CRB TPM is named.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use ferry_guest::{expected_pcr16, parse_line, write_image, GuestLine, GuestParams};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Killed on drop, so a failed assertion never leaves a guest running.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boot the guest with a vTPM whose state lives in `state` until it has
/// printed `want` lines of its own (not firmware noise); those lines.
fn boot(dir: &Path, state: &Path, device: &str, params: &GuestParams, want: usize) -> Vec<String> {
    let image = dir.join("ferry-guest.elf");
    write_image(&image).expect("image");
    let ctrl = dir.join("ctrl.sock");
    let _ = std::fs::remove_file(&ctrl);
    let mut swtpm = Command::new("swtpm");
    swtpm.args(["socket", "--tpm2", "--terminate"]).arg("--tpmstate");
    swtpm.arg(format!("dir={}", state.display())).arg("--ctrl");
    swtpm.arg(format!("type=unixio,path={}", ctrl.display()));
    let _swtpm =
        Killed(swtpm.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn swtpm"));
    let deadline = Instant::now() + TIMEOUT;
    while !ctrl.exists() {
        assert!(Instant::now() < deadline, "swtpm never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none"])
        .args(["-m", "64", "-serial", "stdio", "-chardev"])
        .arg(format!("socket,id=c0,path={}", ctrl.display()))
        .args(["-tpmdev", "emulator,id=tpm0,chardev=c0", "-device"])
        .arg(format!("{device},tpmdev=tpm0"))
        .arg("-kernel")
        .arg(&image)
        .arg("-append")
        .arg(params.cmdline());
    let mut qemu = Killed(qemu.stdout(Stdio::piped()).spawn().expect("spawn QEMU"));
    let (tx, rx) = channel();
    let out = qemu.0.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    while seen.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|e| panic!("{e}; saw {seen:?}"));
        if line.starts_with("TPM") || line.starts_with("READY") || line.starts_with("ERROR") {
            seen.push(line);
        }
    }
    seen
}

fn params(marker: &str) -> GuestParams {
    GuestParams {
        fill_mib: 4,
        heartbeat_ms: 1000,
        tpm_marker: Some(marker.into()),
        tpm_ms: 200,
        ..GuestParams::default()
    }
}

#[test]
fn the_guest_extends_pcr16_and_counts_on_its_vtpm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    let pcr = expected_pcr16("FERRY-PCR");
    for boot_no in 1..=2u64 {
        // Boot line, READY, then two re-reads: the same values each time.
        let lines = boot(dir.path(), &state, "tpm-crb", &params("FERRY-PCR"), 4);
        let tpm: Vec<GuestLine> = lines.iter().map(|l| parse_line(l)).collect();
        assert!(matches!(tpm[1], GuestLine::Ready { .. }), "{lines:?}");
        for i in [0, 2, 3] {
            // PCR 16 resets with the TPM, so each boot reads the one
            // extension; the counter lives in NV and counts the boots.
            assert_eq!(tpm[i], GuestLine::Tpm { pcr16: pcr.clone(), nv: boot_no }, "{lines:?}");
        }
    }
}

#[test]
fn a_tpm_without_crb_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    let lines = boot(dir.path(), &state, "tpm-tis", &params("X"), 2);
    assert!(lines[0].starts_with("TPM ERROR no_crb"), "{lines:?}");
    assert!(lines[1].starts_with("READY"), "the guest runs on without its vTPM: {lines:?}");
}
