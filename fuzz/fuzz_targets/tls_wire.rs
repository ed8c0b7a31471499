//! Arbitrary bytes as the wire after the handshake: the record reader
//! refuses them without panicking and never ends cleanly without close_notify.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_tls::fuzz::wire(data);
});
