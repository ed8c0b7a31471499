//! Cedar policy text as a policy file or reload hands it to the loader,
//! parsed and validated against Ferry's schema (ferry_policy::fuzz::policy_text).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ferry_policy::fuzz::policy_text(data);
});
