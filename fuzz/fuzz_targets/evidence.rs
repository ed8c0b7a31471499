//! TPM attestation evidence as a peer sends it (ferry_attest::Evidence::from_json),
//! decoded before its quote and signature are verified. Untrusted: an
//! authenticated peer host (whose platform is not yet trusted).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(e) = ferry_attest::Evidence::from_json(data) {
        let again = e.to_json().expect("encode");
        ferry_attest::Evidence::from_json(&again).expect("accepted evidence does not round-trip");
    }
});
