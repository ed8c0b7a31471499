//! Frame splitting (ferry_channel::codec::split_frame), what every byte after
//! the TLS handshake meets first. Untrusted: any authenticated peer or operator.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_channel::fuzz::frames(data);
});
