//! libvirt's daemon-to-daemon connection as the destination's allowlist
//! reads it, QEMU's return path, and domain XML. Untrusted: any source host
//! with an accepted Offer (and its libvirtd), the destination's QEMU.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_libvirt::fuzz::control(data);
});
