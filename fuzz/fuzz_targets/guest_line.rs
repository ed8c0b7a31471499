//! Guest console lines (ferry_guest::parse_line). Untrusted: the guest
//! itself writes its serial console.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    let _ = ferry_guest::parse_line(&line);
});
