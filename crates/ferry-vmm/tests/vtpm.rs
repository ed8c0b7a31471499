//! A VM's vTPM under real QEMU (TCG) and real swtpm: started before QEMU,
//! adopted with it, stopped after it, its state erased, never reused.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_vmm::{
    adopt, launch, swtpm, AccelChoice, Boot, LaunchMode, MachineType, QemuConfig, QemuProcess,
    TpmModel, VmSpec, VmmError,
};

/// Kills the VM (and its swtpm) when dropped.
struct Killed(QemuProcess);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

fn config(root: &Path) -> QemuConfig {
    let images = root.join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::write(images.join("zero.raw"), vec![0u8; 1 << 20]).unwrap();
    QemuConfig {
        accel: AccelChoice::Tcg,
        images_dir: images,
        run_dir: root.join("vms"),
        ..QemuConfig::default()
    }
}

fn spec(name: &str, tpm: TpmModel) -> VmSpec {
    VmSpec {
        name: name.parse().unwrap(),
        memory_mib: 32,
        vcpus: 1,
        machine: MachineType::Q35,
        boot: Boot::Disk { image: "zero.raw".parse().unwrap(), bus: Default::default() },
        tpm,
    }
}

fn wait_dead(alive: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(), "still alive after 5 s");
}

#[tokio::test]
async fn a_vtpm_lives_and_dies_with_its_vm() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    for model in [TpmModel::Crb, TpmModel::Tis] {
        let vm = Killed(launch(&cfg, &spec("tpm1", model), LaunchMode::Run).await.unwrap());
        let tpm = vm.0.swtpm.clone().expect("a VM with a vTPM has its swtpm");
        assert!(tpm.is_alive());
        let state = swtpm::state_dir(&vm.0.dir);
        let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the vTPM state is the VM's own");
        // QEMU sees an emulator-backed TPM of the model the spec asked for.
        let mut qmp = vm.0.qmp().await.unwrap();
        let tpms = qmp.execute("query-tpm", None).await.unwrap();
        assert_eq!(tpms[0]["model"], model.qemu_device().unwrap(), "{tpms}");
        assert_eq!(tpms[0]["options"]["type"], "emulator", "{tpms}");
        drop(qmp);

        // A restarted agent finds both again.
        let adopted = adopt(&vm.0.dir).await.unwrap().unwrap();
        assert_eq!(adopted.swtpm.as_ref(), Some(&tpm));

        vm.0.kill().unwrap();
        wait_dead(|| tpm.is_alive());
        assert!(swtpm::has_state(&vm.0.dir), "stopping a VM does not erase its vTPM");
        let erased = swtpm::erase(&vm.0.dir).unwrap().unwrap();
        assert!(erased.files >= 1, "{erased:?}");
        assert!(!state.exists());
    }
}

#[tokio::test]
async fn leftover_state_is_never_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let vm = Killed(launch(&cfg, &spec("tpm2", TpmModel::Crb), LaunchMode::Run).await.unwrap());
    vm.0.kill().unwrap();
    // The old state is still there: a new VM of that name must not get it.
    let err = launch(&cfg, &spec("tpm2", TpmModel::Crb), LaunchMode::Incoming).await.unwrap_err();
    assert!(matches!(&err, VmmError::VtpmStateExists { path } if path.ends_with("tpm2/vtpm")));
    assert!(err.to_string().contains("never reuses"), "{err}");
    assert!(adopt(&vm.0.dir).await.unwrap().is_none(), "no QEMU was started");
    swtpm::erase(&vm.0.dir).unwrap();
    let again = Killed(launch(&cfg, &spec("tpm2", TpmModel::Crb), LaunchMode::Run).await.unwrap());
    assert!(again.0.swtpm.is_some());
}

#[tokio::test]
async fn a_failed_start_leaves_neither_swtpm_nor_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.swtpm = PathBuf::from("/nonexistent/swtpm");
    let err = launch(&cfg, &spec("tpm3", TpmModel::Crb), LaunchMode::Run).await.unwrap_err();
    assert!(err.to_string().contains("/nonexistent/swtpm"), "{err}");
    let dir = tmp.path().join("vms").join("tpm3");
    assert!(adopt(&dir).await.unwrap().is_none());

    // QEMU refuses to start (no such kernel): its fresh swtpm goes too.
    let cfg = config(tmp.path());
    let mut bad = spec("tpm4", TpmModel::Crb);
    bad.boot =
        Boot::Kernel { kernel: "missing".parse().unwrap(), initrd: None, cmdline: "".into() };
    let err = launch(&cfg, &bad, LaunchMode::Run).await.unwrap_err();
    assert!(matches!(err, VmmError::LaunchFailed { .. }), "{err}");
    let dir = tmp.path().join("vms").join("tpm4");
    assert!(swtpm::adopt(&dir).unwrap().is_none(), "swtpm was stopped");
    assert!(!swtpm::has_state(&dir), "and its fresh state removed");
}
