//! Operator API requests (protocol.rs ApiRequest). Untrusted: an
//! authenticated operator (any role, including read-only ones).
#![no_main]
use ferry_agent::protocol::ApiRequest;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() > ferry_channel::MAX_CONTROL_LEN as usize {
        return;
    }
    if let Ok(r) = serde_json::from_slice::<ApiRequest>(data) {
        let again = serde_json::to_vec(&r).expect("encode");
        serde_json::from_slice::<ApiRequest>(&again).expect("accepted request does not round-trip");
    }
});
