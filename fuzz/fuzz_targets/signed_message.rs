//! A signed protocol message as a bundle or a peer carries it, decoded
//! before its signature is checked (ferry_audit::fuzz::signed_message).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ferry_audit::fuzz::signed_message(data);
});
