//! Real QEMU (TCG): a disk is attached on the bus its spec names, and the
//! firmware boots from it there. The image is a qcow2 made by qemu-img from
//! a one-sector boot loader that prints a line on the serial port.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_vmm::{
    launch, AccelChoice, Boot, DiskBus, LaunchMode, MachineType, QemuConfig, QemuProcess, Qmp,
    VmSpec,
};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

const BOOTED: &str = "FERRY-DISK-BOOTED";

/// A 1 MiB disk whose boot sector (16-bit real mode, loaded at 0x7c00 by
/// the firmware) prints BOOTED on COM1 over and over, so that a reader who
/// connects late still sees it.
fn boot_sector() -> Vec<u8> {
    let mut code = vec![
        0x31, 0xC0, // xor ax, ax
        0x8E, 0xD8, // mov ds, ax
        0xBA, 0xF8, 0x03, // mov dx, 0x3f8
        0xBE, 0x12, 0x7C, // again: mov si, 0x7c12 (the message)
        0xAC, // next: lodsb
        0x84, 0xC0, // test al, al
        0x74, 0xF8, // jz again
        0xEE, // out dx, al
        0xEB, 0xF8, // jmp next
    ];
    assert_eq!(code.len(), 0x12);
    code.extend_from_slice(BOOTED.as_bytes());
    code.extend_from_slice(b"\r\n\0");
    code.resize(510, 0);
    code.extend_from_slice(&[0x55, 0xAA]);
    // SeaBIOS does not boot a disk of a single sector.
    code.resize(1 << 20, 0);
    code
}

fn qemu_img(args: &[&str], dir: &Path) {
    let o = Command::new("qemu-img").args(args).current_dir(dir).output().unwrap();
    assert!(o.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

struct Killed(QemuProcess);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Err(e) = self.0.kill() {
            eprintln!("failed to kill {}: {e}", self.0.pid);
        }
    }
}

async fn qom_get(qmp: &mut Qmp, path: &str, property: &str) -> Value {
    qmp.execute("qom-get", Some(json!({ "path": path, "property": property }))).await.unwrap()
}

/// The QOM type of the controller whose bus holds the device that backs
/// the drive named `image` (QEMU's own view, not our command line).
async fn controller_of(qmp: &mut Qmp, image: &str) -> String {
    let blocks = qmp.execute("query-block", None).await.unwrap();
    let block = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["inserted"]["file"].as_str().is_some_and(|f| f.ends_with(image)))
        .unwrap_or_else(|| panic!("{image} is not attached: {blocks}"));
    let device = block["qdev"].as_str().expect("the drive has a device").to_owned();
    let bus = qom_get(qmp, &device, "parent_bus").await;
    let bus = bus.as_str().unwrap();
    let (controller, _) = bus.rsplit_once('/').unwrap();
    qom_get(qmp, controller, "type").await.as_str().unwrap().to_owned()
}

/// What the guest writes on its serial port until BOOTED (or 60 s).
async fn serial_until_booted(vm: &QemuProcess) -> String {
    let mut serial = tokio::net::UnixStream::connect(vm.serial_path()).await.unwrap();
    let mut seen = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains(BOOTED) {
            let n = serial.read(&mut buf).await.unwrap();
            assert!(n > 0, "serial closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(60), read).await;
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn the_disk_is_on_the_bus_the_spec_names_and_boots_there() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::write(images.join("boot.raw"), boot_sector()).unwrap();
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", "boot.raw", "boot.qcow2"], &images);
    let cfg = QemuConfig {
        accel: AccelChoice::Tcg,
        images_dir: images.clone(),
        run_dir: tmp.path().join("run"),
        ..QemuConfig::default()
    };
    // (machine, bus, the controller QEMU must report, its PCI class)
    let cases = [
        (MachineType::Q35, DiskBus::Virtio, "virtio-blk-pci", 0x0100),
        (MachineType::Pc, DiskBus::Ide, "piix3-ide", 0x0101),
        (MachineType::Pc, DiskBus::Sata, "ich9-ahci", 0x0106),
        (MachineType::Q35, DiskBus::Sata, "ich9-ahci", 0x0106),
    ];
    for (machine, bus, controller, class) in cases {
        let case = format!("{}/{bus}", machine.qemu_name());
        let spec = VmSpec {
            name: format!("disk-{}-{bus}", machine.qemu_name()).parse().unwrap(),
            memory_mib: 32,
            vcpus: 1,
            machine,
            boot: Boot::Disk { image: "boot.qcow2".parse().unwrap(), bus },
        };
        let vm = Killed(launch(&cfg, &spec, LaunchMode::Run).await.unwrap());
        let mut qmp = vm.0.qmp().await.unwrap();
        assert_eq!(controller_of(&mut qmp, "boot.qcow2").await, controller, "{case}");
        let pci = qmp.execute("query-pci", None).await.unwrap();
        let classes: Vec<u64> = pci[0]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|d| d["class_info"]["class"].as_u64())
            .collect();
        assert!(classes.contains(&class), "{case}: no PCI class {class:#06x} in {classes:x?}");
        let console = serial_until_booted(&vm.0).await;
        assert!(console.contains(BOOTED), "{case}: the firmware did not boot it: {console:?}");
        qmp.quit().await.unwrap();
    }
}
