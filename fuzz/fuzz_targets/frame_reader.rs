//! The tokio FrameReader over the same bytes: must agree with the splitter
//! and keep its buffer bounded.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_channel::fuzz::reader(data);
});
