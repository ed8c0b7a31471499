//! The fuzz entry points on real signed logs and thousands of mutations of
//! them, in every plain `cargo test` (cargo-fuzz runs the same entries for
//! longer: `scripts/fuzz.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{cluster, migrate};
use ferry_audit::fuzz::{record_lines, signed_message};
use ferry_audit::AuditLog;

fn xorshift(seed: u32) -> impl FnMut() -> usize {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as usize
    }
}

#[test]
fn real_records_parse_and_mutations_never_panic() {
    let c = cluster();
    let (sp, dp) = (c.path("src.log"), c.path("dst.log"));
    let mut s = AuditLog::open(&sp, c.src_signer()).unwrap();
    let mut d = AuditLog::open(&dp, c.dst_signer()).unwrap();
    migrate(&c.ca, &mut s, &mut d, "0190f5c2-0000-7000-8000-000000000001", 4);
    let log = std::fs::read(&sp).unwrap();
    let lines = log.split(|b| *b == b'\n').filter(|l| !l.is_empty()).count();
    assert_eq!(record_lines(&log), lines, "every record of a real log parses");

    // The signed protocol messages the records carry decode on their own.
    let text = String::from_utf8(log.clone()).unwrap();
    let mut messages = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(signed) = v["record"]["event"].get("signed").filter(|s| !s.is_null()) {
            assert!(signed_message(signed.to_string().as_bytes()));
            messages += 1;
        }
    }
    assert!(messages >= 2, "the source's log holds its offer and commit");

    let mut next = xorshift(0x1234_5678);
    let mut survived = 0;
    for _ in 0..3000 {
        let mut m = log.clone();
        for _ in 0..1 + next() % 3 {
            let at = next() % m.len();
            match next() % 3 {
                0 => m[at] ^= 1 << (next() % 8),
                1 => {
                    m.remove(at);
                }
                _ => m.insert(at, b"{}\",:\\ 0aZ\n"[next() % 11]),
            }
        }
        survived += record_lines(&m);
        let _ = signed_message(&m);
    }
    // Mutations elsewhere leave most lines intact: the parser is exercised
    // on accepted input, not only on garbage.
    assert!(survived > 0);
}
