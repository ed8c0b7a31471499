//! The fuzz entry points on the shipped policy and entities files and on
//! thousands of mutations of them, in every plain `cargo test` (cargo-fuzz
//! runs the same entries for longer: `scripts/fuzz.sh`).

mod common;

use common::docs;
use ferry_policy::fuzz::{entities_json, policy_text};

/// xorshift mutations: flip, drop, duplicate or insert bytes.
fn mutations(seed: &[u8], n: usize) -> impl Iterator<Item = Vec<u8>> + '_ {
    let mut x: u32 = 0x2545_f491;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as usize
    };
    (0..n).map(move |_| {
        let mut v = seed.to_vec();
        for _ in 0..1 + next() % 4 {
            if v.is_empty() {
                break;
            }
            let at = next() % v.len();
            match next() % 4 {
                0 => v[at] ^= 1 << (next() % 8),
                1 => {
                    v.remove(at);
                }
                2 => {
                    const BYTES: &[u8] = b"(){}[];,.\"&|!<=>-0123456789 \n";
                    v.insert(at, BYTES[next() % BYTES.len()])
                }
                _ => v.truncate(at),
            }
        }
        v
    })
}

#[test]
fn shipped_files_pass_and_mutations_never_panic() {
    let policy = std::fs::read(docs().join("ferry.cedar")).expect("policy");
    let entities = std::fs::read(docs().join("entities.json")).expect("entities");
    assert!(policy_text(&policy), "the shipped policy does not validate through the fuzz entry");
    assert!(entities_json(&entities), "the shipped entities do not load through the fuzz entry");
    let mut accepted = 0;
    for m in mutations(&policy, 1500) {
        accepted += usize::from(policy_text(&m));
    }
    for m in mutations(&entities, 1500) {
        let _ = entities_json(&m);
    }
    // Some mutations (in comments, in reason strings) keep a valid policy:
    // the entry really parses and validates rather than refusing everything.
    assert!(accepted > 0, "no mutation of the shipped policy validated");
    let deep = format!(
        "permit (principal, action, resource) when {{ {}true{} }};",
        "(".repeat(5000),
        ")".repeat(5000)
    );
    let _ = policy_text(deep.as_bytes());
    let _ = entities_json(format!("{}{}", "[".repeat(5000), "]".repeat(5000)).as_bytes());
}
