//! Audit-log lines as `ferry audit verify` and evidence bundles read them
//! (ferry_audit::fuzz::record_lines). Untrusted: a log handed to an auditor.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ferry_audit::fuzz::record_lines(data);
});
