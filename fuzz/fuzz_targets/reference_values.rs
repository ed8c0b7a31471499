//! The reference-values file (ferry_attest::ReferenceValues::from_toml):
//! operator-written PCR values that decide which platforms are trusted.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = ferry_attest::ReferenceValues::from_toml(text);
});
