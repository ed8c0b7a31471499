//! Records of every content type, sealed, optionally one bit flipped: the
//! reader returns exactly the data before the first other record, and
//! nothing of a tampered one.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_tls::fuzz::sealed(data);
});
