//! Builds the test guest (guest/*.{c,S,ld}) into `$OUT_DIR/ferry-guest.elf`.
//!
//! The guest is a 32-bit multiboot kernel because QEMU's `-kernel` multiboot
//! loader only accepts ELF32. `gcc -m32 -c` works without gcc-multilib since
//! nothing from a 32-bit libc or libgcc is linked.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Flags that make gcc emit code able to run before any runtime exists.
const CFLAGS: &[&str] = &[
    "-m32",
    "-ffreestanding",
    "-fno-pic",
    "-fno-stack-protector",
    "-nostdlib",
    "-O2",
    // CR4.OSFXSR is off in the guest: any SSE instruction would fault.
    "-mgeneral-regs-only",
    // Otherwise gcc may turn fill loops into calls to memset, which we lack.
    "-fno-tree-loop-distribute-patterns",
    "-fno-asynchronous-unwind-tables",
    "-Wall",
    "-Wextra",
    "-Werror",
];

fn run(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("ferry-guest: cannot run {shown}: {e}"));
    if !out.status.success() {
        panic!(
            "ferry-guest: {shown} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn compile(src: &Path, obj: &Path) {
    run(Command::new("gcc").args(CFLAGS).arg("-c").arg(src).arg("-o").arg(obj));
}

fn main() {
    let manifest =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest = manifest.join("guest");
    for f in ["guest.c", "guest.h", "hw.c", "tpm.c", "start.S", "link.ld"] {
        println!("cargo:rerun-if-changed=guest/{f}");
    }

    let start_o = out.join("start.o");
    let guest_o = out.join("guest.o");
    let tpm_o = out.join("tpm.o");
    let hw_o = out.join("hw.o");
    compile(&guest.join("start.S"), &start_o);
    compile(&guest.join("guest.c"), &guest_o);
    compile(&guest.join("tpm.c"), &tpm_o);
    compile(&guest.join("hw.c"), &hw_o);

    run(Command::new("ld")
        .args(["-m", "elf_i386", "-nostdlib", "--build-id=none"])
        // Keep the single LOAD segment (and so the multiboot header) at file
        // offset 4 KiB, well inside the first 8 KiB the loader searches.
        .args(["-z", "max-page-size=0x1000", "--no-warn-rwx-segments"])
        .arg("-T")
        .arg(guest.join("link.ld"))
        .arg("-o")
        .arg(out.join("ferry-guest.elf"))
        .arg(&start_o)
        .arg(&guest_o)
        .arg(&tpm_o)
        .arg(&hw_o));
}
