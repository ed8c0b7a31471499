//! QMP replies as the agent decodes them: one JSON line, then query-migrate's
//! MigrationStatus and query-status's RunState. Untrusted: QEMU (a guest
//! that escaped into QEMU controls what QMP says).
//! The line reader itself (Qmp::read_message) is private and async; see
//! docs/security-inputs.md for the sans-IO entry point it still needs.
#![no_main]
use ferry_vmm::{MigrationStatus, RunState};
use serde_json::Value;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() > ferry_vmm::MAX_QMP_LINE {
        return;
    }
    let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
    let ret = v.get("return").cloned().unwrap_or(v.clone());
    if let Ok(s) = serde_json::from_value::<MigrationStatus>(ret.clone()) {
        let _ = s.status.is_terminal();
        let _ = String::from(s.status);
    }
    if let Some(status) = ret.get("status").and_then(Value::as_str) {
        let _ = RunState::from(status.to_owned());
    }
});
