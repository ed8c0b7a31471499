//! Fuzz entry points (as in ferry-channel): the audit verifier's parsers on
//! any bytes, for the cargo-fuzz targets in `fuzz/` and for the tests in
//! `tests/fuzz_entries.rs`, which run them on real records and their
//! mutations in every plain `cargo test`. Each must never panic.

use crate::record::{parse_line, render_line, MAX_LINE};
use crate::Signed;

/// A log's bytes, line by line, through the record parser that
/// `verify_log` and bundles use. Returns how many lines parsed; each one
/// that did must be canonical (re-render to exactly its bytes).
pub fn record_lines(data: &[u8]) -> usize {
    let mut parsed = 0;
    for line in data.split(|b| *b == b'\n').filter(|l| l.len() <= MAX_LINE) {
        if let Ok(p) = parse_line(line) {
            let again = render_line(&p.raw, &p.sig);
            assert_eq!(again.as_bytes(), line, "an accepted record line is not canonical");
            if let Some(s) = &p.record.event.signed {
                let _ = s.body_migration_id();
            }
            parsed += 1;
        }
    }
    parsed
}

/// A protocol message as a bundle carries it (before any signature check).
pub fn signed_message(data: &[u8]) -> bool {
    match serde_json::from_slice::<Signed>(data) {
        Ok(s) => {
            let _ = s.body_migration_id();
            true
        }
        Err(_) => false,
    }
}
