//! Unit tests of process.rs: QEMU's argument list and host-path checks.
#![allow(clippy::unwrap_used)]
use super::*;
use crate::spec::TpmModel;

fn cfg() -> QemuConfig {
    QemuConfig { images_dir: PathBuf::from("/srv/images"), ..QemuConfig::default() }
}

fn spec(boot: Boot) -> VmSpec {
    VmSpec {
        name: "vm1".parse().unwrap(),
        memory_mib: 256,
        vcpus: 2,
        machine: MachineType::Q35,
        boot,
        tpm: TpmModel::None,
    }
}

fn strs(args: &[OsString]) -> Vec<String> {
    args.iter().map(|a| a.to_string_lossy().into_owned()).collect()
}

fn value_of<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.windows(2).find(|w| w[0] == flag).map(|w| w[1].as_str())
}

#[test]
fn disk_args_resolve_in_images_dir() {
    let s = spec(Boot::Disk { image: "root.qcow2".parse().unwrap(), bus: DiskBus::Virtio });
    let args = strs(&qemu_args(&cfg(), &s, LaunchMode::Run, Accel::Tcg, Path::new("/run/f/vm1")));
    assert_eq!(
        value_of(&args, "-drive"),
        Some("file=/srv/images/root.qcow2,if=virtio,format=qcow2")
    );
    assert_eq!(value_of(&args, "-m"), Some("256M"));
    assert_eq!(value_of(&args, "-smp"), Some("2"));
    assert_eq!(value_of(&args, "-machine"), Some("q35"));
    assert_eq!(value_of(&args, "-cpu"), Some("max"));
    assert_eq!(value_of(&args, "-pidfile"), Some("/run/f/vm1/qemu.pid"));
    assert_eq!(value_of(&args, "-qmp"), Some("unix:/run/f/vm1/qmp.sock,server=on,wait=off"));
    assert!(!args.iter().any(|a| a == "-incoming" || a == "-S"));
}

#[test]
fn ide_and_sata_disks_get_a_device_on_that_bus() {
    let disk = |machine, bus| {
        let mut s = spec(Boot::Disk { image: "r.raw".parse().unwrap(), bus });
        s.machine = machine;
        strs(&qemu_args(&cfg(), &s, LaunchMode::Run, Accel::Tcg, Path::new("/d")))
    };
    let devices = |args: &[String]| -> Vec<String> {
        args.windows(2).filter(|w| w[0] == "-device").map(|w| w[1].clone()).collect()
    };
    let drive = "file=/srv/images/r.raw,if=none,id=disk0,format=raw";
    let ide = disk(MachineType::Pc, DiskBus::Ide);
    assert_eq!(value_of(&ide, "-drive"), Some(drive));
    assert_eq!(devices(&ide), ["ide-hd,drive=disk0,bus=ide.0"]);
    let sata = disk(MachineType::Pc, DiskBus::Sata);
    assert_eq!(devices(&sata), ["ahci,id=sata0", "ide-hd,drive=disk0,bus=sata0.0"]);
    let q35 = disk(MachineType::Q35, DiskBus::Sata);
    assert_eq!(devices(&q35), ["ide-hd,drive=disk0,bus=ide.0"]);
    assert!(devices(&disk(MachineType::Pc, DiskBus::Virtio)).is_empty());
}

#[test]
fn cmdline_is_one_argument_and_incoming_adds_defer() {
    let cmdline = "console=ttyS0 x=$(rm -rf /); `id` | & ; > \"'";
    let s = spec(Boot::Kernel {
        kernel: "vmlinuz".parse().unwrap(),
        initrd: Some("initrd.img".parse().unwrap()),
        cmdline: cmdline.into(),
    });
    let args = strs(&qemu_args(&cfg(), &s, LaunchMode::Incoming, Accel::Kvm, Path::new("/d")));
    assert_eq!(value_of(&args, "-append"), Some(cmdline));
    assert_eq!(value_of(&args, "-kernel"), Some("/srv/images/vmlinuz"));
    assert_eq!(value_of(&args, "-initrd"), Some("/srv/images/initrd.img"));
    assert_eq!(value_of(&args, "-cpu"), Some("host"));
    assert_eq!(value_of(&args, "-incoming"), Some("defer"));
    assert!(args.iter().any(|a| a == "-S"));
    assert_eq!(value_of(&args, "-name"), Some("guest=vm1,debug-threads=on"));
}

#[test]
fn both_ends_get_the_same_machine() {
    let s = spec(Boot::Disk { image: "d.raw".parse().unwrap(), bus: DiskBus::Sata });
    let src = strs(&qemu_args(&cfg(), &s, LaunchMode::Run, Accel::Tcg, Path::new("/a/vm1")));
    let dst = strs(&qemu_args(&cfg(), &s, LaunchMode::Incoming, Accel::Tcg, Path::new("/b/vm1")));
    let strip = |v: Vec<String>| -> Vec<String> {
        v.into_iter()
            .filter(|a| !a.contains("/vm1") && a != "-incoming" && a != "defer" && a != "-S")
            .collect()
    };
    assert_eq!(strip(src), strip(dst));
}

#[test]
fn bad_host_paths_are_refused() {
    assert!(check_host_path(Path::new("/srv/a,b")).is_err());
    assert!(check_host_path(Path::new("/srv/ab")).is_ok());
    let long = PathBuf::from(format!("/{}/serial.sock", "x".repeat(100)));
    assert!(matches!(check_socket_path(&long), Err(VmmError::SocketPathTooLong { .. })));
}

#[test]
fn config_defaults_raise_bandwidth() {
    let c: QemuConfig = serde_json::from_str(r#"{"accel":"tcg"}"#).unwrap();
    assert_eq!(c.accel, AccelChoice::Tcg);
    assert!(c.max_bandwidth_bytes_per_s > 32 << 20);
    assert!(serde_json::from_str::<QemuConfig>(r#"{"bogus":1}"#).is_err());
}

#[test]
fn a_vtpm_is_a_tpm_device_on_the_vms_own_swtpm() {
    let boot =
        || Boot::Kernel { kernel: "k".parse().unwrap(), initrd: None, cmdline: String::new() };
    let plain =
        strs(&qemu_args(&cfg(), &spec(boot()), LaunchMode::Run, Accel::Tcg, Path::new("/d")));
    assert!(!plain.iter().any(|a| a.contains("tpm")), "no vTPM unless the spec asks: {plain:?}");
    for (model, device) in
        [(TpmModel::Crb, "tpm-crb,tpmdev=tpm0"), (TpmModel::Tis, "tpm-tis,tpmdev=tpm0")]
    {
        let mut s = spec(boot());
        s.tpm = model;
        let args =
            strs(&qemu_args(&cfg(), &s, LaunchMode::Incoming, Accel::Tcg, Path::new("/run/f/vm1")));
        let chardevs: Vec<&str> =
            args.windows(2).filter(|w| w[0] == "-chardev").map(|w| w[1].as_str()).collect();
        assert!(chardevs.contains(&"socket,id=vtpm0,path=/run/f/vm1/vtpm.sock"), "{chardevs:?}");
        assert_eq!(value_of(&args, "-tpmdev"), Some("emulator,id=tpm0,chardev=vtpm0"));
        let devices: Vec<&str> =
            args.windows(2).filter(|w| w[0] == "-device").map(|w| w[1].as_str()).collect();
        assert_eq!(devices, [device]);
    }
}
