//! A Cedar entities file (hosts, operators) checked against Ferry's schema
//! (ferry_policy::fuzz::entities_json).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ferry_policy::fuzz::entities_json(data);
});
