//! Peer control messages (protocol.rs PeerMessage and Hello), as the
//! destination and source agents decode them from control frames.
//! Untrusted: an authenticated peer host.
#![no_main]
use ferry_agent::protocol::{Hello, PeerMessage};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() > ferry_channel::MAX_CONTROL_LEN as usize {
        return; // the frame codec refuses these before JSON sees them
    }
    if let Ok(m) = serde_json::from_slice::<PeerMessage>(data) {
        // Whatever is accepted re-encodes to something accepted again
        // (validation is not one-way, e.g. for VM specs inside offers).
        let again = serde_json::to_vec(&m).expect("encode");
        let back: PeerMessage =
            serde_json::from_slice(&again).expect("accepted message does not round-trip");
        assert_eq!(back.name(), m.name());
        if let (PeerMessage::Offer { signed: a }, PeerMessage::Offer { signed: b }) = (&m, &back) {
            assert_eq!(a, b);
        }
    }
    let _ = serde_json::from_slice::<Hello>(data);
});
