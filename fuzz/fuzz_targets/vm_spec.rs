//! VM specs (ferry_vmm::VmSpec from JSON): travel inside a peer's Offer and an
//! operator's vm_start, and become a QEMU command line on the destination.
#![no_main]
use std::path::Path;

use ferry_vmm::{qemu_args, Accel, LaunchMode, QemuConfig, VmSpec};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<VmSpec>(data) else { return };
    spec.validate().expect("a deserialized spec is valid");
    let again = serde_json::to_vec(&spec).expect("encode");
    let back: VmSpec = serde_json::from_slice(&again).expect("accepted spec does not round-trip");
    assert_eq!(back, spec);
    // The command line built from it: no argument may smuggle a new option
    // through a control character.
    let args = qemu_args(
        &QemuConfig::default(),
        &spec,
        LaunchMode::Incoming,
        Accel::Tcg,
        Path::new("/run/ferry/vms/x"),
    );
    for a in &args {
        let s = a.to_string_lossy();
        assert!(!s.bytes().any(|b| b < 0x20), "control character in QEMU argument {s:?}");
    }
});
